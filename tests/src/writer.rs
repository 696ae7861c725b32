//! The ordered writer of the consistency tests, and its checker. It writes 64 KiB
//! records round-robin over a set of volumes (through NBD URIs, with `qemu-io`), each
//! issued only after the previous one was acknowledged, so any instant splits the
//! sequence into a prefix that happened and a rest that did not. A crash-consistent
//! image of the volumes (a disaster failover's point, a group snapshot) must equal the
//! state after exactly one such prefix, with no slot torn.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::cluster::qemu_io;

/// The size of one record, and of one slot it fills.
pub const SLOT: u64 = 64 << 10;
/// The slots each volume cycles through.
pub const SLOTS: u64 = 32;

/// One write: which volume and slot, with what byte, and when it was issued and done.
#[derive(Clone, Copy, Debug)]
pub struct Logged {
    pub vol: usize,
    pub slot: u64,
    pub pattern: u8,
    pub issued_at: Instant,
    pub done_at: Option<Instant>,
}

/// A running writer: stop it with [`Writer::stop`], which returns its log.
pub struct Writer {
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<Logged>>>,
    thread: std::thread::JoinHandle<()>,
}

impl Writer {
    /// Starts writing to `uris` round-robin, until stopped or a write fails.
    pub fn start(uris: Vec<String>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (stop, log) = (stop.clone(), log.clone());
            std::thread::spawn(move || {
                let n = uris.len() as u64;
                let mut i = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    let entry = Logged {
                        vol: (i % n) as usize,
                        slot: (i / n) % SLOTS,
                        pattern: (i % 250 + 1) as u8,
                        issued_at: Instant::now(),
                        done_at: None,
                    };
                    log.lock().unwrap().push(entry);
                    let cmd = format!("write -P {} {} 64k", entry.pattern, entry.slot * SLOT);
                    if qemu_io(&uris[entry.vol], &[cmd]).is_err() {
                        return;
                    }
                    log.lock().unwrap().last_mut().unwrap().done_at = Some(Instant::now());
                    i += 1;
                }
            })
        };
        Self { stop, log, thread }
    }

    /// Stops the writer (after its write in flight) and returns every write it logged.
    pub fn stop(self) -> Vec<Logged> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().unwrap();
        self.log.lock().unwrap().clone()
    }
}

/// The byte each slot of a volume holds, read whole with `qemu-img convert` (an
/// independent reader) into `dir`; panics on a torn slot.
pub fn slots(dir: &Path, uri: &str, tag: &str) -> Vec<u8> {
    let raw = dir.join(format!("{tag}.raw"));
    let out = std::process::Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", uri])
        .arg(&raw)
        .output()
        .expect("qemu-img runs");
    assert!(out.status.success(), "qemu-img convert: {}", String::from_utf8_lossy(&out.stderr));
    let data = std::fs::read(&raw).unwrap();
    let _ = std::fs::remove_file(&raw);
    (0..SLOTS)
        .map(|s| {
            let chunk = &data[(s * SLOT) as usize..((s + 1) * SLOT) as usize];
            assert!(chunk.iter().all(|b| *b == chunk[0]), "{tag}: slot {s} is torn");
            chunk[0]
        })
        .collect()
}

/// Every k such that the volumes hold exactly the state after the first k writes of
/// `log` (empty: the image is no prefix, i.e. not crash-consistent).
pub fn prefixes(log: &[Logged], actual: &[Vec<u8>]) -> Vec<usize> {
    let mut state = vec![vec![0u8; SLOTS as usize]; actual.len()];
    let mut matches = Vec::new();
    for k in 0..=log.len() {
        if k > 0 {
            let w = log[k - 1];
            state[w.vol][w.slot as usize] = w.pattern;
        }
        if state == actual {
            matches.push(k);
        }
    }
    matches
}
