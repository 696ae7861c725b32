//! The agent-to-agent data path (`drover.agent.v1.Replica`): shipping a recovery point to
//! the peer, and receiving one into the driver.

use std::sync::Arc;
use std::time::Duration;

use drover_proto::agent::v1 as pb;
use drover_proto::agent::v1::replica_client::ReplicaClient;
use drover_proto::agent::v1::replica_message::Kind;
use tokio::sync::mpsc;
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

use crate::driver::{ApplyHeader, Driver, DriverError, Incoming};

/// The largest data chunk put in one message.
pub const CHUNK_BYTES: usize = 4 << 20;

/// HTTP/2 flow-control window of the replica stream.
pub const WINDOW_BYTES: u32 = 32 << 20;

/// The least time a recovery point transfer is given, however small.
pub const TRANSFER_FLOOR: Duration = Duration::from_secs(30);

/// The slowest rate (bytes per second) a transfer may run at: a transfer of `n` bytes is
/// given [`TRANSFER_FLOOR`] plus `n` divided by this, and abandoned after that.
pub const MIN_TRANSFER_RATE: u64 = 4 << 20;

/// How long a receiving side waits for the next message of a recovery point stream
/// before it abandons the transfer (a source that stalled or vanished without closing).
pub const RECEIVE_IDLE: Duration = Duration::from_secs(60);

/// The deadline of a transfer of `bytes`: a floor plus the time the data takes at the
/// slowest acceptable rate. Nothing waits on the peer longer than this.
pub fn transfer_deadline(bytes: u64) -> Duration {
    TRANSFER_FLOOR + Duration::from_secs_f64(bytes as f64 / MIN_TRANSFER_RATE as f64)
}

/// How this process reaches peer agents: TLS with its agent certificate, once
/// [`use_tls`] was called at start (every agent of one process shares the CA and role).
static PEER_TLS: std::sync::OnceLock<tonic::transport::ClientTlsConfig> = std::sync::OnceLock::new();

/// Peer agents are reached over TLS with this config from now on (the first call wins).
pub fn use_tls(config: tonic::transport::ClientTlsConfig) {
    let _ = PEER_TLS.set(config);
}

fn peer_endpoint(endpoint: &str) -> Result<tonic::transport::Endpoint, DriverError> {
    let ep = tonic::transport::Endpoint::from_shared(endpoint.to_string())
        .map_err(|e| DriverError::InvalidArgument(format!("peer endpoint {endpoint:?}: {e}")))?;
    match PEER_TLS.get() {
        Some(tls) => ep
            .tls_config(tls.clone())
            .map_err(|e| DriverError::InvalidArgument(format!("TLS towards the peer agent at {endpoint}: {e}"))),
        None => Ok(ep),
    }
}

/// Channels to peer agents, one per endpoint, shared by every sync of this process: one
/// HTTP/2 connection multiplexes concurrent streams, and a broken one is dialed again on
/// the next call. Dialing per sync cost a TCP and HTTP/2 handshake (and TLS) twice per
/// sync. Deadlines are per call, not per channel.
static PEERS: std::sync::LazyLock<std::sync::Mutex<std::collections::HashMap<String, Channel>>> =
    std::sync::LazyLock::new(Default::default);

fn peer_channel(endpoint: &str) -> Result<Channel, DriverError> {
    let mut peers = PEERS.lock().expect("peer channels poisoned");
    if let Some(ch) = peers.get(endpoint) {
        return Ok(ch.clone());
    }
    let ch = peer_endpoint(endpoint)?
        .connect_timeout(Duration::from_secs(3))
        // HTTP/2's default 64 KiB windows would stall a bulk stream every few packets.
        .initial_stream_window_size(Some(WINDOW_BYTES))
        .initial_connection_window_size(Some(2 * WINDOW_BYTES))
        // A peer that vanished without closing is noticed between syncs too.
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10))
        .connect_lazy();
    peers.insert(endpoint.to_string(), ch.clone());
    Ok(ch)
}

/// A client of the peer agent at `endpoint` whose calls carry the caller's trace.
fn traced(endpoint: &str) -> Result<drover_proto::trace::Traced, DriverError> {
    Ok(tonic::service::interceptor::InterceptedService::new(peer_channel(endpoint)?, drover_proto::trace::Inject))
}

/// The recovery point the peer agent at `endpoint` holds for `volume_id` (empty when it
/// holds none). A source asks before it ships: after an interrupted sync the peer may
/// already hold the point the source was shipping, and the source goes on from there
/// instead of shipping from an older base the peer no longer has.
pub async fn peer_point(endpoint: &str, volume_id: &str) -> Result<String, DriverError> {
    let mut client = drover_proto::agent::v1::agent_client::AgentClient::new(traced(endpoint)?);
    let ask = client.get_replication_info(pb::GetReplicationInfoRequest {
        volume_id: volume_id.to_string(),
        estimate_pending: false,
    });
    let info = tokio::time::timeout(Duration::from_secs(5), ask)
        .await
        .map_err(|_| DriverError::Unavailable(format!("the peer agent at {endpoint} did not answer within 5 s")))?
        .map_err(|s| DriverError::Unavailable(format!("peer agent at {endpoint}: {}", s.message())))?;
    Ok(info.into_inner().recovery_point_id)
}

