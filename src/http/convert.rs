//! Between the bus and JSON: the manager proxy, request bodies, a workspace's properties as
//! the API's workspace object.

use std::collections::HashMap;

use axum::Json;
use axum::body::Bytes;
use serde_json::{Map, Value, json};
use zbus::OwnedVariant;

use crate::dbus::client::WorkspacesProxy;

use super::*;

pub(super) async fn manager(state: &AppState) -> ApiResult<WorkspacesProxy<'static>> {
    Ok(manager_on(&state.conn).await?)
}

pub(super) use crate::dbus::client::manager_on;

/// A request body as JSON, whatever Content-Type the client sent (curl -d sends a form type).
pub(super) fn body_json(bytes: Bytes) -> ApiResult<Map<String, Value>> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ApiError::bad_request("the body must be a JSON object")),
        Err(e) => Err(ApiError::bad_request(format!(
            "the body is not valid JSON: {e}"
        ))),
    }
}

pub(super) use crate::dbus::client::WORKSPACE_IFACE;

/// The workspace as JSON, from its object's properties.
pub(super) async fn workspace_json(state: &AppState, key: &str) -> ApiResult<Value> {
    let path = manager(state).await?.get_workspace(key).await?;
    let all = crate::dbus::client::workspace_properties(&state.conn, &path).await?;
    Ok(workspace_from(&all))
}

/// The REST form of a workspace object's properties.
pub(super) fn workspace_from(all: &HashMap<String, OwnedVariant>) -> Value {
    crate::dbus::client::workspace_json(all)
}

pub(super) fn exec_json(reply: crate::dbus::client::ExecReply) -> Json<Value> {
    let (exit_code, stdout, stderr, timed_out, _) = reply;
    Json(json!({
        "exit_code": exit_code,
        "stdout": String::from_utf8_lossy(&stdout),
        "stderr": String::from_utf8_lossy(&stderr),
        "timed_out": timed_out,
    }))
}
