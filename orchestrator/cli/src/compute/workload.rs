//! The reference compute's instance workload, and the check of its log.
//!
//! An instance writes a log of 4 KiB records to its volumes over NBD, round-robin:
//! record `seq` goes to volume `seq % n` at offset `(seq / n) * 4096`. Each record holds
//! a magic, the instance's tag, its sequence number, a payload and a checksum, and is
//! written and flushed before the next is started; its number is then written to the
//! ack file. So after any crash, failover or stop, every volume set holds an exact
//! prefix of the log: the check reads it back and finds every acknowledged record, and
//! no torn or out-of-order one.
//!
//! Control on stdin, one word a line: `quiesce` (finish the record, flush, answer
//! `quiesced`, write nothing until `unquiesce`, answered `unquiesced`), `stop` (finish
//! the record, flush, exit 0). End of input is a stop.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use drover_agent_qemu::{NbdAddr, NbdClient};
use tokio::io::AsyncBufReadExt;

pub const RECORD: usize = 4096;
const MAGIC: &[u8; 8] = b"DRVRLOG1";

/// FNV-1a, 64 bits: the record checksum and the instance tag.
fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

/// The tag of instance `id` in its records.
pub fn tag(id: &str) -> u64 {
    fnv(id.as_bytes())
}

/// Record `seq` of the instance tagged `tag`.
pub fn record(tag: u64, seq: u64) -> Vec<u8> {
    let mut r = vec![0u8; RECORD];
    r[..8].copy_from_slice(MAGIC);
    r[8..16].copy_from_slice(&tag.to_le_bytes());
    r[16..24].copy_from_slice(&seq.to_le_bytes());
    let fill = (seq as u8) ^ (tag as u8);
    r[24..RECORD - 8].fill(fill);
    let sum = fnv(&r[..RECORD - 8]);
    r[RECORD - 8..].copy_from_slice(&sum.to_le_bytes());
    r
}

/// What a slot of the log holds.
#[derive(Debug, PartialEq, Eq)]
pub enum Slot {
    Empty,
    Record(u64),
    /// Neither empty nor a whole record of this instance: torn, foreign or corrupt.
    Bad(String),
}

pub fn classify(tag: u64, data: &[u8]) -> Slot {
    if data.iter().all(|b| *b == 0) {
        return Slot::Empty;
    }
    if data.len() != RECORD || &data[..8] != MAGIC {
        return Slot::Bad("no record magic".into());
    }
    if u64::from_le_bytes(data[8..16].try_into().expect("8 bytes")) != tag {
        return Slot::Bad("a record of another instance".into());
    }
    let sum = u64::from_le_bytes(data[RECORD - 8..].try_into().expect("8 bytes"));
    if fnv(&data[..RECORD - 8]) != sum {
        return Slot::Bad("checksum mismatch (torn record)".into());
    }
    Slot::Record(u64::from_le_bytes(data[16..24].try_into().expect("8 bytes")))
}

/// Parses an NBD URI as Drover hands them out: `nbd://host:port/export` or
/// `nbd+unix:///export?socket=/path`.
pub fn parse_uri(uri: &str) -> Result<(NbdAddr, String)> {
    if let Some(rest) = uri.strip_prefix("nbd+unix:///") {
        let (export, query) = rest.split_once('?').ok_or_else(|| anyhow!("{uri}: no ?socket="))?;
        let socket = query.strip_prefix("socket=").ok_or_else(|| anyhow!("{uri}: no ?socket="))?;
        return Ok((NbdAddr::Unix(PathBuf::from(socket)), export.to_string()));
    }
    if let Some(rest) = uri.strip_prefix("nbd://") {
        let (host, export) = rest.split_once('/').ok_or_else(|| anyhow!("{uri}: no export name"))?;
        return Ok((NbdAddr::Tcp(host.to_string()), export.to_string()));
    }
    bail!("{uri:?} is not an NBD URI (nbd://host:port/export or nbd+unix:///export?socket=PATH)")
}

/// A log's volumes: one connection each, and how many record slots they hold together.
struct Volumes {
    vols: Vec<NbdClient>,
    slots: u64,
}

impl Volumes {
    async fn open(uris: &[String]) -> Result<Self> {
        let mut vols = Vec::new();
        for uri in uris {
            let (addr, export) = parse_uri(uri)?;
            vols.push(NbdClient::connect(&addr, &export).await.with_context(|| format!("connecting to {uri}"))?);
        }
        let slots = vols.iter().map(|v| v.size() / RECORD as u64).min().unwrap_or(0) * vols.len() as u64;
        Ok(Self { vols, slots })
    }

