//! The conformance suite every [`KvStore`] implementation must pass.
//!
//! Each case takes a fresh, empty store (usually a [`crate::Prefixed`] view with a unique
//! prefix) and panics with a message on a violation. [`run_all`] runs every case; test
//! crates call it once per implementation.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use crate::{Compare, KvStore, StoreError, Txn, TxnOp, WatchEvent};

/// Runs every case, each against a store from `fresh`.
pub async fn run_all<F, Fut>(fresh: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn KvStore>>,
{
    revisions_follow_etcd(fresh().await).await;
    range_returns_only_the_prefix_in_key_order(fresh().await).await;
    pages_cover_the_prefix_once_in_order(fresh().await).await;
    a_range_larger_than_one_reply_is_read_whole(fresh().await).await;
    txn_compares_mod_revision(fresh().await).await;
    txn_compares_value_and_absence(fresh().await).await;
    failed_txn_applies_failure_ops_only(fresh().await).await;
    deletes_remove_keys_and_prefixes(fresh().await).await;
    concurrent_cas_loses_no_update(fresh().await).await;
    concurrent_transactions_keep_their_own_outcomes(fresh().await).await;
    a_refused_transaction_fails_alone(fresh().await).await;
    lease_revoke_deletes_bound_keys(fresh().await).await;
    lease_expires_without_keepalive(fresh().await).await;
    keepalive_extends_lease(fresh().await).await;
    unknown_lease_is_refused(fresh().await).await;
    watch_replays_from_revision_then_follows(fresh().await).await;
    a_watch_replays_more_history_than_one_reply_holds(fresh().await).await;
}

/// Create and mod revisions and versions behave as in etcd.
pub async fn revisions_follow_etcd(store: Arc<dyn KvStore>) {
    assert!(store.get(b"k").await.unwrap().is_none(), "a fresh store has no key k");
    let r1 = store.put(b"k", b"v1").await.unwrap();
    let kv = store.get(b"k").await.unwrap().expect("k after put");
    assert_eq!(kv.value, b"v1");
    assert_eq!(kv.create_revision, r1);
    assert_eq!(kv.mod_revision, r1);
    assert_eq!(kv.version, 1);
    let r2 = store.put(b"k", b"v2").await.unwrap();
    assert!(r2 > r1, "revision must grow: {r1} then {r2}");
    let kv = store.get(b"k").await.unwrap().expect("k after second put");
    assert_eq!((kv.create_revision, kv.mod_revision, kv.version), (r1, r2, 2));
    let (_, read_rev) = store.range(b"").await.unwrap();
    assert!(read_rev >= r2, "range revision {read_rev} is older than the last write {r2}");
}

/// Prefix range excludes siblings that share a shorter prefix.
pub async fn range_returns_only_the_prefix_in_key_order(store: Arc<dyn KvStore>) {
    for key in ["a/2", "a/1", "a/3", "ab", "b/1"] {
        store.put(key.as_bytes(), b"x").await.unwrap();
    }
    let (kvs, _) = store.range(b"a/").await.unwrap();
    let keys: Vec<_> = kvs.iter().map(|kv| String::from_utf8_lossy(&kv.key).into_owned()).collect();
    assert_eq!(keys, ["a/1", "a/2", "a/3"]);
}

/// Pages of any size read every key under the prefix exactly once, in order, and say
/// whether more follow; a marker past the prefix, or a page of a missing prefix, is empty.
pub async fn pages_cover_the_prefix_once_in_order(store: Arc<dyn KvStore>) {
    let keys: Vec<String> = (0..23).map(|i| format!("p/{i:03}")).collect();
    for k in keys.iter().rev() {
        store.put(k.as_bytes(), b"x").await.unwrap();
    }
    for k in ["o/1", "p", "pa/1", "q/1"] {
        store.put(k.as_bytes(), b"y").await.unwrap();
    }
    for size in [1, 5, 23, 100] {
        let (mut seen, mut after) = (Vec::new(), Vec::new());
        loop {
            let page = store.range_page(b"p/", &after, size).await.unwrap();
            assert!(page.kvs.len() <= size, "a page of {size} holds {}", page.kvs.len());
            seen.extend(page.kvs.iter().map(|kv| String::from_utf8_lossy(&kv.key).into_owned()));
            match page.kvs.last() {
                Some(last) if page.more => after = last.key.clone(),
                _ => break,
            }
        }
        assert_eq!(seen, keys, "pages of {size}");
    }
    let page = store.range_page(b"p/", b"p/022", 10).await.unwrap();
    assert!(page.kvs.is_empty() && !page.more, "{page:?}");
    let page = store.range_page(b"z/", b"", 10).await.unwrap();
    assert!(page.kvs.is_empty() && !page.more);
}

/// A prefix holding more than one gRPC reply may carry (4 MiB) is read whole, in order:
/// 1,200 records of 4 KiB, as a large deployment's groups would be.
pub async fn a_range_larger_than_one_reply_is_read_whole(store: Arc<dyn KvStore>) {
    let value = vec![b'g'; 4096];
    let keys: Vec<String> = (0..1200).map(|i| format!("big/{i:05}")).collect();
    for chunk in keys.chunks(100) {
        let txn = chunk.iter().fold(Txn::new(), |t, k| t.and_then(TxnOp::put(k.as_bytes(), value.clone())));
        store.txn(txn).await.unwrap();
    }
    let (kvs, _) = store.range(b"big/").await.expect("a range past 4 MiB is read");
    let got: Vec<String> = kvs.iter().map(|kv| String::from_utf8_lossy(&kv.key).into_owned()).collect();
    assert_eq!(got, keys);
    assert!(kvs.iter().all(|kv| kv.value.len() == 4096));
}

/// A compare on mod_revision lets exactly the writer that read the current revision win.
pub async fn txn_compares_mod_revision(store: Arc<dyn KvStore>) {
    let rev = store.put(b"state", b"enabled").await.unwrap();
    let cas = |expected: i64, value: &'static [u8]| {
        Txn::new()
            .when(Compare::ModRevisionEquals(b"state".to_vec(), expected))
            .and_then(TxnOp::put(&b"state"[..], value))
    };
    let won = store.txn(cas(rev, b"failing-over")).await.unwrap();
    assert!(won.succeeded, "CAS on the current revision must succeed");
    let lost = store.txn(cas(rev, b"failing-over-again")).await.unwrap();
    assert!(!lost.succeeded, "CAS on a stale revision must fail");
    assert_eq!(store.get(b"state").await.unwrap().unwrap().value, b"failing-over");
    let absent = store.txn(cas(0, b"x")).await.unwrap();
    assert!(!absent.succeeded, "mod_revision 0 means absent, and the key exists");
}

