//! A workspace's state over HTTP: snapshots (take, list, delete, restore) and forks, each
//! route one D-Bus method.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde_json::{Value, json};

use super::*;
use crate::dbus::client::args;
use crate::dbus::schema;

fn snapshot_json((name, created_at, bytes): (String, u64, u64)) -> Value {
    json!({"name": name, "created_at": created_at, "bytes": bytes})
}

/// `POST /api/workspaces/{id}/snapshots` `{name}`: 201, the snapshot.
pub(super) async fn take(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let mut fields = body_json(body)?;
    let name = match fields.remove("name") {
        Some(Value::String(n)) => n,
        Some(_) => return Err(ApiError::invalid("name", "must be a string")),
        None => return Err(ApiError::invalid("name", "is required")),
    };
    let options = schema::SNAPSHOT.from_json(fields)?;
    let m = manager(&state).await?;
    m.snapshot_workspace(&id, &name, args(&options)).await?;
    let taken = m
        .list_snapshots(&id)
        .await?
        .into_iter()
        .find(|s| s.0 == name)
        .map(snapshot_json)
        .unwrap_or_else(|| json!({"name": name}));
    Ok((StatusCode::CREATED, Json(taken)))
}

/// `GET /api/workspaces/{id}/snapshots`: every snapshot, oldest first.
pub(super) async fn list(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let all = manager(&state).await?.list_snapshots(&id).await?;
    Ok(Json(Value::Array(
        all.into_iter().map(snapshot_json).collect(),
    )))
}

/// `DELETE /api/workspaces/{id}/snapshots/{name}`: 204.
pub(super) async fn delete(
    State(state): State<Arc<AppState>>,
    Path((id, name)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    manager(&state).await?.delete_snapshot(&id, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /api/workspaces/{id}/snapshots/{name}/restore`: the workspace.
pub(super) async fn restore(
    State(state): State<Arc<AppState>>,
    Path((id, name)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    manager(&state).await?.restore_workspace(&id, &name).await?;
    Ok(Json(workspace_json(&state, &id).await?))
}

/// `POST /api/workspaces/{id}/fork` `{name, snapshot?, ...}`: 201, the new workspace.
pub(super) async fn fork(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let mut fields = body_json(body)?;
    let snapshot = match fields.remove("snapshot") {
        Some(Value::String(s)) => s,
        None | Some(Value::Null) => String::new(),
        Some(_) => return Err(ApiError::invalid("snapshot", "must be a string")),
    };
    let spec = schema::FORK.from_json(fields)?;
    let path = manager(&state)
        .await?
        .fork_workspace(&id, &snapshot, args(&spec))
        .await?;
    let new = crate::dbus::client::workspace_id_of(&path);
    Ok((
        StatusCode::CREATED,
        Json(workspace_json(&state, &new).await?),
    ))
}
