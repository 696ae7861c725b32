//! The store conformance suite against both implementations: the embedded store and a
//! real etcd started by the harness.

use std::sync::Arc;

use drover_store::{EmbeddedStore, KvStore, Prefixed, conformance};
use drover_tests::{Etcd, fresh_prefix};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_store_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let raw: Arc<dyn KvStore> = Arc::new(EmbeddedStore::open(&dir.path().join("s.redb")).await.unwrap());
    conformance::run_all(|| {
        let raw = raw.clone();
        async move { Arc::new(Prefixed::new(raw, fresh_prefix())) as Arc<dyn KvStore> }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_store_conforms() {
    let etcd = Etcd::start().await;
    conformance::run_all(|| etcd.store()).await;
}

/// Transactions sent at once through one etcd client share etcd transactions (fewer
/// revisions than transactions), each keeping its own outcome; sent one by one
/// (`unbatched`), each has a revision of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_transactions_sent_at_once_share_revisions() {
    use drover_store::{Txn, TxnOp};
    let etcd = Etcd::start().await;
    let connect =
        || drover_store::EtcdStore::connect(std::slice::from_ref(&etcd.endpoint), std::time::Duration::from_secs(5));
    for batched in [true, false] {
        let raw = connect().await.unwrap();
        let raw = if batched { raw } else { raw.unbatched() };
        let store: Arc<dyn KvStore> = Arc::new(Prefixed::new(Arc::new(raw), fresh_prefix()));
        let tasks: Vec<_> = (0..256)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(async move {
                    let txn = Txn::new()
                        .when(drover_store::Compare::Absent(format!("k/{i}").into_bytes()))
                        .and_then(TxnOp::put(format!("k/{i}"), format!("{i}")));
                    store.txn(txn).await.unwrap()
                })
            })
            .collect();
        let mut revisions = std::collections::BTreeSet::new();
        for (i, t) in tasks.into_iter().enumerate() {
            let resp = t.await.unwrap();
            assert!(resp.succeeded, "transaction {i}");
            let kv = store.get(format!("k/{i}").as_bytes()).await.unwrap().unwrap();
            assert_eq!((kv.value, kv.mod_revision), (format!("{i}").into_bytes(), resp.revision));
            revisions.insert(resp.revision);
        }
        println!("256 transactions at once, batched {batched}: {} revisions", revisions.len());
        if batched {
            assert!(revisions.len() < 256, "no two of 256 concurrent transactions shared a commit");
        } else {
            assert_eq!(revisions.len(), 256, "unbatched, each transaction is a commit of its own");
        }
    }
}

/// Reads sent at once through one etcd client (single keys and pages of a range) share
/// etcd requests, each getting its own key's record (or none) or its own page; sent one
/// by one (`unbatched`), each is a request of its own.
/// Records too large to share one reply (etcd-client takes 4 MiB at most) still come
/// back whole: a batch that fails is read again one key at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_reads_sent_at_once_share_requests() {
    let etcd = Etcd::start().await;
    let connect =
        || drover_store::EtcdStore::connect(std::slice::from_ref(&etcd.endpoint), std::time::Duration::from_secs(5));
    let requests = || {
        let h = etcd.handled_requests();
        h.get("Range").copied().unwrap_or(0.0) + h.get("Txn").copied().unwrap_or(0.0)
    };
    let prefix = fresh_prefix();
    let store: Arc<dyn KvStore> = Arc::new(Prefixed::new(Arc::new(connect().await.unwrap()), prefix.clone()));
    // 192 small records, 64 keys never written, and 8 records of 900 KiB (7 MiB together).
    let value = |i: usize| if i >= 256 { vec![i as u8; 900 << 10] } else { format!("v{i}").into_bytes() };
    for i in (0..192).chain(256..264) {
        store.put(format!("k/{i}").as_bytes(), &value(i)).await.unwrap();
    }
    for batched in [true, false] {
        let raw = connect().await.unwrap();
        let raw = if batched { raw } else { raw.unbatched() };
        let reader: Arc<dyn KvStore> = Arc::new(Prefixed::new(Arc::new(raw), prefix.clone()));
        let before = requests();
        let tasks: Vec<_> = (0..264)
            .map(|i| {
                let reader = reader.clone();
                tokio::spawn(async move { (i, reader.get(format!("k/{i}").as_bytes()).await.unwrap()) })
            })
            .collect();
        // And pages of the range, at the same time: 5 keys after each of 32 small ones.
        let pages: Vec<_> = (0..32)
            .map(|i| {
                let reader = reader.clone();
                tokio::spawn(
                    async move { (i, reader.range_page(b"k/", format!("k/{i}").as_bytes(), 5).await.unwrap()) },
                )
            })
            .collect();
        for t in tasks {
            let (i, kv) = t.await.unwrap();
            match kv {
                Some(kv) => {
                    assert!(!(192..256).contains(&i), "key {i} was never written");
                    assert_eq!(kv.value, value(i), "key {i}");
                }
                None => assert!((192..256).contains(&i), "key {i} was written"),
            }
        }
        let mut written: Vec<String> = (0..192).chain(256..264).map(|i| format!("k/{i}")).collect();
        written.sort();
        for t in pages {
            let (i, page) = t.await.unwrap();
            let at = written.iter().position(|k| *k == format!("k/{i}")).unwrap();
            let want: Vec<&[u8]> = written[at + 1..at + 6].iter().map(|k| k.as_bytes()).collect();
            let got: Vec<&[u8]> = page.kvs.iter().map(|kv| kv.key.as_slice()).collect();
            assert_eq!((got, page.more), (want, true), "the page after k/{i}");
        }
        let sent = requests() - before;
        println!("264 reads and 32 pages at once, batched {batched}: {sent} etcd requests");
        if batched {
            assert!(sent < 200.0, "296 concurrent reads took {sent} requests");
        } else {
            assert!(sent >= 296.0, "unbatched, each read is a request of its own: {sent}");
        }
    }
}