/// Value and absence compares.
pub async fn txn_compares_value_and_absence(store: Arc<dyn KvStore>) {
    assert!(store.create(b"name", b"one").await.unwrap(), "first create wins");
    assert!(!store.create(b"name", b"two").await.unwrap(), "second create must lose");
    assert_eq!(store.get(b"name").await.unwrap().unwrap().value, b"one");
    let txn = Txn::new()
        .when(Compare::ValueEquals(b"name".to_vec(), b"one".to_vec()))
        .and_then(TxnOp::put(&b"name"[..], &b"three"[..]));
    assert!(store.txn(txn).await.unwrap().succeeded);
    let txn = Txn::new()
        .when(Compare::ValueEquals(b"name".to_vec(), b"one".to_vec()))
        .and_then(TxnOp::put(&b"name"[..], &b"four"[..]));
    assert!(!store.txn(txn).await.unwrap().succeeded, "value compare against a replaced value must fail");
    let txn = Txn::new().when(Compare::Exists(b"missing".to_vec())).and_then(TxnOp::put(&b"missing"[..], &b"x"[..]));
    assert!(!store.txn(txn).await.unwrap().succeeded);
    assert!(store.get(b"missing").await.unwrap().is_none());
}

/// A failed transaction applies its failure ops and none of its success ops, atomically.
pub async fn failed_txn_applies_failure_ops_only(store: Arc<dyn KvStore>) {
    let before = store.put(b"guard", b"1").await.unwrap();
    let txn = Txn::new()
        .when(Compare::ValueEquals(b"guard".to_vec(), b"2".to_vec()))
        .and_then(TxnOp::put(&b"s1"[..], &b"x"[..]))
        .and_then(TxnOp::put(&b"s2"[..], &b"x"[..]))
        .or_else(TxnOp::put(&b"f"[..], &b"y"[..]));
    let resp = store.txn(txn).await.unwrap();
    assert!(!resp.succeeded);
    assert!(resp.revision > before, "the failure op wrote, so the revision grows");
    assert!(store.get(b"s1").await.unwrap().is_none());
    assert!(store.get(b"s2").await.unwrap().is_none());
    assert_eq!(store.get(b"f").await.unwrap().unwrap().mod_revision, resp.revision);
    // Several keys written by one transaction share one revision.
    let resp = store
        .txn(Txn::new().and_then(TxnOp::put(&b"m1"[..], &b"x"[..])).and_then(TxnOp::put(&b"m2"[..], &b"x"[..])))
        .await
        .unwrap();
    let m1 = store.get(b"m1").await.unwrap().unwrap();
    let m2 = store.get(b"m2").await.unwrap().unwrap();
    assert_eq!((m1.mod_revision, m2.mod_revision), (resp.revision, resp.revision));
}