/// An outgoing recovery point: send the pieces, then drop the sender after `Commit`.
pub struct Shipment {
    tx: mpsc::Sender<pb::ReplicaMessage>,
    task: tokio::task::JoinHandle<Result<pb::ApplyAck, Status>>,
}

impl Shipment {
    /// Opens the stream to the peer and sends the header; the whole call (data, commit and
    /// the peer's acknowledgement) must end within `deadline` (see [`transfer_deadline`]).
    pub async fn open(endpoint: &str, header: &ApplyHeader, deadline: Duration) -> Result<Self, DriverError> {
        // The stream carries the caller's trace, so the peer's spans join it.
        let mut client = ReplicaClient::new(traced(endpoint)?)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20);
        let (tx, rx) = mpsc::channel::<pb::ReplicaMessage>(4);
        let begin = pb::ApplyBegin {
            group_id: header.group_id.clone(),
            recovery_point_id: header.recovery_point_id.clone(),
            base_recovery_point_id: header.base_recovery_point_id.clone(),
            volumes: header
                .volumes
                .iter()
                .map(|(id, size)| pb::VolumeHeader { volume_id: id.clone(), size_bytes: *size as i64 })
                .collect(),
            r#final: header.final_sync,
            source_backend: header.source_backend.clone(),
            created_at_ms: header.created_at_ms,
            epoch: header.epoch,
        };
        tx.send(pb::ReplicaMessage { kind: Some(Kind::Begin(begin)) }).await.expect("receiver alive");
        let task = tokio::spawn(tracing::Instrument::in_current_span(async move {
            let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
            let mut req = Request::new(stream);
            req.set_timeout(deadline);
            match tokio::time::timeout(deadline, client.apply_recovery_point(req)).await {
                Ok(r) => r.map(Response::into_inner),
                Err(_) => Err(Status::deadline_exceeded(format!("the transfer did not end within {deadline:?}"))),
            }
        }));
        Ok(Self { tx, task })
    }

    /// Sends data at an offset of a volume as one chunk (the caller keeps it within
    /// [`CHUNK_BYTES`]).
    pub async fn data(&self, volume_id: &str, offset: u64, data: impl Into<bytes::Bytes>) -> Result<(), DriverError> {
        let data = data.into();
        self.send(pb::DeltaChunk { volume_id: volume_id.into(), offset: offset as i64, data, zero_length: 0 }).await
    }

    /// Sends a range that reads as zeroes.
    pub async fn zero(&self, volume_id: &str, offset: u64, len: u64) -> Result<(), DriverError> {
        self.send(pb::DeltaChunk {
            volume_id: volume_id.into(),
            offset: offset as i64,
            data: bytes::Bytes::new(),
            zero_length: len as i64,
        })
        .await
    }

    async fn send(&self, chunk: pb::DeltaChunk) -> Result<(), DriverError> {
        self.tx
            .send(pb::ReplicaMessage { kind: Some(Kind::Chunk(chunk)) })
            .await
            .map_err(|_| DriverError::Unavailable("the peer closed the recovery point stream".into()))
    }

    /// Commits the point and waits for the peer's acknowledgement.
    pub async fn commit(self) -> Result<pb::ApplyAck, DriverError> {
        let _ = self.tx.send(pb::ReplicaMessage { kind: Some(Kind::Commit(pb::ApplyCommit {})) }).await;
        drop(self.tx);
        let result = self.task.await.map_err(|e| DriverError::Internal(e.to_string()))?;
        result.map_err(|s| match s.code() {
            tonic::Code::FailedPrecondition => {
                DriverError::FailedPrecondition(format!("peer refused the recovery point: {}", s.message()))
            }
            tonic::Code::NotFound => DriverError::NotFound(format!("peer: {}", s.message())),
            _ => DriverError::Unavailable(format!("peer did not apply the recovery point: {}", s.message())),
        })
    }

    /// Abandons the transfer after `e`: the peer discards what it received. When the peer
    /// ended the stream itself, its reason is the better error.
    pub async fn fail(self, e: DriverError) -> DriverError {
        drop(self.tx);
        let peer = tokio::time::timeout(Duration::from_secs(5), self.task).await;
        match peer {
            Ok(Ok(Err(s))) if s.code() == tonic::Code::FailedPrecondition => {
                DriverError::FailedPrecondition(format!("peer refused the recovery point: {}", s.message()))
            }
            Ok(Ok(Err(s))) if s.code() != tonic::Code::Cancelled => {
                DriverError::Unavailable(format!("peer ended the transfer: {}", s.message()))
            }
            _ => e,
        }
    }
}

