//! A small NBD client (fixed newstyle handshake, simple replies) over a unix socket: the
//! agent reads recovery points from, and writes them into, qemu-storage-daemon exports.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

/// Where an NBD server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdAddr {
    Unix(std::path::PathBuf),
    Tcp(String),
}

impl NbdAddr {
    /// The URI of an export on this server, for any NBD client.
    pub fn uri(&self, export: &str) -> String {
        match self {
            NbdAddr::Unix(p) => format!("nbd+unix:///{export}?socket={}", p.display()),
            NbdAddr::Tcp(a) => format!("nbd://{a}/{export}"),
        }
    }
}

/// Deadline of one NBD request or reply: a daemon that stops answering fails the
/// operation instead of hanging it (and with it the volume's in-flight claim).
const IO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

async fn timed<T>(fut: impl std::future::Future<Output = std::io::Result<T>>) -> Result<T, NbdError> {
    match tokio::time::timeout(IO_TIMEOUT, fut).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(NbdError::Protocol(format!("no progress within {IO_TIMEOUT:?}"))),
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send + Sync {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + Sync> Io for T {}

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const INFO_EXPORT: u16 = 0;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_WRITE_ZEROES: u16 = 6;
const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;

/// An NBD failure.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("nbd i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("nbd protocol: {0}")]
    Protocol(String),
    #[error("nbd server returned error {errno} for {what}")]
    Server { errno: u32, what: &'static str },
}

/// Writes `head` then `body` with as few vectored writes as the socket allows.
async fn write_both(sock: &mut Box<dyn Io>, head: &[u8], body: &[u8]) -> std::io::Result<()> {
    let mut done = 0usize;
    let total = head.len() + body.len();
    while done < total {
        let n = if done < head.len() {
            let parts = [std::io::IoSlice::new(&head[done..]), std::io::IoSlice::new(body)];
            sock.write_vectored(&parts).await?
        } else {
            sock.write(&body[done - head.len()..]).await?
        };
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        done += n;
    }
    Ok(())
}

/// One connection to one export.
pub struct NbdClient {
    sock: Box<dyn Io>,
    size: u64,
    flags: u16,
    handle: u64,
    /// Handles of writes sent but not yet answered.
    in_flight: Vec<u64>,
}

impl NbdClient {
    /// Connects to `export` on the NBD server at `addr`.
    pub async fn connect(addr: &NbdAddr, export: &str) -> Result<Self, NbdError> {
        let mut sock: Box<dyn Io> = match addr {
            NbdAddr::Unix(p) => Box::new(UnixStream::connect(p).await?),
            NbdAddr::Tcp(a) => {
                // Requests are small and answered one by one: no Nagle delay on them.
                let tcp = TcpStream::connect(a).await?;
                tcp.set_nodelay(true)?;
                Box::new(tcp)
            }
        };
        if sock.read_u64().await? != NBDMAGIC || sock.read_u64().await? != IHAVEOPT {
            return Err(NbdError::Protocol("not an NBD newstyle server".into()));
        }
        let server_flags = sock.read_u16().await?;
        if server_flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(NbdError::Protocol("server lacks fixed newstyle".into()));
        }
        let no_zeroes = server_flags & FLAG_NO_ZEROES != 0;
        let client_flags = u32::from(FLAG_FIXED_NEWSTYLE) | if no_zeroes { u32::from(FLAG_NO_ZEROES) } else { 0 };
        sock.write_u32(client_flags).await?;
        // NBD_OPT_GO with the export name and no information requests.
        let mut data = Vec::with_capacity(6 + export.len());
        data.extend_from_slice(&(export.len() as u32).to_be_bytes());
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        sock.write_u64(IHAVEOPT).await?;
        sock.write_u32(OPT_GO).await?;
        sock.write_u32(data.len() as u32).await?;
        sock.write_all(&data).await?;
        let (mut size, mut flags) = (None, 0u16);
        loop {
            if sock.read_u64().await? != REPLY_MAGIC {
                return Err(NbdError::Protocol("bad option reply magic".into()));
            }
            let _opt = sock.read_u32().await?;
            let kind = sock.read_u32().await?;
            let len = sock.read_u32().await? as usize;
            let mut payload = vec![0u8; len];
            sock.read_exact(&mut payload).await?;
            if kind & 0x8000_0000 != 0 {
                return Err(NbdError::Protocol(format!(
                    "export {export:?} refused (reply {kind:#x}): {}",
                    String::from_utf8_lossy(payload.get(4..).unwrap_or(&payload))
                )));
            }
            match kind {
                REP_INFO if payload.len() >= 12 && u16::from_be_bytes([payload[0], payload[1]]) == INFO_EXPORT => {
                    size = Some(u64::from_be_bytes(payload[2..10].try_into().expect("8 bytes")));
                    flags = u16::from_be_bytes([payload[10], payload[11]]);
                }
                REP_ACK => break,
                _ => {}
            }
        }
        let size = size.ok_or_else(|| NbdError::Protocol("server sent no export size".into()))?;
        Ok(Self { sock, size, flags, handle: 0, in_flight: Vec::new() })
    }

    /// The export's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    async fn request(&mut self, cmd: u16, offset: u64, len: u32, payload: &[u8]) -> Result<u64, NbdError> {
        self.handle += 1;
        let mut head = Vec::with_capacity(28);
        head.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        head.extend_from_slice(&0u16.to_be_bytes());
        head.extend_from_slice(&cmd.to_be_bytes());
        head.extend_from_slice(&self.handle.to_be_bytes());
        head.extend_from_slice(&offset.to_be_bytes());
        head.extend_from_slice(&len.to_be_bytes());
        // The payload goes from the caller's buffer as it is: copying megabytes of volume
        // data behind a 28-byte header cost an allocation and a copy per request.
        // One vectored write for both, so the server never wakes for a header alone.
        timed(write_both(&mut self.sock, &head, payload)).await?;
        Ok(self.handle)
    }

    async fn reply(&mut self, handle: u64, what: &'static str) -> Result<(), NbdError> {
        if timed(self.sock.read_u32()).await? != SIMPLE_REPLY_MAGIC {
            return Err(NbdError::Protocol("bad reply magic".into()));
        }
        let errno = self.sock.read_u32().await?;
        if self.sock.read_u64().await? != handle {
            return Err(NbdError::Protocol("reply for another request".into()));
        }
        if errno != 0 {
            return Err(NbdError::Server { errno, what });
        }
        Ok(())
    }

    /// Reads a reply header; returns its handle. Replies may come in any order.
    async fn any_reply(&mut self, what: &'static str) -> Result<u64, NbdError> {
        if timed(self.sock.read_u32()).await? != SIMPLE_REPLY_MAGIC {
            return Err(NbdError::Protocol("bad reply magic".into()));
        }
        let errno = self.sock.read_u32().await?;
        let handle = self.sock.read_u64().await?;
        if errno != 0 {
            return Err(NbdError::Server { errno, what });
        }
        Ok(handle)
    }

    /// Reads several ranges with all requests in flight at once; returns the data in the
    /// order asked.
    pub async fn read_many(&mut self, ranges: &[(u64, u32)]) -> Result<Vec<Vec<u8>>, NbdError> {
        self.settle().await?;
        let mut handles = Vec::with_capacity(ranges.len());
        for (off, len) in ranges {
            handles.push(self.request(CMD_READ, *off, *len, &[]).await?);
        }
        let mut out: Vec<Option<Vec<u8>>> = vec![None; ranges.len()];
        for _ in 0..ranges.len() {
            let h = self.any_reply("read").await?;
            let i = handles
                .iter()
                .position(|x| *x == h)
                .ok_or_else(|| NbdError::Protocol("reply for an unknown read".into()))?;
            out[i] = Some(self.payload(ranges[i].1 as usize).await?);
        }
        Ok(out.into_iter().map(|b| b.expect("every read answered")).collect())
    }

    /// Sends a write without waiting for its answer; at most `depth` stay unanswered.
    pub async fn write_pipelined(&mut self, offset: u64, data: &[u8], depth: usize) -> Result<(), NbdError> {
        let h = self.request(CMD_WRITE, offset, data.len() as u32, data).await?;
        self.in_flight.push(h);
        while self.in_flight.len() > depth {
            self.reap_one().await?;
        }
        Ok(())
    }

    async fn reap_one(&mut self) -> Result<(), NbdError> {
        let h = self.any_reply("write").await?;
        let i = self
            .in_flight
            .iter()
            .position(|x| *x == h)
            .ok_or_else(|| NbdError::Protocol("reply for an unknown write".into()))?;
        self.in_flight.swap_remove(i);
        Ok(())
    }

    /// Waits for every pipelined write's answer.
    pub async fn settle(&mut self) -> Result<(), NbdError> {
        while !self.in_flight.is_empty() {
            self.reap_one().await?;
        }
        Ok(())
    }

    /// Reads `len` bytes at `offset`.
    pub async fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, NbdError> {
        self.settle().await?;
        let h = self.request(CMD_READ, offset, len, &[]).await?;
        self.reply(h, "read").await?;
        self.payload(len as usize).await
    }

    /// Reads a read reply's `len` bytes of data into a new buffer, without zeroing it
    /// first (the socket fills it).
    async fn payload(&mut self, len: usize) -> Result<Vec<u8>, NbdError> {
        let mut buf = Vec::with_capacity(len);
        while buf.len() < len {
            let want = (len - buf.len()) as u64;
            if timed((&mut self.sock).take(want).read_buf(&mut buf)).await? == 0 {
                return Err(NbdError::Protocol("the server closed the connection in the middle of a reply".into()));
            }
        }
        Ok(buf)
    }

    /// Writes `data` at `offset`.
    pub async fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), NbdError> {
        self.settle().await?;
        let h = self.request(CMD_WRITE, offset, data.len() as u32, data).await?;
        self.reply(h, "write").await
    }

    /// Makes a range read as zeroes.
    pub async fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), NbdError> {
        self.settle().await?;
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(1 << 30) as u32;
            if self.flags & TFLAG_SEND_WRITE_ZEROES != 0 {
                let h = self.request(CMD_WRITE_ZEROES, offset + done, n, &[]).await?;
                self.reply(h, "write_zeroes").await?;
            } else {
                let zeros = vec![0u8; n.min(1 << 20) as usize];
                self.write(offset + done, &zeros).await?;
                done += zeros.len() as u64;
                continue;
            }
            done += u64::from(n);
        }
        Ok(())
    }

    /// Flushes written data to stable storage.
    pub async fn flush(&mut self) -> Result<(), NbdError> {
        self.settle().await?;
        let h = self.request(CMD_FLUSH, 0, 0, &[]).await?;
        self.reply(h, "flush").await
    }

    /// Ends the session politely.
    pub async fn disconnect(mut self) {
        let _ = self.request(CMD_DISC, 0, 0, &[]).await;
        let _ = self.sock.shutdown().await;
    }
}
