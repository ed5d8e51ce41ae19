//! `GET /v1/mqtt/devices/{client_id}`, `/v1/mqtt/groups/{group}`, `/v1/mqtt/topics/{topic}`:
//! MQTT inspection. Reading a device or group needs `allow_subscribe` for its group; a topic,
//! for the topic.

use axum::Json;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::{Caller, Shared};
use crate::error::{ErrorCode, ErrorKind, WharfError};
use crate::mqtt::{CLIENT_ID_SEPARATOR, Gateway};

fn gateway(st: &Shared) -> Result<&Gateway, ApiError> {
    st.mqtt.as_ref().ok_or_else(|| {
        WharfError::new(
            ErrorCode::ServiceNotAvailable,
            ErrorKind::Unavailable,
            "the MQTT gateway is not running on this host: every [mqtt] listener is off; set [mqtt] listen",
        )
        .into()
    })
}

/// A device: online, address, last connect, subscriptions with QoS.
pub async fn device(
    State(st): State<Shared>,
    Caller(who): Caller,
    Path(client_id): Path<String>,
) -> Result<Response, ApiError> {
    let gw = gateway(&st)?;
    let group = client_id
        .split_once(CLIENT_ID_SEPARATOR)
        .map_or(client_id.as_str(), |(g, _)| g);
    who.check_subscribe("MQTT group", group)?;
    match gw.device(&client_id).await {
        Some(d) => Ok(Json(d).into_response()),
        None => Err(WharfError::not_found(format!(
            "no MQTT client '{client_id}' is connected or has a stored session"
        ))
        .into()),
    }
}

/// An MQTT group: online count, pending deliveries.
pub async fn group(
    State(st): State<Shared>,
    Caller(who): Caller,
    Path(group): Path<String>,
) -> Result<Response, ApiError> {
    let gw = gateway(&st)?;
    who.check_subscribe("MQTT group", &group)?;
    st.broker.group(&group)?;
    Ok(Json(gw.group(&group)).into_response())
}

/// An MQTT parent topic: subscribers, recent rates.
pub async fn topic(
    State(st): State<Shared>,
    Caller(who): Caller,
    Path(topic): Path<String>,
) -> Result<Response, ApiError> {
    let gw = gateway(&st)?;
    who.check_subscribe("topic", &topic)?;
    st.broker.topic(&topic)?;
    Ok(Json(gw.topic(&topic)).into_response())
}
