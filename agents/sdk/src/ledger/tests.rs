use super::*;

fn done(byte: u8) -> Outcome {
    Outcome { code: 0, message: String::new(), response: vec![byte] }
}

#[test]
fn admission_runs_once_replays_after_and_knows_an_interrupted_op() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.log");
    {
        let ledger = Ledger::open(&path).unwrap();
        assert_eq!(ledger.admit_blocking("volume/v1", 5, "op-1").unwrap(), Admission::Run);
        let done = Outcome { code: 0, message: String::new(), response: vec![1, 2] };
        ledger.record_blocking("op-1", &done).unwrap();
        assert_eq!(ledger.admit_blocking("volume/v1", 5, "op-1").unwrap(), Admission::Replay(done));
        assert_eq!(ledger.admit_blocking("volume/v1", 6, "op-2").unwrap(), Admission::Run);
        assert!(matches!(ledger.admit_blocking("volume/v1", 5, "op-3").unwrap(), Admission::Stale(_)));
        // op-2 never records: the agent "crashes" here.
    }
    let ledger = Ledger::open(&path).unwrap();
    assert!(ledger.was_interrupted("op-2").unwrap());
    assert_eq!(ledger.admit_blocking("volume/v1", 6, "op-2").unwrap(), Admission::Interrupted);
    let failed = Outcome { code: 14, message: "interrupted".into(), response: vec![] };
    ledger.record_blocking("op-2", &failed).unwrap();
    assert!(!ledger.was_interrupted("op-2").unwrap());
    assert_eq!(ledger.admit_blocking("volume/v1", 6, "op-2").unwrap(), Admission::Replay(failed));
}

#[test]
fn epochs_only_grow_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.log");
    {
        let ledger = Ledger::open(&path).unwrap();
        assert_eq!(ledger.admit_epoch_blocking("group/g1", 10).unwrap(), Ok(()));
        assert_eq!(ledger.admit_epoch_blocking("group/g1", 10).unwrap(), Ok(()), "equal epoch is the same owner");
        let stale = ledger.admit_epoch_blocking("group/g1", 9).unwrap().unwrap_err();
        assert_eq!((stale.presented, stale.highest), (9, 10));
        assert_eq!(ledger.admit_epoch_blocking("group/g2", 3).unwrap(), Ok(()), "scopes are independent");
    }
    let ledger = Ledger::open(&path).unwrap();
    assert_eq!(ledger.highest_epoch("group/g1").unwrap(), 10);
    assert!(ledger.admit_epoch_blocking("group/g1", 5).unwrap().is_err());
}

#[test]
fn oldest_outcomes_are_dropped_beyond_the_limit_and_stay_dropped_after_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("l.log");
    {
        let ledger = Ledger::open(&path).unwrap();
        for i in 0..5 {
            ledger.record_keeping(&format!("op-{i}"), &done(i), 3).unwrap();
        }
        // A second record of a kept op replaces its outcome and keeps its place.
        ledger.record_keeping("op-2", &done(9), 3).unwrap();
    }
    let ledger = Ledger::open(&path).unwrap();
    assert_eq!(ledger.outcome("op-0").unwrap(), None);
    assert_eq!(ledger.outcome("op-1").unwrap(), None);
    assert_eq!(ledger.outcome("op-2").unwrap(), Some(done(9)));
    for i in 3..5 {
        assert_eq!(ledger.outcome(&format!("op-{i}")).unwrap(), Some(done(i)), "op-{i} kept");
    }
}

