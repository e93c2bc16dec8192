//! Errors as the API's clients see them: `{"error": {"code", "message", "field"}}` with a
//! status that fits the error. Built from the one error type ([`crate::core::Error`]) the
//! service sends by D-Bus name.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tracing::warn;

use crate::core::Error;

/// A client-facing error: a stable code and a message; details go to the journal.
#[derive(Debug)]
pub struct ApiError {
    pub(super) status: StatusCode,
    pub(super) code: &'static str,
    pub(super) message: String,
    /// For a bad input: the request field it is about (`name`, `limits.memory_max`).
    pub(super) field: Option<String>,
}

impl ApiError {
    pub(super) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            field: None,
        }
    }

    /// 400 about the request field `field`, worded as the service words it.
    pub(super) fn invalid(field: impl Into<String>, reason: impl std::fmt::Display) -> Self {
        Error::invalid(field, reason).into()
    }

    pub(super) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_argument", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut error = json!({"code": self.code, "message": self.message});
        if let Some(field) = self.field {
            error["field"] = Value::String(field);
        }
        (self.status, Json(json!({ "error": error }))).into_response()
    }
}

/// A file call's failure, as a status and a stable code.
fn file_status(kind: crate::core::files::FileErrorKind) -> (StatusCode, &'static str) {
    use crate::core::files::FileErrorKind as K;
    match kind {
        K::NotFound => (StatusCode::NOT_FOUND, "file_not_found"),
        K::NotADirectory => (StatusCode::CONFLICT, "not_a_directory"),
        K::IsADirectory => (StatusCode::CONFLICT, "is_a_directory"),
        K::Exists => (StatusCode::CONFLICT, "file_exists"),
        K::PermissionDenied => (StatusCode::FORBIDDEN, "permission_denied"),
        K::NotRegular => (StatusCode::CONFLICT, "not_a_regular_file"),
        K::NoSpace => (StatusCode::INSUFFICIENT_STORAGE, "no_space"),
        K::NotEmpty => (StatusCode::CONFLICT, "directory_not_empty"),
        K::ArchiveRefused => (StatusCode::UNPROCESSABLE_ENTITY, "archive_refused"),
        K::Invalid => (StatusCode::BAD_REQUEST, "invalid_argument"),
        K::Incomplete => (StatusCode::BAD_REQUEST, "incomplete_content"),
        K::Other => (StatusCode::INTERNAL_SERVER_ERROR, "file_error"),
    }
}

/// Each error of the service, as an HTTP status and a stable code.
impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let (status, code) = match &e {
            Error::InvalidArgs { .. } => (StatusCode::BAD_REQUEST, "invalid_argument"),
            Error::NoSuchWorkspace(_) | Error::NoSuchProcess(_) | Error::NoSuchSnapshot(_) => {
                (StatusCode::NOT_FOUND, "not_found")
            }
            Error::SnapshotExists(_) => (StatusCode::CONFLICT, "exists"),
            Error::NoSuchSkill(_) => (StatusCode::BAD_REQUEST, "no_such_skill"),
            Error::NoSuchTool(_) => (StatusCode::BAD_REQUEST, "no_such_tool"),
            Error::NoSuchTemplate(_) => (StatusCode::BAD_REQUEST, "no_such_template"),
            Error::WorkspaceExists(_) => (StatusCode::CONFLICT, "exists"),
            Error::Busy(_) => (StatusCode::CONFLICT, "busy"),
            Error::NotReady { .. } => (StatusCode::CONFLICT, "not_ready"),
            Error::Protected(_) => (StatusCode::CONFLICT, "protected"),
            Error::LimitsExceeded(_) => (StatusCode::TOO_MANY_REQUESTS, "limits_exceeded"),
            Error::NotSupported(_) => (StatusCode::BAD_REQUEST, "not_supported"),
            Error::JobFailed(_) => (StatusCode::INTERNAL_SERVER_ERROR, "job_failed"),
            Error::Library(_) => (StatusCode::INTERNAL_SERVER_ERROR, "library_error"),
            Error::AccessDenied(_) | Error::InteractiveAuthorizationRequired(_) => {
                (StatusCode::FORBIDDEN, "forbidden")
            }
            Error::Io { .. } => (StatusCode::INTERNAL_SERVER_ERROR, "io_error"),
            Error::File { kind, .. } => file_status(*kind),
            Error::Bus { name, message } => {
                let short = name.rsplit('.').next().unwrap_or("");
                return if matches!(
                    short,
                    "ServiceUnknown"
                        | "NameHasNoOwner"
                        | "NoReply"
                        | "Disconnected"
                        | "ChildExited"
                ) || name == "org.freedesktop.zbus.Error"
                {
                    warn!("The service is unreachable: {name}: {message}");
                    Self::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "unavailable",
                        "the workspace service is unreachable",
                    )
                } else {
                    warn!("D-Bus call failed: {name}: {message}");
                    Self::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "internal",
                        "internal error; see the service's journal",
                    )
                };
            }
        };
        Self {
            field: e.field().map(String::from),
            ..Self::new(status, code, e.to_string())
        }
    }
}

impl From<zbus::Error> for ApiError {
    fn from(e: zbus::Error) -> Self {
        Error::from(e).into()
    }
}

pub(super) type ApiResult<T> = Result<T, ApiError>;
