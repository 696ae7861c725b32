//! Compute sides reached by webhook: every call is signed (HMAC-SHA256 of the body), each
//! notified execution is announced once when it starts and once when it ends, a 5xx is
//! retried (once here) and a 4xx is not.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use drover_proto::v1 as pb;
use drover_tests::{Cluster, StoreChoice, replicated_group};
use hmac::{Hmac, Mac};
use sha2::Sha256;

const SECRET: &str = "correct horse battery staple";

#[derive(Debug, Clone)]
struct Seen {
    delivery: String,
    call: String,
    signed: bool,
    body: serde_json::Value,
    answered: u16,
}

#[derive(Default)]
struct Receiver {
    seen: Mutex<Vec<Seen>>,
    /// Deliveries already answered with a 500 (each gets one).
    failed_once: Mutex<Vec<String>>,
}

fn verify(headers: &HeaderMap, body: &[u8]) -> bool {
    let Some(sig) = headers.get("x-drover-signature").and_then(|v| v.to_str().ok()) else { return false };
    let Some(hex) = sig.strip_prefix("sha256=") else { return false };
    let Ok(given) = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2).unwrap_or("zz"), 16))
        .collect::<Result<Vec<u8>, _>>()
    else {
        return false;
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(body);
    mac.verify_slice(&given).is_ok()
}

async fn hook(
    axum::extract::State(rx): axum::extract::State<Arc<Receiver>>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let header = |h: &str| headers.get(h).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let signed = verify(&headers, &body);
    let delivery = header("x-drover-delivery");
    let req = &json["request"];
    // The first execution start of a group transition gets a 500, once; a notify step
    // whose message asks for it gets a 400.
    let status = if !signed {
        StatusCode::UNAUTHORIZED
    } else if req["summary"].as_str().is_some_and(|s| s.contains("answer 400")) {
        StatusCode::BAD_REQUEST
    } else if req["event"] == "execution.started" && req["kind"] == "group-transition" && {
        let mut failed = rx.failed_once.lock().unwrap();
        let first = failed.is_empty();
        if first {
            failed.push(delivery.clone());
        }
        first
    } {
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        StatusCode::OK
    };
    rx.seen.lock().unwrap().push(Seen {
        delivery,
        call: header("x-drover-call"),
        signed,
        body: json,
        answered: status.as_u16(),
    });
    status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_calls_are_signed_announced_once_and_retried_only_on_server_errors() {
    let rx = Arc::new(Receiver::default());
    let app = axum::Router::new().route("/hook", axum::routing::post(hook)).with_state(rx.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let secrets = tempfile::tempdir().unwrap();
    let secret = secrets.path().join("hook.secret");
    std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
    let url = format!("compute.site-b.url=http://{addr}/hook");
    let secret_file = format!("compute.site-b.secret_file={}", secret.display());
    let orch = [
        "--set",
        "compute.site-b.kind=webhook",
        "--set",
        &url,
        "--set",
        &secret_file,
        "--set",
        "compute.site-b.retries=3",
    ];
    let cluster = Cluster::start_custom(StoreChoice::Embedded, "mock", &[], &orch).await;
    let mut c = cluster.clients().await;

    // A group enable and a failover: two group transitions, each announced.
    replicated_group(&mut c, "app", 2).await;
    let r = c
        .replication
        .failover_group(pb::FailoverGroupRequest {
            group: "app".into(),
            project: "tests".into(),
            target_backend: "backend-b".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let g = r.group.expect("the group after the failover");
    assert_eq!(g.active_backend, "backend-b", "{g:?}");

    // A runbook: its own start and end, a notify step, and a notify step answered 400.
    let runbook = "name: tell\nsteps:\n  - notify:\n      name: hello\n      message: site B is serving\n  - notify:\n      \
                   name: refused\n      message: please answer 400\n      continue_on_error: true\n";
    let e = c
        .runbooks
        .run_runbook(pb::RunbookRequest {
            file_name: "tell.yaml".into(),
            text: runbook.into(),
            params: Default::default(),
        })
        .await
        .unwrap()
        .into_inner();
    let deadline = Instant::now() + Duration::from_secs(30);
    let run = loop {
        let now = c.executions.get_execution(pb::GetExecutionRequest { id: e.id.clone() }).await.unwrap().into_inner();
        if now.status != "running" {
            break now;
        }
        assert!(Instant::now() < deadline, "the runbook never ended");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(run.status, "succeeded", "{}", run.error);
    let state: serde_json::Value = serde_json::from_str(&run.state_json).unwrap();
    assert_eq!(state["steps"][0]["items"][0]["status"], "succeeded");
    assert_eq!(state["steps"][1]["status"], "failed");
    assert!(state["steps"][1]["items"][0]["reason"].as_str().unwrap().contains("400"), "{state}");

    // Every execution that ended has been announced (notifications are sent in the
    // background): wait for the last one, the runbook's end.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !rx.seen.lock().unwrap().iter().any(|s| {
        s.body["request"]["event"] == "execution.finished" && s.body["request"]["execution_id"] == e.id.as_str()
    }) {
        assert!(Instant::now() < deadline, "the runbook's end was never announced");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let seen = rx.seen.lock().unwrap().clone();
    assert!(seen.iter().all(|s| s.signed), "an unsigned or badly signed call: {seen:?}");
    assert!(seen.iter().all(|s| s.call == "notify"), "{seen:?}");

    // Per execution and event: one delivery, answered 200 in the end.
    let mut deliveries: HashMap<(String, String), Vec<&Seen>> = HashMap::new();
    for s in seen.iter().filter(|s| s.body["request"]["event"].as_str().is_some_and(|e| e.starts_with("execution."))) {
        let r = &s.body["request"];
        let key = (r["execution_id"].as_str().unwrap().to_string(), r["event"].as_str().unwrap().to_string());
        deliveries.entry(key).or_default().push(s);
    }
    let executions: std::collections::BTreeSet<&str> = deliveries.keys().map(|(e, _)| e.as_str()).collect();
    assert_eq!(executions.len(), 3, "the enable, the failover and the runbook: {:?}", deliveries.keys());
    for ((exec, event), list) in &deliveries {
        let ids: std::collections::BTreeSet<&str> = list.iter().map(|s| s.delivery.as_str()).collect();
        assert_eq!(ids.len(), 1, "{exec} {event} delivered more than once: {list:?}");
        assert_eq!(list.last().unwrap().answered, 200, "{exec} {event}: {list:?}");
    }
    for exec in &executions {
        for event in ["execution.started", "execution.finished"] {
            assert!(deliveries.contains_key(&(exec.to_string(), event.to_string())), "{exec}: no {event}");
        }
    }
    // The 500 was retried once, with the same delivery id; the 400 was not retried.
    let failed = rx.failed_once.lock().unwrap().clone();
    assert_eq!(failed.len(), 1);
    let attempts: Vec<u16> = seen.iter().filter(|s| s.delivery == failed[0]).map(|s| s.answered).collect();
    assert_eq!(attempts, [500, 200]);
    let refused: Vec<&Seen> = seen.iter().filter(|s| s.answered == 400).collect();
    assert_eq!(refused.len(), 1, "a 400 is not retried: {refused:?}");
    let finished = &deliveries[&(e.id.clone(), "execution.finished".to_string())][0].body["request"];
    assert_eq!((finished["status"].as_str(), finished["kind"].as_str()), (Some("succeeded"), Some("runbook")));
    assert!(finished["report"].as_str().unwrap().contains(&e.id));
}
