//! The caller's deadline (gRPC's `grpc-timeout` header). A call that waits for an
//! execution answers before it passes, naming the execution, which goes on; otherwise the
//! server would cut the call off at the deadline with a bare "Timeout expired".

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

tokio::task_local! {
    static DEADLINE: Instant;
}

/// The deadline a `grpc-timeout` value sets (`<1-8 digits><H|M|S|m|u|n>`), from now.
pub fn parse(value: &str) -> Option<Duration> {
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The time a request's `grpc-timeout` header gives it, if any.
pub fn of(headers: &http::HeaderMap) -> Option<Duration> {
    headers.get("grpc-timeout").and_then(|v| v.to_str().ok()).and_then(parse)
}

/// Runs `f` with a deadline `timeout` from now, if any, visible to [`patience`].
pub async fn scope<F: Future>(timeout: Option<Duration>, f: F) -> F::Output {
    match timeout {
        Some(d) => DEADLINE.scope(Instant::now() + d, f).await,
        None => f.await,
    }
}

/// How long the current call may still wait before it must answer: the time left to its
/// deadline less a margin for the answer to travel (a tenth of what is left, at most one
/// second). `None` without a deadline.
pub fn patience() -> Option<Duration> {
    let left = DEADLINE.try_with(|d| d.saturating_duration_since(Instant::now())).ok()?;
    Some(left - (left / 10).min(Duration::from_secs(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_values_parse() {
        assert_eq!(parse("60S"), Some(Duration::from_secs(60)));
        assert_eq!(parse("1500m"), Some(Duration::from_millis(1500)));
        assert_eq!(parse("2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse("99999999n"), Some(Duration::from_nanos(99_999_999)));
        for bad in ["", "S", "123456789S", "10x", "-1S", "1.5S"] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }

    #[tokio::test]
    async fn patience_leaves_a_margin_inside_the_deadline() {
        assert_eq!(patience(), None, "no deadline outside a call");
        let mut h = http::HeaderMap::new();
        h.insert("grpc-timeout", "20S".parse().unwrap());
        let p = scope(of(&h), async { patience() }).await.unwrap();
        assert!(p <= Duration::from_secs(19) && p > Duration::from_secs(18), "{p:?}");
        h.insert("grpc-timeout", "500m".parse().unwrap());
        let p = scope(of(&h), async { patience() }).await.unwrap();
        assert!(p <= Duration::from_millis(450) && p > Duration::from_millis(400), "{p:?}");
    }
}
