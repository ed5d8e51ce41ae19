//! Every HTTP failure as the contract's JSON error, including malformed requests, and the
//! extractors that read bodies, paths and queries without axum's plain-text rejections.

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::de::DeserializeOwned;

use super::body::{BodyKind, parse_object};
use crate::error::{ErrorCode, ErrorKind, WharfError};

/// A user-visible error with an optional status that the error kinds do not cover (405, 413).
#[derive(Debug)]
pub struct ApiError {
    /// The error.
    pub error: WharfError,
    /// Status to use instead of `error.http_status()`.
    pub status: Option<StatusCode>,
}

impl From<WharfError> for ApiError {
    fn from(error: WharfError) -> Self {
        ApiError {
            error,
            status: None,
        }
    }
}

impl ApiError {
    /// The HTTP status this error answers with.
    pub fn status(&self) -> StatusCode {
        self.status.unwrap_or_else(|| {
            StatusCode::from_u16(self.error.http_status())
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
        })
    }

    /// 413: the request body is over the cap.
    pub fn too_large(limit: usize) -> ApiError {
        ApiError {
            error: WharfError::illegal(format!(
                "request body is larger than {limit} bytes; send smaller batches or raise [http] max_body_bytes"
            )),
            status: Some(StatusCode::PAYLOAD_TOO_LARGE),
        }
    }

    /// 408: the body did not arrive within `[http] body_read_timeout_ms`.
    pub fn body_timeout(timeout: std::time::Duration) -> ApiError {
        ApiError {
            error: WharfError::bad_request(format!(
                "the request body did not arrive within {} ms of its headers; send the whole \
                 body at once, or raise [http] body_read_timeout_ms for slow links",
                timeout.as_millis()
            )),
            status: Some(StatusCode::REQUEST_TIMEOUT),
        }
    }

    /// 404 for a path no route serves.
    pub fn no_route(method: &str, path: &str) -> ApiError {
        WharfError::not_found(format!(
            "no such endpoint: {method} {path}; see the HTTP API in the README"
        ))
        .into()
    }

    /// 405 for a known path with the wrong method.
    pub fn wrong_method(method: &str, path: &str) -> ApiError {
        ApiError {
            error: WharfError::new(
                ErrorCode::SystemError,
                ErrorKind::Invalid,
                format!("{method} is not allowed on {path}; see the HTTP API in the README"),
            ),
            status: Some(StatusCode::METHOD_NOT_ALLOWED),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(code = self.error.code.name(), error = %self.error.message, "request failed");
        }
        let body = serde_json::to_vec(&self.error.to_json()).unwrap_or_default();
        let mut resp = (status, body).into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if status == StatusCode::PAYLOAD_TOO_LARGE || status == StatusCode::REQUEST_TIMEOUT {
            // The rest of the body is never read, so the connection cannot carry another
            // request: say so, or a keep-alive client sends its next request into a closed socket.
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if self.error.code == ErrorCode::SystemBusy {
            // Overload clears in moments (the store drains its queue every fsync, a long poll
            // ends within its wait): tell clients when to come back instead of hammering.
            resp.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from_static(RETRY_AFTER_BUSY_SECS),
            );
        }
        resp
    }
}

/// `Retry-After` (seconds) of a SYSTEM_BUSY answer: the smallest the header can say.
pub const RETRY_AFTER_BUSY_SECS: &str = "1";

/// Handler result.
pub type ApiResult<T> = Result<T, ApiError>;

/// How much body a request may send and by when, kept in request extensions by the router.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimit {
    /// Largest body in bytes (`[http] max_body_bytes`, or `max_upload_bytes` for deploys).
    pub max_bytes: usize,
    /// `[http] body_read_timeout_ms`, counted from the end of the request's headers.
    pub timeout: std::time::Duration,
    /// When the body must be in.
    pub deadline: tokio::time::Instant,
}

impl BodyLimit {
    /// A limit of `max_bytes` whose `timeout` starts now.
    pub fn starting_now(max_bytes: usize, timeout: std::time::Duration) -> BodyLimit {
        BodyLimit {
            max_bytes,
            timeout,
            deadline: tokio::time::Instant::now() + timeout,
        }
    }
}

