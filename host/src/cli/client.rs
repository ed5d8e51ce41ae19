//! The CLI's HTTP client: signs requests when a key is given and turns error bodies into
//! [`ServerError`]s that carry the spec code and name.

use std::fmt;
use std::path::Path;
use std::time::SystemTime;

use reqwest::Method;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, DATE, HeaderMap, HeaderValue};
use serde_json::Value;

use crate::http::auth::{SCHEME, content_md5, sign, string_to_sign};

/// An error answer from the host: status, spec code and name, message.
#[derive(Debug, Clone)]
pub struct ServerError {
    /// HTTP status.
    pub status: u16,
    /// Spec code (0 when the body was not a contract error).
    pub code: i64,
    /// Spec name.
    pub name: String,
    /// What went wrong and what to do.
    pub message: String,
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({}): {} [HTTP {}]",
            self.name, self.code, self.message, self.status
        )
    }
}

impl std::error::Error for ServerError {}

/// Access key pair for signing.
#[derive(Clone)]
pub struct Credentials {
    /// Access key.
    pub access_key: String,
    /// Secret key.
    pub secret_key: String,
}

/// Never prints the secret key.
impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key", &self.access_key)
            .field("secret_key", &"<redacted>")
            .finish()
    }
}

/// A client for one host.
pub struct Client {
    base: reqwest::Url,
    http: reqwest::Client,
    credentials: Option<Credentials>,
}

/// A request body.
pub enum Body {
    /// No body.
    Empty,
    /// JSON.
    Json(Value),
    /// Multipart form: (part name, file name, content type, bytes).
    Multipart(Vec<(String, String, String, Vec<u8>)>),
}

impl Client {
    /// A client for `server` (e.g. `http://127.0.0.1:8080` or `https://host:8443`); https trusts
    /// the system's root certificates plus those in the PEM file `ca`.
    pub fn new(
        server: &str,
        credentials: Option<Credentials>,
        ca: Option<&Path>,
    ) -> anyhow::Result<Client> {
        let base = reqwest::Url::parse(server).map_err(|e| {
            anyhow::anyhow!(
                "--server '{server}' is not a URL ({e}); use e.g. http://127.0.0.1:8080"
            )
        })?;
        if !matches!(base.scheme(), "http" | "https") {
            anyhow::bail!(
                "--server '{server}' must start with http:// or https:// (https when the host has [http] tls_cert)"
            );
        }
        // Reading the system's roots costs a little at every start; plain http needs none.
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_native_certs(base.scheme() == "https");
        if let Some(ca) = ca {
            for cert in read_ca(ca)? {
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder
            .build()
            .map_err(|e| anyhow::anyhow!("cannot build the HTTP client: {e}"))?;
        Ok(Client {
            base,
            http,
            credentials,
        })
    }

    /// Sends a request and returns the JSON answer (or `Null` for an empty one).
    pub async fn call(&self, method: Method, path: &str, body: Body) -> anyhow::Result<Value> {
        let url = self
            .base
            .join(path)
            .map_err(|e| anyhow::anyhow!("bad path {path}: {e}"))?;
        let (content_type, bytes) = match body {
            Body::Empty => (None, Vec::new()),
            Body::Json(v) => (
                Some("application/json".to_string()),
                serde_json::to_vec(&v)?,
            ),
            Body::Multipart(parts) => {
                let (ct, b) = encode_multipart(&parts);
                (Some(ct), b)
            }
        };
        let mut headers = HeaderMap::new();
        if let Some(ct) = &content_type {
            headers.insert(CONTENT_TYPE, HeaderValue::from_str(ct)?);
        }
        if let Some(c) = &self.credentials {
            let date = httpdate::fmt_http_date(SystemTime::now());
            let md5 = if bytes.is_empty() {
                String::new()
            } else {
                content_md5(&bytes)
            };
            let path_and_query = match url.query() {
                Some(q) => format!("{}?{q}", url.path()),
                None => url.path().to_string(),
            };
            let sts = string_to_sign(
                method.as_str(),
                &md5,
                content_type.as_deref().unwrap_or(""),
                &date,
                &path_and_query,
            );
            let auth = format!("{SCHEME} {}:{}", c.access_key, sign(&c.secret_key, &sts));
            headers.insert(DATE, HeaderValue::from_str(&date)?);
            headers.insert(AUTHORIZATION, HeaderValue::from_str(&auth)?);
            if !md5.is_empty() {
                headers.insert("content-md5", HeaderValue::from_str(&md5)?);
            }
        }
        let resp = self
            .http
            .request(method.clone(), url.clone())
            .headers(headers)
            .body(bytes)
            .send()
            .await
            .map_err(|e| unreachable_host(&self.base, &e))?;
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        let value: Value = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text.clone()))
        };
        if status >= 400 {
            let e = &value["error"];
            return Err(ServerError {
                status,
                code: e["code"].as_i64().unwrap_or(0),
                name: e["name"].as_str().unwrap_or("HTTP_ERROR").to_string(),
                message: e["message"]
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| format!("{method} {path} answered {status}: {text}")),
            }
            .into());
        }
        Ok(value)
    }
}

