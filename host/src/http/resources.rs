//! Topics and groups: create, list, show, delete.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::error::{ApiJson, ApiPath, ApiResult};
use super::{Caller, Shared};
use crate::broker::specs::GroupPatch;
use crate::broker::{GroupSpec, TopicSpec};

/// `POST /v1/topics` → 201, 409 if it exists.
pub async fn create_topic(
    State(st): State<Shared>,
    Caller(who): Caller,
    ApiJson(spec): ApiJson<TopicSpec>,
) -> ApiResult<Response> {
    who.check_admin("create topics")?;
    let topic = st.broker.create_topic(spec).await?;
    Ok((StatusCode::CREATED, Json(topic)).into_response())
}

/// `GET /v1/topics`.
pub async fn list_topics(State(st): State<Shared>) -> Response {
    Json(st.broker.list_topics()).into_response()
}

/// `GET /v1/topics/{topic}`.
pub async fn show_topic(
    State(st): State<Shared>,
    ApiPath(topic): ApiPath<String>,
) -> ApiResult<Response> {
    Ok(Json(st.broker.topic(&topic)?).into_response())
}

/// `DELETE /v1/topics/{topic}`.
pub async fn delete_topic(
    State(st): State<Shared>,
    Caller(who): Caller,
    ApiPath(topic): ApiPath<String>,
) -> ApiResult<Response> {
    who.check_admin("delete topics")?;
    st.broker.delete_topic(&topic).await?;
    Ok(Json(json!({"name": topic, "deleted": true})).into_response())
}

/// `POST /v1/groups` → 201, 409 if it exists.
pub async fn create_group(
    State(st): State<Shared>,
    Caller(who): Caller,
    ApiJson(spec): ApiJson<GroupSpec>,
) -> ApiResult<Response> {
    who.check_admin("create groups")?;
    let group = st.broker.create_group(spec).await?;
    Ok((StatusCode::CREATED, Json(group)).into_response())
}

/// `PATCH /v1/groups/{group}` `{...settings}`: changes the named settings; the latest wins for
/// every instance at once. Unknown fields and bad values are 400 naming the field.
pub async fn patch_group(
    State(st): State<Shared>,
    Caller(who): Caller,
    ApiPath(group): ApiPath<String>,
    ApiJson(body): ApiJson<serde_json::Map<String, serde_json::Value>>,
) -> ApiResult<Response> {
    who.check_admin("change groups")?;
    let patch = GroupPatch::from_json(&body)?;
    Ok(Json(st.broker.patch_group(&group, patch).await?).into_response())
}

/// `GET /v1/groups`.
pub async fn list_groups(State(st): State<Shared>) -> Response {
    Json(st.broker.list_groups()).into_response()
}

/// `GET /v1/groups/{group}`.
pub async fn show_group(
    State(st): State<Shared>,
    ApiPath(group): ApiPath<String>,
) -> ApiResult<Response> {
    Ok(Json(st.broker.group(&group)?).into_response())
}

/// `DELETE /v1/groups/{group}`.
pub async fn delete_group(
    State(st): State<Shared>,
    Caller(who): Caller,
    ApiPath(group): ApiPath<String>,
) -> ApiResult<Response> {
    who.check_admin("delete groups")?;
    st.broker.delete_group(&group).await?;
    Ok(Json(json!({"name": group, "deleted": true})).into_response())
}