/// Reads the whole body up to `limit.max_bytes` bytes (413 beyond it) by `limit.deadline`
/// (408 past it).
pub async fn read_body(req: Request, limit: &BodyLimit) -> ApiResult<Bytes> {
    match tokio::time::timeout_at(limit.deadline, read_capped(req, limit.max_bytes)).await {
        Ok(r) => r,
        Err(_) => Err(ApiError::body_timeout(limit.timeout)),
    }
}

async fn read_capped(req: Request, limit: usize) -> ApiResult<Bytes> {
    if let Some(len) = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && len > limit as u64
    {
        return Err(ApiError::too_large(limit));
    }
    match axum::body::to_bytes(req.into_body(), limit).await {
        Ok(b) => Ok(b),
        Err(e) => {
            let over = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            if over {
                Err(ApiError::too_large(limit))
            } else {
                Err(WharfError::bad_request(format!("could not read the request body: {e}")).into())
            }
        }
    }
}

/// The raw request body, size-capped by the router's [`BodyLimit`].
pub struct RawBody(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for RawBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, Self::Rejection> {
        let limit = match req.extensions().get::<BodyLimit>() {
            Some(l) => *l,
            None => {
                let d = crate::config::HttpConfig::default();
                BodyLimit::starting_now(
                    d.max_body_bytes,
                    std::time::Duration::from_millis(d.body_read_timeout_ms),
                )
            }
        };
        Ok(RawBody(read_body(req, &limit).await?))
    }
}

/// A JSON request body (any request but a send) parsed with precise errors.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let RawBody(bytes) = RawBody::from_request(req, state).await?;
        Ok(ApiJson(parse_object(&bytes, BodyKind::Request)?))
    }
}

/// Path parameters, with a JSON error when they do not fit.
pub struct ApiPath<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| ApiPath(p.0))
            .map_err(|e| WharfError::bad_request(format!("bad path: {}", e.body_text())).into())
    }
}

/// Query parameters, with a JSON error when they do not fit.
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::try_from_uri(&parts.uri)
            .map(|q| ApiQuery(q.0))
            .map_err(|e| {
                WharfError::bad_request(format!("bad query string: {}", e.body_text())).into()
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn special_statuses_keep_the_json_shape() {
        let e = ApiError::too_large(10);
        assert_eq!(e.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(e.error.to_json()["error"]["name"], "MESSAGE_ILLEGAL");
        assert_eq!(ApiError::wrong_method("PUT", "/v1/topics").status(), 405);
        assert_eq!(ApiError::no_route("GET", "/nope").status(), 404);
    }

    #[test]
    fn busy_is_503_with_retry_after() {
        let resp = ApiError::from(WharfError::busy("queue full")).into_response();
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            resp.headers().get(header::RETRY_AFTER).unwrap(),
            RETRY_AFTER_BUSY_SECS
        );
        let resp = ApiError::from(WharfError::unavailable("disk full")).into_response();
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(resp.headers().get(header::RETRY_AFTER).is_none());
    }

    #[tokio::test]
    async fn body_over_the_cap_is_413() {
        let req = Request::builder()
            .body(axum::body::Body::from(vec![b'x'; 100]))
            .unwrap();
        let limit = BodyLimit::starting_now(10, std::time::Duration::from_secs(60));
        let e = read_body(req, &limit).await.unwrap_err();
        assert_eq!(e.status(), StatusCode::PAYLOAD_TOO_LARGE);
        let req = Request::builder()
            .body(axum::body::Body::from(vec![b'x'; 10]))
            .unwrap();
        assert_eq!(read_body(req, &limit).await.unwrap().len(), 10);
    }

    #[tokio::test]
    async fn a_body_that_never_ends_is_408_at_the_deadline() {
        // A body stream that never yields: the client sent headers and stopped.
        let stalled = axum::body::Body::from_stream(futures_util::stream::pending::<
            Result<Bytes, std::io::Error>,
        >());
        let req = Request::builder().body(stalled).unwrap();
        // The deadline is the thing under test, so it is short rather than simulated.
        let limit = BodyLimit::starting_now(1024, std::time::Duration::from_millis(20));
        let e = read_body(req, &limit).await.unwrap_err();
        assert_eq!(e.status(), StatusCode::REQUEST_TIMEOUT);
        assert!(
            e.error.message.contains("body_read_timeout_ms"),
            "{}",
            e.error.message
        );
        let resp = e.into_response();
        assert_eq!(resp.headers()[header::CONNECTION], "close");
    }
}