/// `drover.agent.v1.Replica`: hands incoming recovery points to the driver.
pub struct ReplicaService {
    pub driver: Arc<dyn Driver>,
    /// The agent's fencing records: a point from a source with a stale epoch is refused.
    pub ledger: crate::ledger::Ledger,
    pub metrics: std::sync::Arc<crate::metrics::AgentMetrics>,
}

fn header_from(b: pb::ApplyBegin) -> Result<ApplyHeader, Status> {
    if b.group_id.is_empty() || b.recovery_point_id.is_empty() || b.volumes.is_empty() {
        return Err(Status::invalid_argument("`begin` needs group_id, recovery_point_id and at least one volume"));
    }
    Ok(ApplyHeader {
        group_id: b.group_id,
        recovery_point_id: b.recovery_point_id,
        base_recovery_point_id: b.base_recovery_point_id,
        volumes: b.volumes.into_iter().map(|v| (v.volume_id, v.size_bytes.max(0) as u64)).collect(),
        final_sync: b.r#final,
        source_backend: b.source_backend,
        created_at_ms: b.created_at_ms,
        epoch: b.epoch,
    })
}

#[tonic::async_trait]
impl pb::replica_server::Replica for ReplicaService {
    async fn apply_recovery_point(
        &self,
        req: Request<Streaming<pb::ReplicaMessage>>,
    ) -> Result<Response<pb::ApplyAck>, Status> {
        let mut stream = req.into_inner();
        let header = match stream.message().await? {
            Some(pb::ReplicaMessage { kind: Some(Kind::Begin(b)) }) => header_from(b)?,
            _ => return Err(Status::invalid_argument("a recovery point stream starts with `begin`")),
        };
        // Fencing on the data path: a source whose epoch for the group is older than one
        // this side admitted was failed over away from; it must not overwrite this side.
        let verdict = self
            .ledger
            .admit_epoch(&format!("group/{}", header.group_id), header.epoch)
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        if let Err(stale) = verdict {
            tracing::warn!(group = %header.group_id, source = %header.source_backend, presented = stale.presented, highest = stale.highest, "refusing a recovery point from a stale source");
            return Err(Status::failed_precondition(format!(
                "stale epoch {} for group {}: this side has seen epoch {}; the source no longer owns the group \
                 (it was failed over away from) and must not sync here",
                stale.presented, header.group_id, stale.highest
            )));
        }
        let rp = header.recovery_point_id.clone();
        let (tx, rx) = mpsc::channel(8);
        // Feed the driver from the stream; it applies while the data arrives.
        let feeder = tokio::spawn(async move {
            loop {
                let message = match tokio::time::timeout(RECEIVE_IDLE, stream.message()).await {
                    Ok(m) => m,
                    Err(_) => {
                        let why = format!(
                            "no data from the source for {}s; the transfer is abandoned and the previous point kept",
                            RECEIVE_IDLE.as_secs()
                        );
                        let _ = tx.send(Incoming::Broken(why)).await;
                        return;
                    }
                };
                let next = match message {
                    Ok(Some(pb::ReplicaMessage { kind: Some(Kind::Chunk(c)) })) => {
                        if c.zero_length > 0 {
                            Incoming::Zero {
                                volume_id: c.volume_id,
                                offset: c.offset as u64,
                                len: c.zero_length as u64,
                            }
                        } else {
                            Incoming::Data { volume_id: c.volume_id, offset: c.offset as u64, data: c.data }
                        }
                    }
                    Ok(Some(pb::ReplicaMessage { kind: Some(Kind::Commit(_)) })) => Incoming::Commit,
                    Ok(Some(_)) => Incoming::Broken("unexpected message in a recovery point stream".into()),
                    Ok(None) => Incoming::Broken("the source closed the stream before commit".into()),
                    Err(s) => Incoming::Broken(format!("stream error: {}", s.message())),
                };
                let end = matches!(next, Incoming::Commit | Incoming::Broken(_));
                if tx.send(next).await.is_err() || end {
                    return;
                }
            }
        });
        // The apply runs in its own task: when the source goes away mid-stream, this
        // handler is dropped, but the apply still sees the stream break and cleans up
        // what it had made (a dropped apply left its partial image open and locked).
        let driver = self.driver.clone();
        let result = tokio::spawn(async move { driver.apply_recovery_point(header, rx).await })
            .await
            .map_err(|e| Status::internal(format!("the apply task failed: {e}")))?;
        feeder.abort();
        let bytes = result.map_err(|e| e.to_status())?;
        self.metrics.received_bytes.inc_by(bytes);
        Ok(Response::new(pb::ApplyAck { recovery_point_id: rp, bytes_received: bytes as i64 }))
    }
}