/// What `store_writers` acknowledged before it (or its store) was killed: per writer, the
/// highest write it printed. The writers run until `acks` writes were acknowledged, then
/// `crash` kills; lines printed before the kill are read to the end.
fn acknowledged_before_a_crash(args: &[&str], acks: usize, crash: impl FnOnce(&mut std::process::Child)) -> Vec<u64> {
    use std::io::BufRead;
    let bin = drover_tests::cluster::locate_bin("store_writers").expect("store_writers is built");
    let mut child = std::process::Command::new(bin)
        .args(args)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("store_writers starts");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut last = vec![0u64; 32];
    let mut seen = 0;
    let mut take = |line: String| {
        let mut f = line.split_whitespace().skip(1).map(|v| v.parse::<u64>().unwrap());
        let (w, n) = (f.next().unwrap() as usize, f.next().unwrap());
        assert_eq!(n, last[w] + 1, "writer {w} acknowledged {n} after {}", last[w]);
        last[w] = n;
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while seen < acks {
        let line = rx.recv_timeout(deadline - std::time::Instant::now()).expect("the writers acknowledge writes");
        take(line);
        seen += 1;
    }
    crash(&mut child);
    let _ = child.kill();
    let _ = child.wait();
    reader.join().unwrap();
    for line in rx.try_iter() {
        take(line);
    }
    last
}

/// Every acknowledged write is in `store`: each writer's counter at least at its last
/// acknowledged write, and each acknowledged write's own key present.
async fn every_acknowledged_write_is_there(store: &dyn KvStore, last: &[u64]) {
    for (w, &n) in last.iter().enumerate() {
        let counter = store.get(format!("counter/{w:02}").as_bytes()).await.unwrap();
        let at: u64 = counter.map_or(0, |kv| String::from_utf8(kv.value).unwrap().parse().unwrap());
        assert!(at >= n, "writer {w}: write {n} was acknowledged, the counter is at {at}");
        let (written, _) = store.range(format!("written/{w:02}/").as_bytes()).await.unwrap();
        assert!(written.len() as u64 >= n, "writer {w}: {n} writes acknowledged, {} kept", written.len());
    }
}

/// 32 writers commit concurrently to the embedded store (sharing commits), and the
/// process holding the store is SIGKILLed mid-stream: every write it acknowledged is
/// there when the store is opened again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_store_keeps_every_acknowledged_concurrent_write_across_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let last = acknowledged_before_a_crash(&["embedded", path.to_str().unwrap()], 3_000, |child| {
        let _ = child.kill();
    });
    let store = EmbeddedStore::open(&path).await.unwrap();
    every_acknowledged_write_is_there(&store, &last).await;
    println!("embedded crash: {} acknowledged writes, all kept", last.iter().sum::<u64>());
}

/// The same against etcd: etcd itself is SIGKILLed while the writers run, then restarted
/// on its data dir.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_keeps_every_acknowledged_concurrent_write_across_a_crash() {
    let mut etcd = Etcd::start().await;
    let prefix = fresh_prefix();
    let last = acknowledged_before_a_crash(&["etcd", &etcd.endpoint.clone(), &prefix], 3_000, |_| etcd.kill());
    etcd.restart().await;
    let raw = drover_store::EtcdStore::connect(std::slice::from_ref(&etcd.endpoint), std::time::Duration::from_secs(5))
        .await
        .unwrap();
    let store = Prefixed::new(Arc::new(raw), prefix);
    every_acknowledged_write_is_there(&store, &last).await;
    println!("etcd crash: {} acknowledged writes, all kept", last.iter().sum::<u64>());
}

/// 32 threads admit and record operations in an agent ledger (sharing commits, the log
/// compacted once past 256 KiB and four times the state), and the process is SIGKILLed
/// mid-stream, just after a compaction replaced the log: when the ledger is opened again
/// every acknowledged operation has its outcome and its epoch, and none is left started.
#[test]
fn the_agent_ledger_keeps_every_acknowledged_operation_across_a_crash() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.log");
    let inode = || std::fs::metadata(&path).map(|m| m.ino()).ok();
    let last = acknowledged_before_a_crash(&["ledger", path.to_str().unwrap(), "262144"], 3_000, |child| {
        // A compaction renames a new file over the log; wait for one, then kill.
        let before = inode();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while inode() == before {
            assert!(std::time::Instant::now() < deadline, "no compaction within a minute");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        std::thread::sleep(std::time::Duration::from_millis(fastrand::u64(..20)));
        let _ = child.kill();
    });
    let ledger = drover_agent::ledger::Ledger::open(&path).unwrap();
    for (w, &n) in last.iter().enumerate() {
        assert!(ledger.highest_epoch(&format!("volume/{w}")).unwrap() >= n, "writer {w}: epoch {n} lost");
        for i in 1..=n {
            let op = format!("op-{w}-{i}");
            let outcome = ledger.outcome(&op).unwrap().unwrap_or_else(|| panic!("{op} was acknowledged and is lost"));
            assert_eq!(outcome.response, i.to_le_bytes().to_vec(), "{op}");
            assert!(!ledger.was_interrupted(&op).unwrap(), "{op}");
        }
    }
    let size = std::fs::metadata(&path).unwrap().len();
    println!("ledger crash: {} acknowledged operations, all kept; log {size} bytes", last.iter().sum::<u64>());
}
