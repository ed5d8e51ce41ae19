//! Plugin deploy, list, status, rollback, remove, and HTTP triggers (`POST /t/...`).

use axum::Json;
use axum::extract::{FromRequest, Multipart, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;

use super::error::{ApiPath, ApiResult, RawBody};
use super::{Caller, Shared};
use crate::error::WharfError;

/// `POST /v1/plugins` (multipart `manifest` = TOML text, `component` = wasm bytes) → 201.
pub async fn deploy(
    State(st): State<Shared>,
    Caller(who): Caller,
    req: Request,
) -> ApiResult<Response> {
    who.check_admin("deploy plugins")?;
    let (parts, body) = req.into_parts();
    // Read under our own cap first so an oversized upload is a 413 JSON error, not a multipart error.
    let RawBody(bytes) =
        RawBody::from_request(Request::from_parts(parts.clone(), body), &()).await?;
    let mut form = Multipart::from_request(
        Request::from_parts(parts, axum::body::Body::from(bytes)),
        &(),
    )
    .await
    .map_err(|e| {
        WharfError::bad_request(format!(
            "expected multipart/form-data with parts `manifest` and `component`: {}",
            e.body_text()
        ))
    })?;
    let mut manifest: Option<String> = None;
    let mut component: Option<Bytes> = None;
    while let Some(field) = form.next_field().await.map_err(|e| {
        WharfError::bad_request(format!("malformed multipart body: {}", e.body_text()))
    })? {
        let name = field.name().unwrap_or("").to_string();
        let data = field.bytes().await.map_err(|e| {
            WharfError::bad_request(format!(
                "malformed multipart part '{name}': {}",
                e.body_text()
            ))
        })?;
        match name.as_str() {
            "manifest" => {
                manifest = Some(String::from_utf8(data.to_vec()).map_err(|_| {
                    WharfError::bad_request("the `manifest` part must be UTF-8 TOML text")
                })?)
            }
            "component" => component = Some(data),
            other => {
                return Err(WharfError::bad_request(format!(
                    "unexpected multipart part '{other}'; send only `manifest` and `component`"
                ))
                .into());
            }
        }
    }
    let (Some(manifest), Some(component)) = (manifest, component) else {
        return Err(WharfError::bad_request(
            "a deploy needs two multipart parts: `manifest` (plugin.toml text) and `component` (wasm bytes)",
        )
        .into());
    };
    let result = st.plugins.deploy(&manifest, component).await?;
    Ok((StatusCode::CREATED, Json(result)).into_response())
}

/// `GET /v1/plugins`.
pub async fn list(State(st): State<Shared>) -> Response {
    Json(st.plugins.list()).into_response()
}

/// `GET /v1/plugins/{name}`.
pub async fn status(
    State(st): State<Shared>,
    ApiPath(name): ApiPath<String>,
) -> ApiResult<Response> {
    Ok(Json(st.plugins.status(&name)?).into_response())
}

/// `POST /v1/plugins/{name}/rollback`.
pub async fn rollback(
    State(st): State<Shared>,
    Caller(who): Caller,
    ApiPath(name): ApiPath<String>,
) -> ApiResult<Response> {
    who.check_admin("roll back plugins")?;
    Ok(Json(st.plugins.rollback(&name).await?).into_response())
}

/// `DELETE /v1/plugins/{name}`.
pub async fn remove(
    State(st): State<Shared>,
    Caller(who): Caller,
    ApiPath(name): ApiPath<String>,
) -> ApiResult<Response> {
    who.check_admin("remove plugins")?;
    Ok(Json(st.plugins.remove(&name).await?).into_response())
}

/// `POST /t/<path>`: a plugin's HTTP trigger turns the request into a message. A signed caller
/// needs `allow_publish` for the route's topic, as a send to it would.
pub async fn trigger(
    State(st): State<Shared>,
    Caller(who): Caller,
    req: Request,
) -> ApiResult<Response> {
    let path = req
        .uri()
        .path()
        .strip_prefix("/t")
        .unwrap_or("/")
        .to_string();
    let headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string())))
        .collect();
    let RawBody(body) = RawBody::from_request(req, &()).await?;
    match st.plugins.trigger(&path, &headers, body, &who).await {
        Some(result) => Ok(Json(result?).into_response()),
        None => Err(WharfError::not_found(format!(
            "no plugin HTTP trigger is deployed at {path}; declare one with [[http]] path = \"{path}\" in a plugin manifest"
        ))
        .into()),
    }
}