/// 16 threads each admit and record 100 operations at once: every one runs once,
/// every outcome is there after a reopen, and the writes shared commits.
#[test]
fn concurrent_operations_share_commits_and_all_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("l.log");
    let ledger = Ledger::open(&path).unwrap();
    let threads: Vec<_> = (0..16)
        .map(|t| {
            let ledger = ledger.clone();
            std::thread::spawn(move || {
                for i in 0..100 {
                    let op = format!("op-{t}-{i}");
                    assert_eq!(ledger.admit_blocking(&format!("volume/v{t}"), i, &op).unwrap(), Admission::Run);
                    ledger.record_blocking(&op, &done(t as u8)).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let commits = ledger.inner.commits.load(Ordering::Relaxed);
    println!("ledger: 3,200 writes in {commits} commits");
    assert!(commits < 3_200, "concurrent writes shared no commit");
    drop(ledger);
    let ledger = Ledger::open(&path).unwrap();
    for t in 0..16u64 {
        assert_eq!(ledger.highest_epoch(&format!("volume/v{t}")).unwrap(), 99);
        for i in 0..100 {
            let op = format!("op-{t}-{i}");
            assert!(!ledger.was_interrupted(&op).unwrap(), "{op} left started");
            assert_eq!(ledger.outcome(&op).unwrap().unwrap().response, vec![t as u8], "{op}");
        }
    }
}

#[test]
fn outcomes_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::open(&dir.path().join("l.log")).unwrap();
    assert_eq!(ledger.outcome("op-1").unwrap(), None);
    let o = Outcome { code: 9, message: "volume v is busy".into(), response: vec![1, 2, 3] };
    ledger.record_blocking("op-1", &o).unwrap();
    assert_eq!(ledger.outcome("op-1").unwrap(), Some(o));
}

/// Writes that change nothing (a replay, a stale or equal epoch) answer without a disk
/// write; the ones that change something write once each when alone.
#[test]
fn writes_that_change_nothing_do_not_touch_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::open(&dir.path().join("l.log")).unwrap();
    let commits = || ledger.inner.commits.load(Ordering::Relaxed);
    assert_eq!(ledger.admit_blocking("volume/v1", 3, "op-1").unwrap(), Admission::Run);
    ledger.record_blocking("op-1", &done(1)).unwrap();
    assert_eq!(commits(), 2);
    assert_eq!(ledger.admit_blocking("volume/v1", 3, "op-1").unwrap(), Admission::Replay(done(1)));
    assert!(matches!(ledger.admit_blocking("volume/v1", 2, "op-2").unwrap(), Admission::Stale(_)));
    assert_eq!(ledger.admit_epoch_blocking("volume/v1", 3).unwrap(), Ok(()));
    assert_eq!(commits(), 2, "a replay, a stale and an equal epoch wrote");
    assert_eq!(ledger.admit_epoch_blocking("volume/v1", 4).unwrap(), Ok(()));
    assert_eq!(commits(), 3);
}

/// A crash in the middle of the last append leaves any prefix of its frame: each one
/// opens to the state before that commit, is cut off, and the ledger writes on.
#[test]
fn a_torn_last_write_is_cut_off_at_every_length() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("l.log");
    let before = {
        let ledger = Ledger::open(&path).unwrap();
        assert_eq!(ledger.admit_blocking("volume/v1", 7, "op-1").unwrap(), Admission::Run);
        ledger.record_blocking("op-1", &done(1)).unwrap();
        std::fs::read(&path).unwrap()
    };
    let after = {
        let ledger = Ledger::open(&path).unwrap();
        assert_eq!(ledger.admit_blocking("volume/v1", 8, "op-2").unwrap(), Admission::Run);
        std::fs::read(&path).unwrap()
    };
    assert!(after.len() > before.len() + 8);
    for cut in before.len() + 1..after.len() {
        std::fs::write(&path, &after[..cut]).unwrap();
        let ledger = Ledger::open(&path).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), before, "cut at {cut}: the torn end stays");
        assert_eq!(ledger.highest_epoch("volume/v1").unwrap(), 7, "cut at {cut}");
        assert!(!ledger.was_interrupted("op-2").unwrap(), "cut at {cut}");
        assert_eq!(ledger.outcome("op-1").unwrap(), Some(done(1)), "cut at {cut}");
        assert_eq!(ledger.admit_blocking("volume/v1", 8, "op-2").unwrap(), Admission::Run, "cut at {cut}");
        drop(ledger);
        assert_eq!(
            Ledger::open(&path).unwrap().admit_blocking("volume/v1", 8, "op-2").unwrap(),
            Admission::Interrupted
        );
    }
    // A frame with good frames after it that does not check is damage, not a torn end.
    std::fs::write(&path, &after).unwrap();
    let mut damaged = after.clone();
    damaged[MAGIC.len() + 10] ^= 0xff;
    std::fs::write(&path, &damaged).unwrap();
    let refused = Ledger::open(&path).err().expect("a damaged ledger opens").to_string();
    assert!(refused.contains("damaged") && refused.contains("restore"), "{refused}");
    assert_eq!(std::fs::read(&path).unwrap(), damaged, "the damaged file was changed");
}

