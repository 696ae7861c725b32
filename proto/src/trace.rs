//! Traces across processes, in the W3C Trace Context format (`traceparent`), and the
//! logging set-up every `drover` process shares.
//!
//! A span opened with a `trace_id` field (32 hex digits) starts or continues a trace: an
//! execution's span carries its execution's trace id (kept in the execution record, so a
//! resumed execution continues its trace), and a server's request span carries the
//! caller's, read from the `traceparent` header. Every span below such a span belongs to
//! the same trace ([`TraceLayer`] keeps each span's trace in its extensions). Clients made
//! with [`Inject`] send the current span's trace as `traceparent` on every call, so an
//! agent's spans for an orchestrator's call (and a peer agent's for a replica stream) land
//! under the orchestrator's trace id.
//!
//! Logs are human-readable by default; `--log-format json` prints one JSON object per
//! event with the list of spans it happened in (fields included) and a line as each span
//! closes, so a trace can be followed by its `trace_id` across the processes' logs.

use tracing::Subscriber;
use tracing::span::{Attributes, Id};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;

/// A span's place in a trace: the trace, and the span's own id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: u128,
    pub span_id: u64,
}

impl TraceContext {
    /// The `traceparent` header value (version 00, sampled).
    pub fn traceparent(&self) -> String {
        format!("00-{:032x}-{:016x}-01", self.trace_id, self.span_id)
    }

    /// Parses a `traceparent` value; `None` when malformed or all-zero (W3C: invalid).
    pub fn parse(value: &str) -> Option<Self> {
        let mut parts = value.trim().split('-');
        let (version, trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if version.len() != 2 || version == "ff" || trace.len() != 32 || span.len() != 16 || flags.len() != 2 {
            return None;
        }
        u8::from_str_radix(version, 16).ok()?;
        u8::from_str_radix(flags, 16).ok()?;
        let trace_id = parse_trace_id(trace)?;
        let span_id = u64::from_str_radix(span, 16).ok().filter(|s| *s != 0)?;
        Some(TraceContext { trace_id, span_id })
    }

    /// The trace id as 32 hex digits.
    pub fn trace_hex(&self) -> String {
        format!("{:032x}", self.trace_id)
    }
}

fn parse_trace_id(s: &str) -> Option<u128> {
    if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u128::from_str_radix(s, 16).ok().filter(|t| *t != 0)
}

/// A new random trace id, as 32 hex digits.
pub fn new_trace_id() -> String {
    format!("{:032x}", fastrand::u128(1..))
}

/// Keeps each span's [`TraceContext`]: from its own `trace_id` field, else its parent's
/// trace; a span in no trace gets none.
pub struct TraceLayer;

#[derive(Default)]
struct TraceField(Option<u128>);

impl tracing::field::Visit for TraceField {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "trace_id" {
            self.0 = parse_trace_id(value);
        }
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "trace_id" {
            self.0 = parse_trace_id(format!("{value:?}").trim_matches('"'));
        }
    }
}

impl<S> Layer<S> for TraceLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut own = TraceField::default();
        attrs.record(&mut own);
        let trace_id =
            own.0.or_else(|| span.parent().and_then(|p| p.extensions().get::<TraceContext>().map(|c| c.trace_id)));
        if let Some(trace_id) = trace_id {
            span.extensions_mut().insert(TraceContext { trace_id, span_id: fastrand::u64(1..) });
        }
    }
}

/// The trace of the current span, if it is in one.
pub fn current() -> Option<TraceContext> {
    tracing::Span::current()
        .with_subscriber(|(id, dispatch)| {
            let registry = dispatch.downcast_ref::<tracing_subscriber::Registry>()?;
            let span = registry.span(id)?;
            span.extensions().get::<TraceContext>().copied()
        })
        .flatten()
}

/// A client interceptor that sends the current span's trace as `traceparent`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Inject;

impl tonic::service::Interceptor for Inject {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(ctx) = current()
            && let Ok(v) = ctx.traceparent().parse()
        {
            req.metadata_mut().insert("traceparent", v);
        }
        Ok(req)
    }
}

/// A channel whose calls carry the caller's trace.
pub type Traced = tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Inject>;

