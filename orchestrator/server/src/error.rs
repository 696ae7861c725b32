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
    /// No valid token.
    #[error("{0}")]
    Unauthenticated(String),
    /// A valid token whose role or project does not allow the call.
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    Internal(String),
    /// The caller's deadline came before the answer; the message says what goes on.
    #[error("{0}")]
    DeadlineExceeded(String),
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
            ApiError::Unauthenticated(_) => "unauthenticated",
            ApiError::PermissionDenied(_) => "permission-denied",
            ApiError::Internal(_) => "internal",
            ApiError::DeadlineExceeded(_) => "deadline-exceeded",
        }
    }

    /// The same error (same code), its message prefixed with what was being done.
    pub fn with_context(self, doing: &str) -> Self {
        let code = self.code_name();
        ApiError::from_code_name(code, format!("{doing}: {self}"))
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
            "unauthenticated" => ApiError::Unauthenticated(message),
            "permission-denied" => ApiError::PermissionDenied(message),
            "deadline-exceeded" => ApiError::DeadlineExceeded(message),
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
            ApiError::InvalidArgument(m) => Status::invalid_argument(tidy(&m)),
            ApiError::NotFound(m) => Status::not_found(tidy(&m)),
            ApiError::AlreadyExists(m) => Status::already_exists(tidy(&m)),
            ApiError::FailedPrecondition(m) => Status::failed_precondition(tidy(&m)),
            ApiError::Aborted(m) => Status::aborted(tidy(&m)),
            ApiError::Unavailable(m) => Status::unavailable(tidy(&m)),
            ApiError::Unauthenticated(m) => Status::unauthenticated(tidy(&m)),
            ApiError::PermissionDenied(m) => Status::permission_denied(tidy(&m)),
            ApiError::Internal(m) => Status::internal(tidy(&m)),
            ApiError::DeadlineExceeded(m) => Status::deadline_exceeded(tidy(&m)),
        }
    }
}

/// An error message with nested repeats dropped. Errors pass through several layers (the
/// driver, the agent, the peer agent, the orchestrator's retries), and each may quote the
/// one below: a clause that already appeared (a part between ": " or "; " separators, of
/// some length) is said once.
pub fn tidy(message: &str) -> String {
    const SHORTEST: usize = 12;
    let mut seen: Vec<&str> = Vec::new();
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    // Within a repeated run, short clauses that were said before go too.
    let mut skipping = false;
    while !rest.is_empty() {
        let (part, sep, next) = match [": ", "; "].iter().filter_map(|s| rest.find(s).map(|i| (i, *s))).min() {
            Some((i, s)) => (&rest[..i], s, &rest[i + s.len()..]),
            None => (rest, "", ""),
        };
        let clause = part.trim();
        let said = seen.contains(&clause);
        skipping = if clause.len() >= SHORTEST { said } else { skipping && said };
        if !skipping {
            seen.push(clause);
            out.push_str(part);
            out.push_str(sep);
        }
        rest = next;
    }
    let trimmed = out.trim_end_matches([':', ';', ' ']);
    trimmed.to_string()
}

/// A concurrent writer changed the object between our read and our transaction.
pub fn raced(what: &str) -> ApiError {
    ApiError::Aborted(format!("{what} was changed concurrently by another request; re-read it and retry"))
}

#[cfg(test)]
mod tidy_tests {
    use super::tidy;

    #[test]
    fn repeats_are_said_once() {
        let nested = "sync failed: peer did not apply the recovery point: peer agent at http://b:1: stream error: \
                      h2 reset; peer did not apply the recovery point: peer agent at http://b:1: stream error: h2 reset";
        assert_eq!(
            tidy(nested),
            "sync failed: peer did not apply the recovery point: peer agent at http://b:1: stream error: h2 reset"
        );
    }

    #[test]
    fn plain_messages_are_unchanged() {
        for m in [
            "volume v1 is not replicated; enable replication first",
            "a: b: a: b",
            "backend backend-a has no live agent: check it with `drover backend show backend-a`",
            "",
        ] {
            assert_eq!(tidy(m), m);
        }
    }
}
