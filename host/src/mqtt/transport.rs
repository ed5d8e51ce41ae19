//! The byte streams MQTT runs over: TCP, TLS (rustls), WebSocket and secure WebSocket
//! (tungstenite, subprotocol `mqtt`). Each is split into a read half and a write half so the
//! session can read a client's acknowledgements while its writer is blocked on a slow socket.

use std::future::Future;
use std::io;

use bytes::{Bytes, BytesMut};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};

/// Reads bytes from a client.
pub trait Reader: Send + 'static {
    /// Appends what arrived to `buf`; `Ok(0)` at end of stream.
    fn read(&mut self, buf: &mut BytesMut) -> impl Future<Output = io::Result<usize>> + Send;
}

/// Writes bytes to a client.
pub trait Writer: Send + 'static {
    /// Writes all of `data` (one or more whole packets).
    fn write(&mut self, data: Bytes) -> impl Future<Output = io::Result<()>> + Send;
    /// Closes the stream (TCP FIN, TLS close_notify, WebSocket close frame).
    fn close(&mut self) -> impl Future<Output = ()> + Send;
}

/// A plain or TLS byte stream's read half, reading in chunks sized to the traffic.
pub struct StreamReader<S> {
    half: ReadHalf<S>,
    chunk: usize,
}

/// Smallest read: what an idle connection keeps (most of 10,000 idle clients' memory is this).
const MIN_READ: usize = 512;
/// Largest read, reached by a connection that keeps filling its buffer.
const MAX_READ: usize = 64 * 1024;
/// A plain or TLS byte stream's write half.
pub struct StreamWriter<S>(pub WriteHalf<S>);

/// Splits a byte stream.
pub fn split_stream<S: AsyncRead + AsyncWrite + Send + 'static>(
    s: S,
) -> (StreamReader<S>, StreamWriter<S>) {
    let (r, w) = tokio::io::split(s);
    (
        StreamReader {
            half: r,
            chunk: MIN_READ,
        },
        StreamWriter(w),
    )
}

impl<S: AsyncRead + AsyncWrite + Send + 'static> Reader for StreamReader<S> {
    async fn read(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        // A burst's big buffer is given back once the connection has gone quiet.
        if buf.is_empty() && buf.capacity() > 4 * self.chunk {
            *buf = BytesMut::new();
        }
        if buf.capacity() - buf.len() < self.chunk / 2 {
            buf.reserve(self.chunk);
        }
        let spare = buf.capacity() - buf.len();
        let n = self.half.read_buf(buf).await?;
        // Filling the space means more was waiting: read more next time. Short reads shrink
        // the chunk back, so a trickle or an idle client holds only a little memory.
        self.chunk = if n >= spare {
            (self.chunk * 2).min(MAX_READ)
        } else if n < self.chunk / 4 {
            (self.chunk / 2).max(MIN_READ)
        } else {
            self.chunk
        };
        Ok(n)
    }
}

impl<S: AsyncRead + AsyncWrite + Send + 'static> Writer for StreamWriter<S> {
    async fn write(&mut self, data: Bytes) -> io::Result<()> {
        self.0.write_all(&data).await?;
        self.0.flush().await
    }

    async fn close(&mut self) {
        let _ = self.0.shutdown().await;
    }
}

/// A WebSocket's read half: binary frames carry MQTT bytes (a packet may span frames).
pub struct WsReader<S>(pub SplitStream<WebSocketStream<S>>);
/// A WebSocket's write half.
pub struct WsWriter<S>(pub SplitSink<WebSocketStream<S>, Message>);

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> Reader for WsReader<S> {
    async fn read(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        loop {
            match self.0.next().await {
                None | Some(Ok(Message::Close(_))) => return Ok(0),
                Some(Ok(Message::Binary(data))) => {
                    if data.is_empty() {
                        continue;
                    }
                    buf.extend_from_slice(&data);
                    return Ok(data.len());
                }
                Some(Ok(Message::Text(_))) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "MQTT over WebSocket uses binary frames; a text frame arrived [MQTT-6.0.0-1]",
                    ));
                }
                // Pings are answered by tungstenite on the next write or flush.
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                Some(Err(e)) => return Err(io::Error::other(e)),
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> Writer for WsWriter<S> {
    async fn write(&mut self, data: Bytes) -> io::Result<()> {
        self.0
            .send(Message::Binary(data))
            .await
            .map_err(io::Error::other)
    }

    async fn close(&mut self) {
        let _ = self.0.close().await;
    }
}

/// Completes the WebSocket handshake: the path must be `path`; the `mqtt` subprotocol is chosen
/// when the client offers it (`mqttv3.1` too, for older clients).
pub async fn accept_ws<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    stream: S,
    path: &str,
) -> io::Result<(WsReader<S>, WsWriter<S>)> {
    let want = path.to_owned();
    // tungstenite's callback type fixes the (large) error response; it is built once per refusal.
    #[allow(clippy::result_large_err)]
    let check = move |req: &Request, mut resp: Response| -> Result<Response, ErrorResponse> {
        if req.uri().path() != want {
            let mut e = ErrorResponse::new(Some(format!(
                "MQTT over WebSocket is served at {want}, not {}\n",
                req.uri().path()
            )));
            *e.status_mut() = StatusCode::NOT_FOUND;
            return Err(e);
        }
        let offered = req
            .headers()
            .get_all("sec-websocket-protocol")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(',').map(str::trim))
            .find(|p| *p == "mqtt" || *p == "mqttv3.1")
            .map(str::to_owned);
        if let Some(p) = offered
            && let Ok(v) = HeaderValue::from_str(&p)
        {
            resp.headers_mut().insert("sec-websocket-protocol", v);
        }
        Ok(resp)
    };
    let ws = tokio_tungstenite::accept_hdr_async(stream, check)
        .await
        .map_err(io::Error::other)?;
    let (w, r) = ws.split();
    Ok((WsReader(r), WsWriter(w)))
}