/// The certificates of a `--ca` PEM file.
fn read_ca(path: &Path) -> anyhow::Result<Vec<reqwest::Certificate>> {
    let pem = std::fs::read(path)
        .map_err(|e| anyhow::anyhow!("--ca {}: cannot read the file: {e}", path.display()))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
        anyhow::anyhow!(
            "--ca {}: not PEM certificates ({e}); pass the CA certificate (-----BEGIN CERTIFICATE-----) that signed the host's tls_cert",
            path.display()
        )
    })?;
    if certs.is_empty() {
        anyhow::bail!(
            "--ca {}: holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        );
    }
    Ok(certs)
}

/// Why a request got no answer, with the root cause (reqwest's own message stops at "error
/// sending request") and, for TLS failures, what to do.
fn unreachable_host(base: &reqwest::Url, e: &reqwest::Error) -> anyhow::Error {
    let mut causes = Vec::new();
    let mut source: Option<&dyn std::error::Error> = Some(e);
    while let Some(s) = source {
        let text = s.to_string();
        if !causes.iter().any(|c: &String| c.contains(&text)) {
            causes.push(text);
        }
        source = s.source();
    }
    let chain = causes.join(": ");
    let lower = chain.to_ascii_lowercase();
    let hint = if lower.contains("causedasendentity") {
        "; the host presents a CA certificate as its own, which TLS clients refuse: give the \
         host a certificate with basicConstraints CA:FALSE (signed by that CA, or self-signed) \
         and pass the signing certificate with --ca"
    } else if lower.contains("certificate") || lower.contains("unknownissuer") {
        "; the host's TLS certificate is not trusted: pass --ca FILE (or WHARF_CA) with the CA \
         certificate that signed it, or install that CA in the system's trust store"
    } else if base.scheme() == "http"
        && (lower.contains("connection closed") || lower.contains("reset"))
    {
        "; if the host serves HTTPS ([http] tls_cert), use --server https://..."
    } else if base.scheme() == "https"
        && (lower.contains("corrupt message")
            || lower.contains("invalidcontenttype")
            || lower.contains("wrong version"))
    {
        "; the host seems to speak plain HTTP there: use --server http://..."
    } else {
        ""
    };
    anyhow::anyhow!("cannot reach the host at {base}: {chain}{hint}")
}

/// Encodes a multipart/form-data body by hand so the bytes are known before signing
/// (the signature covers their MD5).
fn encode_multipart(parts: &[(String, String, String, Vec<u8>)]) -> (String, Vec<u8>) {
    let boundary = format!("wharf-{:032x}", rand::random::<u128>());
    let mut out = Vec::new();
    for (name, file, ct, data) in parts {
        out.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        out.extend_from_slice(
            format!(
                "Content-Disposition: form-data; name=\"{name}\"; filename=\"{}\"\r\nContent-Type: {ct}\r\n\r\n",
                file.replace('"', "_")
            )
            .as_bytes(),
        );
        out.extend_from_slice(data);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multipart_encoding_is_well_formed() {
        let (ct, body) = encode_multipart(&[
            (
                "manifest".into(),
                "plugin.toml".into(),
                "text/plain".into(),
                b"name = \"x\"".to_vec(),
            ),
            (
                "component".into(),
                "x.wasm".into(),
                "application/wasm".into(),
                vec![0, 97, 115, 109],
            ),
        ]);
        let boundary = ct.strip_prefix("multipart/form-data; boundary=").unwrap();
        let text = String::from_utf8_lossy(&body);
        assert_eq!(text.matches(&format!("--{boundary}\r\n")).count(), 2);
        assert!(text.ends_with(&format!("--{boundary}--\r\n")));
        assert!(text.contains("name=\"component\"; filename=\"x.wasm\""));
    }
}