/// Calls made every few seconds to watch health (heartbeats, probes, health checks,
/// state reads for metrics and pages): their spans are at debug level, so an info log
/// is not flooded with them (they still carry a trace).
fn routine(rpc: &str) -> bool {
    ["/Heartbeat", "/Probe", "/GetReplicationInfo", "/GetOperation"].iter().any(|m| rpc.ends_with(m))
        || rpc.starts_with("/grpc.health.")
        || rpc.starts_with("/grpc.reflection.")
}

/// The span of one served request (for `Server::trace_fn`): its gRPC method, and the
/// caller's trace when the request carries a valid `traceparent`.
pub fn server_span(req: &http::Request<()>) -> tracing::Span {
    let rpc = req.uri().path();
    let parent = req.headers().get("traceparent").and_then(|v| v.to_str().ok()).and_then(TraceContext::parse);
    macro_rules! span {
        ($level:expr) => {
            match parent {
                Some(p) => tracing::span!(
                    $level,
                    "rpc",
                    rpc,
                    trace_id = %p.trace_hex(),
                    parent_span_id = %format!("{:016x}", p.span_id)
                ),
                None => tracing::span!($level, "rpc", rpc),
            }
        };
    }
    if routine(rpc) { span!(tracing::Level::DEBUG) } else { span!(tracing::Level::INFO) }
}

/// How logs are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line: the event, its spans with their fields, and a line as
    /// each span closes.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("log format {other:?} is not one; use text or json")),
        }
    }
}

/// Sets up logging to stderr: `DROVER_LOG` (an env-filter directive) or `default` picks
/// what is printed; traces are kept for every span whatever is printed, so calls carry
/// their trace even when the log is quiet.
pub fn init(default: &str, format: LogFormat) {
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_from_env("DROVER_LOG").unwrap_or_else(|_| default.into());
    // Traces are Drover's own: the layer asks for Drover's spans only. Unfiltered, it
    // made the registry build every span of every library whatever the log level
    // (h2 opens trace-level spans as it polls each connection): 17% of the
    // orchestrator's CPU samples under a read load, 1.8% after.
    let ours = tracing_subscriber::filter::filter_fn(|m| m.target().starts_with("drover"));
    let registry = tracing_subscriber::registry().with(TraceLayer.with_filter(ours));
    let _ = match format {
        LogFormat::Text => {
            registry.with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_filter(filter)).try_init()
        }
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_span_list(true)
                    .with_current_span(true)
                    .with_span_events(tracing_subscriber::fmt::format::FmtSpan::CLOSE)
                    .with_writer(std::io::stderr)
                    .with_filter(filter),
            )
            .try_init(),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips_and_bad_values_are_refused() {
        let c = TraceContext { trace_id: 0x4bf92f3577b34da6a3ce929d0e0e4736, span_id: 0x00f067aa0ba902b7 };
        assert_eq!(c.traceparent(), "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        assert_eq!(TraceContext::parse(&c.traceparent()), Some(c));
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473x-00f067aa0ba902b7-01",
            "00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceContext::parse(bad), None, "{bad:?}");
        }
        assert_eq!(new_trace_id().len(), 32);
    }

    #[test]
    fn spans_inherit_their_trace_and_calls_carry_it() {
        use tracing_subscriber::prelude::*;
        let subscriber = tracing_subscriber::registry().with(TraceLayer);
        tracing::subscriber::with_default(subscriber, || {
            assert_eq!(current(), None, "no span, no trace");
            let root = tracing::info_span!("execution", trace_id = %"4bf92f3577b34da6a3ce929d0e0e4736");
            let _in_root = root.enter();
            let at_root = current().expect("the root is in its trace");
            assert_eq!(at_root.trace_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
            let child = tracing::info_span!("step", step = "final-sync");
            let _in_child = child.enter();
            let at_child = current().expect("a child is in its parent's trace");
            assert_eq!(at_child.trace_id, at_root.trace_id);
            assert_ne!(at_child.span_id, at_root.span_id, "each span has its own id");
            let mut inject = Inject;
            let req = tonic::service::Interceptor::call(&mut inject, tonic::Request::new(())).unwrap();
            let sent = req.metadata().get("traceparent").unwrap().to_str().unwrap();
            assert_eq!(TraceContext::parse(sent), Some(at_child), "the call carries the current span");
            let elsewhere = tracing::info_span!(parent: None, "unrelated");
            let _in = elsewhere.enter();
            assert_eq!(current(), None, "a root span without a trace id is in no trace");
        });
    }
}