/// Deletes of single keys and of prefixes.
pub async fn deletes_remove_keys_and_prefixes(store: Arc<dyn KvStore>) {
    for key in ["d/1", "d/2", "e/1"] {
        store.put(key.as_bytes(), b"x").await.unwrap();
    }
    store.delete(b"e/1").await.unwrap();
    assert!(store.get(b"e/1").await.unwrap().is_none());
    store.txn(Txn::new().and_then(TxnOp::DeletePrefix { prefix: b"d/".to_vec() })).await.unwrap();
    assert!(store.range(b"d/").await.unwrap().0.is_empty());
    // A recreated key starts a new life: version 1 and a new create revision.
    let rev = store.put(b"e/1", b"again").await.unwrap();
    let kv = store.get(b"e/1").await.unwrap().unwrap();
    assert_eq!((kv.version, kv.create_revision), (1, rev));
}

/// 16 tasks increment one counter by compare-and-swap; no increment is lost.
pub async fn concurrent_cas_loses_no_update(store: Arc<dyn KvStore>) {
    store.put(b"counter", b"0").await.unwrap();
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                for _ in 0..5 {
                    loop {
                        let kv = store.get(b"counter").await.unwrap().unwrap();
                        let n: u64 = String::from_utf8_lossy(&kv.value).parse().unwrap();
                        let txn = Txn::new()
                            .when(Compare::ModRevisionEquals(b"counter".to_vec(), kv.mod_revision))
                            .and_then(TxnOp::put(&b"counter"[..], (n + 1).to_string().into_bytes()));
                        if store.txn(txn).await.unwrap().succeeded {
                            break;
                        }
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(store.get(b"counter").await.unwrap().unwrap().value, b"80");
}

/// 64 transactions at once, each over keys of its own, every other one with a comparison
/// that fails: each gets its own outcome and the store holds what each applied (a store
/// that commits concurrent transactions together must keep them apart).
pub async fn concurrent_transactions_keep_their_own_outcomes(store: Arc<dyn KvStore>) {
    for i in (0..64).step_by(2) {
        store.put(format!("guard/{i}").as_bytes(), b"yes").await.unwrap();
    }
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                let txn = Txn::new()
                    .when(Compare::Exists(format!("guard/{i}").into_bytes()))
                    .and_then(TxnOp::put(format!("out/{i}").into_bytes(), &b"success"[..]))
                    .and_then(TxnOp::delete(format!("guard/{i}").into_bytes()))
                    .or_else(TxnOp::put(format!("out/{i}").into_bytes(), &b"failure"[..]));
                (i, store.txn(txn).await.unwrap())
            })
        })
        .collect();
    for t in tasks {
        let (i, resp) = t.await.unwrap();
        assert_eq!(resp.succeeded, i % 2 == 0, "transaction {i}: its own comparison decides");
        let out = store.get(format!("out/{i}").as_bytes()).await.unwrap().expect("each wrote its key");
        let expected: &[u8] = if i % 2 == 0 { b"success" } else { b"failure" };
        assert_eq!(out.value, expected, "transaction {i} applied its own branch");
        assert_eq!(out.mod_revision, resp.revision, "transaction {i}'s revision is its write's");
        assert!(store.get(format!("guard/{i}").as_bytes()).await.unwrap().is_none(), "guard {i} is gone or never was");
    }
}