#[test]
fn a_file_that_is_not_a_ledger_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("l.log");
    std::fs::write(&path, b"something else").unwrap();
    let refused = Ledger::open(&path).err().expect("opens").to_string();
    assert!(refused.contains("not a Drover agent ledger"), "{refused}");
}

/// With a small threshold the log is rewritten from the state many times over; it stays
/// bounded and reads back to the same state.
#[test]
fn the_log_is_compacted_and_reads_back_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("l.log");
    let ledger = Ledger::open_with(&path, 4 << 10).unwrap();
    for i in 0..2_000u64 {
        let op = format!("op-{i}");
        assert_eq!(ledger.admit_blocking(&format!("volume/v{}", i % 7), i, &op).unwrap(), Admission::Run);
        if i % 10 != 0 {
            ledger.record_keeping(&op, &done(i as u8), 50).unwrap();
        }
    }
    let len = std::fs::metadata(&path).unwrap().len();
    assert!(len < 64 << 10, "the log grew to {len} bytes");
    let kept = ledger.inner.state.read().unwrap();
    assert_eq!(kept.ops.len(), 50);
    assert_eq!(kept.started.len(), 200);
    let reread = Ledger::open(&path).unwrap();
    assert_eq!(*reread.inner.state.read().unwrap(), *kept);
    assert!(!path.with_extension("compacting").exists());
}

/// A ledger that earlier versions kept in redb is imported once, and its file renamed.
#[test]
fn a_redb_ledger_is_imported() {
    let dir = tempfile::tempdir().unwrap();
    let old = dir.path().join("ledger.redb");
    {
        let db = redb::Database::create(&old).unwrap();
        let w = db.begin_write().unwrap();
        {
            let mut epochs = w.open_table(legacy::EPOCHS).unwrap();
            epochs.insert("group/g1", 12).unwrap();
            let mut ops = w.open_table(legacy::OPS).unwrap();
            let mut order = w.open_table(legacy::OPS_ORDER).unwrap();
            for (seq, op) in [(4u64, "op-b"), (3, "op-a")] {
                ops.insert(op, legacy::encode(&done(seq as u8)).as_slice()).unwrap();
                order.insert(seq, op).unwrap();
            }
            w.open_table(legacy::STARTED).unwrap().insert("op-c", 12).unwrap();
        }
        w.commit().unwrap();
    }
    let path = dir.path().join("ledger.log");
    let ledger = Ledger::open(&path).unwrap();
    assert!(!old.exists() && dir.path().join("ledger.redb.imported").exists());
    assert_eq!(ledger.highest_epoch("group/g1").unwrap(), 12);
    assert_eq!(ledger.outcome("op-b").unwrap(), Some(done(4)));
    assert_eq!(ledger.admit_blocking("group/g1", 12, "op-c").unwrap(), Admission::Interrupted);
    assert_eq!(ledger.inner.state.read().unwrap().order, ["op-a", "op-b"], "the order of the records");
    drop(ledger);
    assert_eq!(Ledger::open(&path).unwrap().highest_epoch("group/g1").unwrap(), 12);
}