    /// The volume and offset of slot `seq`.
    fn at(&mut self, seq: u64) -> (&mut NbdClient, u64) {
        let n = self.vols.len() as u64;
        (&mut self.vols[(seq % n) as usize], (seq / n) * RECORD as u64)
    }

    async fn read(&mut self, seq: u64) -> Result<Vec<u8>> {
        let (v, off) = self.at(seq);
        Ok(v.read(off, RECORD as u32).await?)
    }

    async fn flush(&mut self) -> Result<()> {
        for v in &mut self.vols {
            v.flush().await?;
        }
        Ok(())
    }

    async fn close(mut self) -> Result<()> {
        self.flush().await?;
        for v in self.vols {
            v.disconnect().await;
        }
        Ok(())
    }
}

/// The log on `volumes`: the records of the exact prefix, or why it is not one.
pub async fn read_log(id: &str, uris: &[String]) -> Result<u64> {
    let tag = tag(id);
    let mut vols = Volumes::open(uris).await?;
    let slots = vols.slots;
    let mut seq = 0;
    while seq < slots {
        let data = vols.read(seq).await?;
        match classify(tag, &data) {
            Slot::Empty => break,
            Slot::Record(s) if s == seq => seq += 1,
            Slot::Record(s) => bail!("slot {seq} holds record {s}: out of order"),
            Slot::Bad(why) => bail!("slot {seq}: {why}"),
        }
    }
    // After the prefix, nothing: a record past a gap would mean a lost write.
    for after in seq + 1..(seq + 64).min(slots) {
        if classify(tag, &vols.read(after).await?) != Slot::Empty {
            bail!("slot {after} is written after the empty slot {seq}: a write was lost");
        }
    }
    vols.close().await?;
    Ok(seq)
}

/// Runs the workload until told to stop.
pub async fn run(id: &str, uris: &[String], ack_file: &Path, interval: Duration) -> Result<()> {
    let next_start = read_log(id, uris).await.context("reading the log to continue it")?;
    let tag = tag(id);
    let mut vols = Volumes::open(uris).await?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
        while let Ok(Some(l)) = lines.next_line().await {
            if tx.send(l.trim().to_string()).is_err() {
                return;
            }
        }
        let _ = tx.send("stop".into());
    });
    let mut seq = next_start;
    eprintln!("instance {id}: continuing its log at record {seq} on {} volume(s)", uris.len());
    loop {
        match rx.try_recv().ok().as_deref() {
            Some("stop") => {
                eprintln!("instance {id}: stopping after record {}", seq.saturating_sub(1));
                break;
            }
            Some("quiesce") => {
                vols.flush().await?;
                println!("quiesced");
                loop {
                    match rx.recv().await.as_deref() {
                        Some("unquiesce") => {
                            println!("unquiesced");
                            break;
                        }
                        Some("stop") | None => return vols.close().await,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
        if seq < vols.slots {
            let (v, off) = vols.at(seq);
            v.write(off, &record(tag, seq)).await?;
            v.flush().await?;
            let tmp = ack_file.with_extension("tmp");
            std::fs::write(&tmp, seq.to_string())?;
            std::fs::rename(&tmp, ack_file)?;
            seq += 1;
        }
        tokio::time::sleep(interval).await;
    }
    vols.close().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_recognised_and_torn_ones_are_not() {
        let t = tag("web-1");
        let r = record(t, 41);
        assert_eq!(classify(t, &r), Slot::Record(41));
        assert_eq!(classify(t, &[0u8; RECORD]), Slot::Empty);
        assert!(matches!(classify(tag("web-2"), &r), Slot::Bad(_)));
        let mut torn = r.clone();
        torn[2048..].fill(0);
        assert!(matches!(classify(t, &torn), Slot::Bad(w) if w.contains("torn")));
    }

    #[test]
    fn nbd_uris_parse_as_drover_hands_them_out() {
        let (a, e) = parse_uri("nbd://127.0.0.1:10809/vol-1").unwrap();
        assert_eq!((a, e.as_str()), (NbdAddr::Tcp("127.0.0.1:10809".into()), "vol-1"));
        let (a, e) = parse_uri("nbd+unix:///vol-2?socket=/run/x.sock").unwrap();
        assert_eq!((a, e.as_str()), (NbdAddr::Unix("/run/x.sock".into()), "vol-2"));
        assert!(parse_uri("http://x").is_err());
    }
}