/// Of transactions sent at once, one the store refuses (it binds a key to a lease that
/// does not exist) fails, and only that one.
pub async fn a_refused_transaction_fails_alone(store: Arc<dyn KvStore>) {
    let tasks: Vec<_> = (0..32)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                let lease = if i == 7 { 987_654_321 } else { 0 };
                (i, store.txn(Txn::new().and_then(TxnOp::put_with_lease(format!("r/{i}"), &b"x"[..], lease))).await)
            })
        })
        .collect();
    for t in tasks {
        let (i, resp) = t.await.unwrap();
        let kept = store.get(format!("r/{i}").as_bytes()).await.unwrap();
        if i == 7 {
            assert!(resp.is_err(), "the put bound to a missing lease must fail: {resp:?}");
            assert!(kept.is_none());
        } else {
            let resp = resp.unwrap_or_else(|e| panic!("transaction {i} failed with the refused one: {e}"));
            assert_eq!(kept.expect("its key is there").mod_revision, resp.revision);
        }
    }
}

/// Revoking a lease deletes the keys bound to it, and only those.
pub async fn lease_revoke_deletes_bound_keys(store: Arc<dyn KvStore>) {
    let lease = store.grant_lease(30).await.unwrap();
    store.txn(Txn::new().and_then(TxnOp::put_with_lease(&b"live/a"[..], &b"x"[..], lease))).await.unwrap();
    store.put(b"live/b", b"unbound").await.unwrap();
    assert_eq!(store.get(b"live/a").await.unwrap().unwrap().lease, lease);
    store.revoke_lease(lease).await.unwrap();
    assert!(store.get(b"live/a").await.unwrap().is_none(), "bound key must go with its lease");
    assert!(store.get(b"live/b").await.unwrap().is_some(), "unbound key must stay");
    let ka = store.keep_alive(lease).await;
    assert!(matches!(ka, Err(StoreError::LeaseNotFound(_))), "keepalive of a revoked lease: {ka:?}");
}

