//! Concurrent writers for the store's crash test (`tests/tests/store_conformance.rs`).
//!
//! `store_writers embedded PATH` or `store_writers etcd ENDPOINT PREFIX`: 32 writers,
//! each a loop of one transaction that compares its counter key's mod revision with
//! the one it last wrote and, if it still holds, sets the counter to `n` and puts a key
//! of its own for `n`. After each acknowledged transaction it prints `ack W N` (one
//! line, flushed), so a test that kills this process (or the store) knows exactly which
//! writes were acknowledged. It runs until killed.
//!
//! `store_writers ledger PATH COMPACT_BYTES` does the same to an agent ledger: each
//! writer admits op `op-W-N` at epoch N for scope `volume/W` and records its outcome,
//! then prints `ack W N`; the log is compacted whenever it passes COMPACT_BYTES.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use drover_store::{Compare, EmbeddedStore, EtcdStore, KvStore, Prefixed, Txn, TxnOp};

const WRITERS: usize = 32;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("ledger") && args.len() == 3 {
        let compact = args[2].parse().expect("COMPACT_BYTES is a number");
        let ledger = drover_agent::ledger::Ledger::open_compacting_at(std::path::Path::new(&args[1]), compact)
            .expect("open the ledger");
        return ledger_writers(ledger);
    }
    let store: Arc<dyn KvStore> = match args.first().map(String::as_str) {
        Some("embedded") if args.len() == 2 => {
            Arc::new(EmbeddedStore::open(std::path::Path::new(&args[1])).await.expect("open the embedded store"))
        }
        Some("etcd") if args.len() == 3 => {
            let raw = EtcdStore::connect(&[args[1].clone()], Duration::from_secs(5)).await.expect("connect etcd");
            Arc::new(Prefixed::new(Arc::new(raw), args[2].clone()))
        }
        _ => {
            eprintln!(
                "usage: store_writers embedded PATH | store_writers etcd ENDPOINT PREFIX | store_writers ledger PATH COMPACT_BYTES"
            );
            std::process::exit(2);
        }
    };
    let out = Arc::new(std::sync::Mutex::new(std::io::stdout()));
    let mut set = tokio::task::JoinSet::new();
    for w in 0..WRITERS {
        let (store, out) = (store.clone(), out.clone());
        set.spawn(async move {
            let counter = format!("counter/{w:02}");
            let mut last = 0;
            for n in 1u64.. {
                let txn = Txn::new()
                    .when(Compare::ModRevisionEquals(counter.clone().into_bytes(), last))
                    .and_then(TxnOp::put(counter.clone(), n.to_string()))
                    .and_then(TxnOp::put(format!("written/{w:02}/{n:08}"), vec![7u8; 256]));
                match store.txn(txn).await {
                    Ok(r) if r.succeeded => {
                        last = r.revision;
                        let mut out = out.lock().expect("stdout");
                        let _ = writeln!(out, "ack {w} {n}");
                        let _ = out.flush();
                    }
                    Ok(_) => panic!("writer {w}: its own counter changed under it at {n}"),
                    // The store is away (killed by the test): the outcome is unknown, so
                    // this writer stops without claiming the write.
                    Err(_) => return,
                }
            }
        });
    }
    while set.join_next().await.is_some() {}
}

/// The ledger's writers: threads, since the ledger's calls block.
fn ledger_writers(ledger: drover_agent::ledger::Ledger) {
    use drover_agent::ledger::{Admission, Outcome};
    let out = Arc::new(std::sync::Mutex::new(std::io::stdout()));
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (ledger, out) = (ledger.clone(), out.clone());
            std::thread::spawn(move || {
                for n in 1u64.. {
                    let op = format!("op-{w}-{n}");
                    match ledger.admit_blocking(&format!("volume/{w}"), n, &op) {
                        Ok(Admission::Run) => {}
                        Ok(other) => panic!("writer {w}: {op} admitted as {other:?}"),
                        Err(e) => panic!("writer {w}: {e}"),
                    }
                    let outcome = Outcome { code: 0, message: String::new(), response: n.to_le_bytes().to_vec() };
                    ledger.record_blocking(&op, &outcome).unwrap_or_else(|e| panic!("writer {w}: {e}"));
                    let mut out = out.lock().expect("stdout");
                    let _ = writeln!(out, "ack {w} {n}");
                    let _ = out.flush();
                }
            })
        })
        .collect();
    for w in writers {
        let _ = w.join();
    }
}
