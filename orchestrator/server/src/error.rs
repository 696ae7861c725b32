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
