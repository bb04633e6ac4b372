//! The one error of every operation: a kind (which maps to an HTTP status) and a message that
//! says what is wrong and what to do next.
use serde::{Deserialize, Serialize};

/// What kind of failure an [`ApiError`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request itself is wrong (malformed, unknown field, bad name): 400.
    BadRequest,
    /// No token, or a token the server does not know: 401.
    Unauthorized,
    /// The token's role is too weak: 403.
    Forbidden,
    /// No such route: 404.
    NotFound,
    /// The operation was refused or failed (wrong state, missing switch, …): 409.
    Refused,
    /// The request body is larger than the server accepts: 413.
    TooLarge,
    /// The server failed unexpectedly: 500.
    Internal,
    /// The server cannot be reached (client side): no HTTP status.
    Unreachable,
}

impl ErrorKind {
    /// The HTTP status of this kind.
    pub fn status(&self) -> u16 {
        match self {
            ErrorKind::BadRequest => 400,
            ErrorKind::Unauthorized => 401,
            ErrorKind::Forbidden => 403,
            ErrorKind::NotFound => 404,
            ErrorKind::Refused => 409,
            ErrorKind::TooLarge => 413,
            ErrorKind::Internal => 500,
            ErrorKind::Unreachable => 503,
        }
    }

    /// The kind of an HTTP status.
    pub fn from_status(s: u16) -> ErrorKind {
        match s {
            400 | 422 => ErrorKind::BadRequest,
            401 => ErrorKind::Unauthorized,
            403 => ErrorKind::Forbidden,
            404 | 405 => ErrorKind::NotFound,
            409 => ErrorKind::Refused,
            413 => ErrorKind::TooLarge,
            _ => ErrorKind::Internal,
        }
    }
}

/// An operation's failure, as the CLI prints it (`error: MESSAGE`) and the server sends it
/// (`{"error": MESSAGE, "kind": KIND}` with the kind's status).
#[derive(
    Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize, utoipa::ToSchema,
)]
#[error("{error}")]
pub struct ApiError {
    /// What kind of failure.
    pub kind: ErrorKind,
    /// What is wrong and what to do next.
    pub error: String,
}

impl ApiError {
    /// An error of `kind` with `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ApiError {
            kind,
            error: message.into(),
        }
    }

    /// A refusal or failure of the operation (409).
    pub fn refused(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Refused, message)
    }

    /// A malformed request (400).
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::BadRequest, message)
    }
}
