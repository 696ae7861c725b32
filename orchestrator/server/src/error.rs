//! The orchestrator's errors, and their one mapping to gRPC statuses.

use drover_store::StoreError;
use tonic::Status;

/// An API failure. Every message says what failed, on which object, and what to do.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    /// The object is in the wrong state; the message names the current one.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A concurrent change won; re-read and retry.
    #[error("{0}")]
    Aborted(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    /// The variant's name, as kept in execution outputs.
    pub fn code_name(&self) -> &'static str {
        match self {
            ApiError::InvalidArgument(_) => "invalid-argument",
            ApiError::NotFound(_) => "not-found",
            ApiError::AlreadyExists(_) => "already-exists",
            ApiError::FailedPrecondition(_) => "failed-precondition",
            ApiError::Aborted(_) => "aborted",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Internal(_) => "internal",
        }
    }

    /// The error a [`ApiError::code_name`] and message stand for.
    pub fn from_code_name(code: &str, message: String) -> Self {
        match code {
            "invalid-argument" => ApiError::InvalidArgument(message),
            "not-found" => ApiError::NotFound(message),
            "already-exists" => ApiError::AlreadyExists(message),
            "failed-precondition" => ApiError::FailedPrecondition(message),
            "aborted" => ApiError::Aborted(message),
            "unavailable" => ApiError::Unavailable(message),
            _ => ApiError::Internal(message),
        }
    }
}

/// Shorthand for API results.
pub type ApiResult<T> = Result<T, ApiError>;

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(_) => ApiError::Unavailable(e.to_string()),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Self {
        match e {
            ApiError::InvalidArgument(m) => Status::invalid_argument(m),
            ApiError::NotFound(m) => Status::not_found(m),
            ApiError::AlreadyExists(m) => Status::already_exists(m),
            ApiError::FailedPrecondition(m) => Status::failed_precondition(m),
            ApiError::Aborted(m) => Status::aborted(m),
            ApiError::Unavailable(m) => Status::unavailable(m),
            ApiError::Internal(m) => Status::internal(m),
        }
    }
}

/// A concurrent writer changed the object between our read and our transaction.
pub fn raced(what: &str) -> ApiError {
    ApiError::Aborted(format!("{what} was changed concurrently by another request; re-read it and retry"))
}