/// A lease nobody keeps alive expires and takes its keys.
pub async fn lease_expires_without_keepalive(store: Arc<dyn KvStore>) {
    let lease = store.grant_lease(2).await.unwrap();
    store.txn(Txn::new().and_then(TxnOp::put_with_lease(&b"ttl/a"[..], &b"x"[..], lease))).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while store.get(b"ttl/a").await.unwrap().is_some() {
        assert!(tokio::time::Instant::now() < deadline, "key bound to a 2 s lease still there after 15 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Keepalives hold a lease past its TTL.
pub async fn keepalive_extends_lease(store: Arc<dyn KvStore>) {
    let lease = store.grant_lease(2).await.unwrap();
    store.txn(Txn::new().and_then(TxnOp::put_with_lease(&b"ka/a"[..], &b"x"[..], lease))).await.unwrap();
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(store.keep_alive(lease).await.unwrap() > 0);
    }
    assert!(store.get(b"ka/a").await.unwrap().is_some(), "kept-alive key vanished after 4 s");
    store.revoke_lease(lease).await.unwrap();
}

/// Keepalive on, or put with, a lease that does not exist fails.
pub async fn unknown_lease_is_refused(store: Arc<dyn KvStore>) {
    let ka = store.keep_alive(987_654_321).await;
    assert!(matches!(ka, Err(StoreError::LeaseNotFound(_))), "{ka:?}");
    let put = store.txn(Txn::new().and_then(TxnOp::put_with_lease(&b"nl"[..], &b"x"[..], 987_654_321))).await;
    assert!(put.is_err(), "a put bound to a missing lease must fail");
    assert!(store.get(b"nl").await.unwrap().is_none());
}

/// A watch from an old revision replays history, then follows live writes.
pub async fn watch_replays_from_revision_then_follows(store: Arc<dyn KvStore>) {
    let r1 = store.put(b"w/a", b"1").await.unwrap();
    store.put(b"w/b", b"2").await.unwrap();
    store.put(b"other", b"x").await.unwrap();
    store.delete(b"w/a").await.unwrap();
    let mut watch = store.watch(b"w/", r1).await.unwrap();
    let e1 = next_event(&mut watch).await;
    assert!(
        matches!(&e1, WatchEvent::Put(kv) if kv.key == b"w/a" && kv.value == b"1" && kv.mod_revision == r1),
        "{e1:?}"
    );
    let e2 = next_event(&mut watch).await;
    assert!(matches!(&e2, WatchEvent::Put(kv) if kv.key == b"w/b"), "{e2:?}");
    let e3 = next_event(&mut watch).await;
    assert!(matches!(&e3, WatchEvent::Delete(kv) if kv.key == b"w/a"), "{e3:?}");
    let live = store.put(b"w/c", b"3").await.unwrap();
    let e4 = next_event(&mut watch).await;
    assert!(matches!(&e4, WatchEvent::Put(kv) if kv.key == b"w/c" && kv.mod_revision == live), "{e4:?}");
}

async fn next_event(watch: &mut crate::WatchStream) -> WatchEvent {
    tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .expect("a watch event within 10 s")
        .expect("the watch stream is open")
        .expect("the watch event is not an error")
}

/// A watch that starts far back replays history larger than one gRPC reply may carry
/// (etcd-client refuses replies over 4 MiB unless told otherwise): 1,200 puts of 8 KiB in
/// 12 transactions, about 9.6 MiB, all arrive, then the watch follows live writes.
pub async fn a_watch_replays_more_history_than_one_reply_holds(store: Arc<dyn KvStore>) {
    let value = vec![b'h'; 8192];
    let mut first = 0;
    for chunk in 0..12 {
        let txn =
            (0..100).fold(Txn::new(), |t, i| t.and_then(TxnOp::put(format!("hist/{chunk:02}/{i:03}"), value.clone())));
        let rev = store.txn(txn).await.unwrap().revision;
        if first == 0 {
            first = rev;
        }
    }
    let mut watch = store.watch(b"hist/", first).await.unwrap();
    for n in 0..1200 {
        match next_event(&mut watch).await {
            WatchEvent::Put(kv) => {
                assert_eq!(kv.key, format!("hist/{:02}/{:03}", n / 100, n % 100).into_bytes(), "event {n}");
                assert_eq!(kv.value.len(), 8192);
            }
            other => panic!("event {n} is {other:?}"),
        }
    }
    store.put(b"hist/live", b"x").await.unwrap();
    assert!(matches!(next_event(&mut watch).await, WatchEvent::Put(kv) if kv.key == b"hist/live"));
}
