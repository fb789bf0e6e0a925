//! Raft RPCs between nodes over QUIC. One connection per peer node, shared by
//! every group (the controller and all partitions); one bidirectional stream
//! per RPC, so a slow snapshot never blocks another group's heartbeat.
//!
//! Sending ([`PeerPool`], [`GroupNetwork`]): connections are made lazily and
//! replaced when they die; every RPC is bounded by openraft's soft TTL; a
//! peer that cannot be reached, or does not host the group yet, is reported
//! as `Unreachable` so openraft backs off instead of spinning.
//!
//! Receiving ([`serve_peer_connection`]): each stream's request is decoded
//! and validated (frame limits, rkyv validation, batch header and body CRCs)
//! before it reaches the group's Raft; malformed requests are answered with
//! an error and never touch a log.
//!
//! Idle groups go quiet ([`crate::quiesce`]): one [`Ping`] per peer and
//! interval ([`run_pinger`]) then replaces their heartbeats.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};
use std::time::Duration;

use arrowbus_wire::limits::MAX_BODY_BYTES;
use arrowbus_wire::peer::{
    self, AppendRequest, PeerRequest, PeerResponse, PeerRpc, Ping, Pong, WireEntry,
    CONTROLLER_GROUP, PEER_ALPN,
};
use arrowbus_wire::{BatchHeader, ErrorCode, BATCH_HEADER_BYTES};
use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;
use futures::stream::{BoxStream, StreamExt};
use openraft::async_runtime::WatchReceiver;
use openraft::entry::RaftEntry;
use openraft::errors::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::impls::BasicNode;
use openraft::network::{RPCOption, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, StreamAppendError,
    TransferLeaderRequest, TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::{EntryPayload, RaftNetworkV2, ServerState};

use crate::lock;

mod pipeline;
use crate::quiesce::{GroupStatus, Members, Quiescer, Role};
use crate::sm::{Applier, StateMachine};
use crate::types::{
    self, from_wire_log_id, from_wire_vote, wire_log_id, wire_vote, Entry, NodeId, Raft, Snapshot,
    SnapshotMeta, StoredMembership, TypeConfig, Vote,
};

/// How long connecting to a peer may take before the RPC counts as
/// unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// How often a peer that is down is probed with a handshake, and how long
/// that handshake may take (a live peer on a LAN answers in milliseconds;
/// a restarted one is found within one probe interval).
const DOWN_PROBE_EVERY: Duration = Duration::from_millis(500);
const DOWN_CONNECT_TIMEOUT: Duration = Duration::from_millis(300);

/// How long a peer connection may stay completely silent while RPCs wait
/// on it before it is replaced (see `PeerPool::note_silence`).
const DEAD_AFTER_SILENCE: Duration = Duration::from_millis(500);

/// Since when a peer connection has received nothing (by its datagram
/// count) while RPCs timed out on it.
struct Silence {
    conn: usize,
    received: u64,
    since: tokio::time::Instant,
}

/// Shortest time an append carrying entries may take (see `send_append`).
const APPEND_TIMEOUT_MIN: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PeerError(pub String);

/// Outgoing connections to peer nodes, shared by every group of this node.
pub struct PeerPool {
    me: NodeId,
    endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
    server_name: String,
    conns: Mutex<HashMap<String, quinn::Connection>>,
    silences: Mutex<HashMap<String, Silence>>,
    /// Peers whose last handshake failed (or whose connection went
    /// silent), with when they were last probed.
    down: Mutex<HashMap<String, tokio::time::Instant>>,
}

impl PeerPool {
    /// `client` must offer [`PEER_ALPN`] and trust the peers' certificates.
    pub fn new(
        me: NodeId,
        endpoint: quinn::Endpoint,
        client: quinn::ClientConfig,
        server_name: String,
    ) -> Arc<Self> {
        Arc::new(Self {
            me,
            endpoint,
            client,
            server_name,
            conns: Mutex::new(HashMap::new()),
            silences: Mutex::new(HashMap::new()),
            down: Mutex::new(HashMap::new()),
        })
    }

    pub fn node_id(&self) -> NodeId {
        self.me
    }

    async fn connection(&self, addr: &str) -> Result<quinn::Connection, PeerError> {
        if let Some(c) = lock(&self.conns).get(addr) {
            if c.close_reason().is_none() {
                return Ok(c.clone());
            }
        }
        // A peer known to be down is probed at most every DOWN_PROBE_EVERY,
        // with a short handshake; every other caller fails at once. Waiting
        // callers would hold their replication session's log range in
        // flight, and a leader cannot purge (retention) past such a range.
        let timeout = {
            let mut down = lock(&self.down);
            match down.get_mut(addr) {
                Some(last_probe) if last_probe.elapsed() < DOWN_PROBE_EVERY => {
                    return Err(PeerError(format!("{addr} is down (last handshake failed)")));
                }
                Some(last_probe) => {
                    *last_probe = tokio::time::Instant::now();
                    DOWN_CONNECT_TIMEOUT
                }
                None => CONNECT_TIMEOUT,
            }
        };
        let sock: SocketAddr = tokio::net::lookup_host(addr)
            .await
            .map_err(|e| PeerError(format!("resolve {addr}: {e}")))?
            .next()
            .ok_or_else(|| PeerError(format!("{addr} resolves to nothing")))?;
        let connecting = self
            .endpoint
            .connect_with(self.client.clone(), sock, &self.server_name)
            .map_err(|e| PeerError(format!("connect {addr}: {e}")))?;
        let conn = match tokio::time::timeout(timeout, connecting).await {
            Ok(Ok(c)) => c,
            failed => {
                lock(&self.down)
                    .entry(addr.to_owned())
                    .or_insert_with(tokio::time::Instant::now);
                return Err(PeerError(match failed {
                    Ok(Err(e)) => format!("connect {addr}: {e}"),
                    _ => format!("connect {addr}: timed out after {timeout:?}"),
                }));
            }
        };
        lock(&self.down).remove(addr);
        lock(&self.conns).insert(addr.to_owned(), conn.clone());
        Ok(conn)
    }

    /// One RPC: a request frame (and body) out, one response frame back.
    pub async fn call(
        &self,
        addr: &str,
        req: &PeerRequest,
        body: Bytes,
        timeout: Duration,
    ) -> Result<(PeerResponse, Bytes), PeerError> {
        let timed_out = || PeerError(format!("rpc to {addr} timed out after {timeout:?}"));
        let deadline = tokio::time::Instant::now() + timeout;
        let conn = tokio::time::timeout_at(deadline, self.connection(addr))
            .await
            .map_err(|_| timed_out())??;
        let started = tokio::time::Instant::now();
        let received_before = conn.stats().udp_rx.datagrams;
        let rpc = async {
            let (mut send, mut recv) = conn
                .open_bi()
                .await
                .map_err(|e| PeerError(format!("open stream to {addr}: {e}")))?;
            write_frame(&mut send, req, body).await?;
            let _ = send.finish();
            read_frame::<PeerResponse>(&mut recv)
                .await?
                .ok_or_else(|| PeerError(format!("{addr} closed the stream without answering")))
        };
        match tokio::time::timeout_at(deadline, rpc).await {
            Ok(answer) => answer,
            Err(_) => {
                let received = conn.stats().udp_rx.datagrams;
                if received == received_before {
                    self.note_silence(addr, &conn, received, started);
                }
                Err(timed_out())
            }
        }
    }

    /// Propose a controller command at node `addr` (which must lead the
    /// controller group): its reply bytes, or the leader it names instead.
    pub async fn propose_controller(
        &self,
        addr: &str,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Result<Vec<u8>, Option<NodeId>>, PeerError> {
        let req = PeerRequest {
            from: self.me,
            group: CONTROLLER_GROUP,
            rpc: PeerRpc::Propose,
        };
        match self.call(addr, &req, payload, timeout).await? {
            (PeerResponse::Proposed { reply }, _) => Ok(Ok(reply)),
            (PeerResponse::NotLeader { leader }, _) => Ok(Err(leader)),
            (PeerResponse::Error { code, message }, _) => Err(PeerError(format!(
                "{addr} refused the proposal ({code}): {message}"
            ))),
            (other, _) => Err(PeerError(format!(
                "{addr} answered a proposal with {other:?}"
            ))),
        }
    }

    /// Tell the node at `addr` that it was removed from the cluster.
    pub async fn notify_removed(&self, addr: &str, timeout: Duration) -> Result<(), PeerError> {
        let req = PeerRequest {
            from: self.me,
            group: CONTROLLER_GROUP,
            rpc: PeerRpc::Removed,
        };
        match self.call(addr, &req, Bytes::new(), timeout).await? {
            (PeerResponse::Acknowledged, _) => Ok(()),
            (other, _) => Err(PeerError(format!("{addr} answered Removed with {other:?}"))),
        }
    }

    /// An RPC on `conn` timed out without a single datagram (not even an
    /// ACK) coming back. When that silence has lasted [`DEAD_AFTER_SILENCE`]
    /// across RPCs, the process behind the connection is gone: a restarted
    /// peer is only found by a new handshake, since the old connection,
    /// backing off after its losses, would send its next packet (and meet
    /// the new process's stateless reset) seconds later. One short timeout
    /// on a busy node is not enough: closing a live connection fails every
    /// group's RPCs on it at once.
    fn note_silence(
        &self,
        addr: &str,
        conn: &quinn::Connection,
        received: u64,
        rpc_started: tokio::time::Instant,
    ) {
        let dead = {
            let mut silences = lock(&self.silences);
            match silences.get(addr) {
                Some(s) if s.conn == conn.stable_id() && s.received == received => {
                    let dead = s.since.elapsed() >= DEAD_AFTER_SILENCE;
                    if dead {
                        silences.remove(addr);
                    }
                    dead
                }
                _ => {
                    silences.insert(
                        addr.to_owned(),
                        Silence {
                            conn: conn.stable_id(),
                            received,
                            since: rpc_started,
                        },
                    );
                    false
                }
            }
        };
        if dead {
            self.forget(addr, conn);
        }
    }

    /// Whether RPCs to `addr` have been timing out without a datagram back
    /// (see [`PeerPool::note_silence`]) and nothing has arrived since.
    fn is_silent(&self, addr: &str) -> bool {
        let Some(conn) = lock(&self.conns).get(addr).cloned() else {
            return false;
        };
        let received = conn.stats().udp_rx.datagrams;
        lock(&self.silences)
            .get(addr)
            .is_some_and(|s| s.conn == conn.stable_id() && s.received == received)
    }

    /// Drop a dead connection so the next RPC to `addr` handshakes anew.
    fn forget(&self, addr: &str, dead: &quinn::Connection) {
        let mut conns = lock(&self.conns);
        if conns
            .get(addr)
            .is_some_and(|c| c.stable_id() == dead.stable_id())
        {
            conns.remove(addr);
            dead.close(quinn::VarInt::from_u32(0), b"peer stopped answering");
            lock(&self.down)
                .entry(addr.to_owned())
                // Due for a probe at once: a restarted peer is found by the
                // next RPC.
                .or_insert_with(|| {
                    let now = tokio::time::Instant::now();
                    now.checked_sub(DOWN_PROBE_EVERY).unwrap_or(now)
                });
        }
    }
}

/// The network factory of one group.
pub struct GroupNetwork {
    pool: Arc<PeerPool>,
    group: u64,
}

impl GroupNetwork {
    pub fn new(pool: Arc<PeerPool>, group: u64) -> Self {
        Self { pool, group }
    }
}

impl RaftNetworkFactory<TypeConfig> for GroupNetwork {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> PeerClient {
        PeerClient {
            pool: self.pool.clone(),
            group: self.group,
            target,
            addr: node.addr.clone(),
        }
    }
}

/// Sends one group's RPCs to one peer.
pub struct PeerClient {
    pool: Arc<PeerPool>,
    group: u64,
    target: NodeId,
    addr: String,
}

impl PeerClient {
    async fn rpc(
        &self,
        rpc: PeerRpc,
        body: Bytes,
        timeout: Duration,
    ) -> Result<(PeerResponse, Bytes), RPCError<TypeConfig>> {
        let req = PeerRequest {
            from: self.pool.me,
            group: self.group,
            rpc,
        };
        match self.pool.call(&self.addr, &req, body, timeout).await {
            Ok((PeerResponse::Error { code, message }, _)) => {
                let e = PeerError(format!(
                    "node {} refused: {message} (code {code})",
                    self.target
                ));
                Err(RPCError::Unreachable(Unreachable::new(&e)))
            }
            Ok(r) => Ok(r),
            Err(e) => Err(RPCError::Unreachable(Unreachable::new(&e))),
        }
    }

    fn unexpected(&self, what: &str) -> RPCError<TypeConfig> {
        let e = PeerError(format!(
            "node {} answered {what} with the wrong message",
            self.target
        ));
        RPCError::Network(NetworkError::new(&e))
    }

    async fn send_append(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: &RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        // openraft derives the append timeout from the heartbeat interval
        // (75 ms at 100 ms), which a follower fsyncing megabytes on a busy
        // disk overruns; a timed-out append is "unreachable" and backs the
        // replication off, so large batches would stall replication
        // exactly under load. Entries get a floor; empty heartbeats keep
        // openraft's timeout.
        // A peer that has gone silent keeps openraft's short timeout: a
        // long-pending append to a dead follower holds its log range in
        // flight, and the leader cannot purge (retention) past it.
        let timeout = append_timeout(
            option.soft_ttl(),
            rpc.entries.is_empty(),
            self.pool.is_silent(&self.addr),
        );
        let (req, body) =
            encode_append(&rpc).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        match self.rpc(PeerRpc::Append(req), body, timeout).await? {
            (PeerResponse::Append(r), _) => Ok(from_wire_append(r)),
            _ => Err(self.unexpected("append")),
        }
    }
}

impl RaftNetworkV2<TypeConfig> for PeerClient {
    type SnapshotData = Bytes;

    /// openraft's sequential stream, opened only once the peer is reachable.
    /// A stream opened to a dead peer fails per request, and openraft does
    /// not report such failures to its engine: a leader would then count
    /// the follower's whole log range as in flight and postpone every purge
    /// (retention) for as long as the follower is down. Failing at the start
    /// of the session is reported: openraft resets the in-flight state,
    /// purges, and backs off; the follower gets a snapshot when it is back.
    fn stream_append<'s, S>(
        &'s mut self,
        input: S,
        option: RPCOption,
    ) -> BoxFuture<
        's,
        Result<
            futures::stream::BoxStream<
                's,
                Result<openraft::raft::StreamAppendResult<TypeConfig>, RPCError<TypeConfig>>,
            >,
            RPCError<TypeConfig>,
        >,
    >
    where
        S: futures::Stream<Item = AppendEntriesRequest<TypeConfig>> + Send + Unpin + 'static,
    {
        // Pipelined: several appends in flight, in order, on one stream.
        Box::pin(async move {
            let results: BoxStream<'s, _> = pipeline::open(self, input, option).await?;
            Ok(results)
        })
    }

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        // One frame body holds at most MAX_BODY_BYTES: send what fits and
        // report partial success; openraft continues from there.
        let mut bytes = 0u64;
        let mut fit = 0;
        for e in &rpc.entries {
            let len = match &e.payload {
                EntryPayload::Normal(c) => c.body.len() as u64,
                _ => 0,
            };
            if fit > 0 && bytes + len > u64::from(MAX_BODY_BYTES) {
                break;
            }
            bytes += len;
            fit += 1;
        }
        if fit == rpc.entries.len() {
            return self.send_append(rpc, &option).await;
        }
        let mut rpc = rpc;
        rpc.entries.truncate(fit);
        let last = rpc.entries.last().map(|e| e.log_id());
        if let (Some(c), Some(l)) = (rpc.leader_commit, last) {
            if c.index > l.index {
                rpc.leader_commit = Some(l);
            }
        }
        match self.send_append(rpc, &option).await? {
            AppendEntriesResponse::Success => Ok(AppendEntriesResponse::PartialSuccess(last)),
            other => Ok(other),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        match self
            .rpc(
                PeerRpc::Vote(encode_vote(&rpc)),
                Bytes::new(),
                option.soft_ttl(),
            )
            .await?
        {
            (PeerResponse::Vote(r), _) => Ok(decode_vote_response(&r)),
            _ => Err(self.unexpected("vote")),
        }
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        match self
            .rpc(
                PeerRpc::PreVote(encode_vote(&rpc)),
                Bytes::new(),
                option.soft_ttl(),
            )
            .await?
        {
            (PeerResponse::Vote(r), _) => Ok(decode_vote_response(&r)),
            _ => Err(self.unexpected("pre-vote")),
        }
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let meta = &snapshot.meta;
        let req = peer::SnapshotRequest {
            vote: wire_vote(&vote),
            last_log_id: meta.last_log_id.as_ref().map(wire_log_id),
            membership_log_id: meta.last_membership.log_id().as_ref().map(wire_log_id),
            membership: types::wire_membership(meta.last_membership.membership()),
        };
        let call = self.rpc(
            PeerRpc::Snapshot(req),
            snapshot.snapshot.clone(),
            option.soft_ttl(),
        );
        tokio::select! {
            closed = cancel => Err(StreamingError::Closed(closed)),
            r = call => match r {
                Ok((PeerResponse::Snapshot(v), _)) => Ok(SnapshotResponse::new(from_wire_vote(&v))),
                Ok(_) => {
                    let e = PeerError(format!("node {} answered a snapshot with the wrong message", self.target));
                    Err(StreamingError::Unreachable(Unreachable::new(&e)))
                }
                Err(RPCError::Unreachable(u)) => Err(StreamingError::Unreachable(u)),
                Err(e) => {
                    let e = PeerError(e.to_string());
                    Err(StreamingError::Unreachable(Unreachable::new(&e)))
                }
            }
        }
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        let w = peer::TransferLeaderRequest {
            from_leader: wire_vote(req.from_leader()),
            to: *req.to_node_id(),
            last_log_id: req.last_log_id().map(wire_log_id),
        };
        match self
            .rpc(PeerRpc::TransferLeader(w), Bytes::new(), option.soft_ttl())
            .await?
        {
            (PeerResponse::TransferLeaderDone, _) => Ok(Ok(())),
            _ => Err(self.unexpected("transfer-leader")),
        }
    }
}

/// How long an append may take: openraft's timeout for an empty one (a
/// heartbeat) or to a silent peer, at least [`APPEND_TIMEOUT_MIN`] for
/// entries (see [`PeerClient::send_append`]).
fn append_timeout(ttl: Duration, empty: bool, peer_silent: bool) -> Duration {
    if empty || peer_silent {
        ttl
    } else {
        ttl.max(APPEND_TIMEOUT_MIN)
    }
}

fn from_wire_append(r: peer::AppendResponse) -> AppendEntriesResponse<TypeConfig> {
    match r {
        peer::AppendResponse::Success => AppendEntriesResponse::Success,
        peer::AppendResponse::PartialSuccess(l) => {
            AppendEntriesResponse::PartialSuccess(l.as_ref().map(from_wire_log_id))
        }
        peer::AppendResponse::Conflict => AppendEntriesResponse::Conflict,
        peer::AppendResponse::HigherVote(v) => {
            AppendEntriesResponse::HigherVote(from_wire_vote(&v))
        }
    }
}

fn encode_vote(rpc: &VoteRequest<TypeConfig>) -> peer::VoteRequest {
    peer::VoteRequest {
        vote: wire_vote(&rpc.vote),
        last_log_id: rpc.last_log_id.as_ref().map(wire_log_id),
        leadership_transfer: rpc.leadership_transfer,
    }
}

fn decode_vote_request(w: &peer::VoteRequest) -> VoteRequest<TypeConfig> {
    VoteRequest {
        vote: from_wire_vote(&w.vote),
        last_log_id: w.last_log_id.as_ref().map(from_wire_log_id),
        leadership_transfer: w.leadership_transfer,
    }
}

fn encode_vote_response(r: &VoteResponse<TypeConfig>) -> peer::VoteResponse {
    peer::VoteResponse {
        vote: wire_vote(&r.vote),
        vote_granted: r.vote_granted,
        last_log_id: r.last_log_id.as_ref().map(wire_log_id),
    }
}

fn decode_vote_response(w: &peer::VoteResponse) -> VoteResponse<TypeConfig> {
    VoteResponse {
        vote: from_wire_vote(&w.vote),
        vote_granted: w.vote_granted,
        last_log_id: w.last_log_id.as_ref().map(from_wire_log_id),
    }
}

/// Where an append's first entry must be: right after `prev_log_id`
/// (Raft indexes start at 0). A request whose entries start elsewhere would
/// make the follower keep whatever it holds in between as if it matched the
/// leader's log, so neither side lets one through.
fn check_follows_prev(
    prev_log_id: Option<&types::LogId>,
    first: Option<&Entry>,
) -> Result<(), String> {
    let want = prev_log_id.map_or(0, |p| p.index + 1);
    match first.map(|e| e.index()) {
        Some(got) if got != want => Err(format!(
            "entries start at index {got}, but prev_log_id says the next index is {want}"
        )),
        _ => Ok(()),
    }
}

fn encode_append(
    rpc: &AppendEntriesRequest<TypeConfig>,
) -> Result<(AppendRequest, Bytes), PeerError> {
    check_follows_prev(rpc.prev_log_id.as_ref(), rpc.entries.first())
        .map_err(|e| PeerError(format!("refusing to send a malformed append: {e}")))?;
    let mut body = BytesMut::new();
    let mut entries = Vec::with_capacity(rpc.entries.len());
    for e in &rpc.entries {
        let id = wire_log_id(&e.log_id);
        entries.push(match &e.payload {
            EntryPayload::Blank => WireEntry::Blank(id),
            EntryPayload::Membership(m) => WireEntry::Membership(id, types::wire_membership(m)),
            EntryPayload::Normal(cmd) => {
                body.extend_from_slice(&cmd.body);
                WireEntry::Data {
                    log_id: id,
                    header: cmd.header.encode().to_vec(),
                    body_len: u32::try_from(cmd.body.len())
                        .map_err(|_| PeerError("entry body exceeds 4 GiB".into()))?,
                }
            }
        });
    }
    Ok((
        AppendRequest {
            vote: wire_vote(&rpc.vote),
            prev_log_id: rpc.prev_log_id.as_ref().map(wire_log_id),
            leader_commit: rpc.leader_commit.as_ref().map(wire_log_id),
            entries,
        },
        body.freeze(),
    ))
}

/// Rebuild an append request from the wire, checking every entry's header
/// and body before any of it can reach a log.
fn decode_append(
    req: &AppendRequest,
    body: Bytes,
) -> Result<AppendEntriesRequest<TypeConfig>, String> {
    let mut at = 0usize;
    let mut entries: Vec<Entry> = Vec::with_capacity(req.entries.len());
    for w in &req.entries {
        entries.push(match w {
            WireEntry::Blank(id) => Entry::new_blank(from_wire_log_id(id)),
            WireEntry::Membership(id, m) => Entry::new_membership(
                from_wire_log_id(id),
                types::from_wire_membership(m).map_err(|e| e.to_string())?,
            ),
            WireEntry::Data {
                log_id,
                header,
                body_len,
            } => {
                if header.len() != BATCH_HEADER_BYTES {
                    return Err(format!(
                        "entry {} header is {} bytes",
                        log_id.index,
                        header.len()
                    ));
                }
                let h = BatchHeader::decode(header)
                    .map_err(|e| format!("entry {}: {e}", log_id.index))?;
                let end = at
                    .checked_add(*body_len as usize)
                    .filter(|end| *end <= body.len())
                    .ok_or_else(|| format!("entry {} body runs past the frame", log_id.index))?;
                let b = body.slice(at..end);
                at = end;
                h.verify_body(&b)
                    .map_err(|e| format!("entry {}: {e}", log_id.index))?;
                let id = from_wire_log_id(log_id);
                types::from_parts(id, h, b).map_err(|e| e.to_string())?
            }
        });
    }
    if at != body.len() {
        return Err(format!(
            "{} stray body bytes after the last entry",
            body.len() - at
        ));
    }
    for pair in entries.windows(2) {
        if pair[1].index() != pair[0].index() + 1 {
            return Err("entries are not consecutive".into());
        }
    }
    let prev_log_id = req.prev_log_id.as_ref().map(from_wire_log_id);
    check_follows_prev(prev_log_id.as_ref(), entries.first())?;
    Ok(AppendEntriesRequest {
        vote: from_wire_vote(&req.vote),
        prev_log_id,
        leader_commit: req.leader_commit.as_ref().map(from_wire_log_id),
        entries,
    })
}

// ---- receiving -------------------------------------------------------------

/// A group as the RPC server and the quiescer see it.
pub trait GroupRpc: Send + Sync + 'static {
    fn handle(&self, rpc: PeerRpc, body: Bytes) -> BoxFuture<'_, PeerResponse>;
    /// Append a stream of validated requests, pipelined; one answer per
    /// request, in order, each once its entries are durable (see
    /// [`pipeline`]). The answers end after the first that is not a
    /// success.
    fn append_stream(
        &self,
        input: BoxStream<'static, AppendEntriesRequest<TypeConfig>>,
    ) -> BoxStream<'static, PeerResponse>;
    /// The replica's Raft state, from its metrics (cheap: no message to
    /// the Raft core).
    fn status(&self) -> GroupStatus;
    /// The group's voters and members' addresses.
    fn members(&self) -> Members;
    /// Run or park the replica's Raft timer (elections, heartbeats).
    fn set_ticking(&self, on: bool);
    /// Whether the replica's Raft core answers a request within `timeout`.
    fn probe(&self, timeout: Duration) -> BoxFuture<'_, bool>;
    /// Leader: send a heartbeat now and wait (up to `timeout`) until a
    /// quorum acknowledged one sent after this call, i.e. openraft's leader
    /// lease is renewed. Whether it was. A sole voter's lease is its own:
    /// true at once.
    fn renew_lease(&self, timeout: Duration) -> BoxFuture<'_, bool>;
}

impl<A: Applier> GroupRpc for Raft<StateMachine<A>> {
    fn status(&self) -> GroupStatus {
        let rx = self.metrics();
        let m = rx.borrow_watched();
        let role = match m.state {
            ServerState::Leader => Role::Leader,
            ServerState::Follower => Role::Follower,
            _ => Role::Other,
        };
        let replicated = match (&m.replication, m.last_log_index) {
            (Some(rep), Some(last)) => rep
                .values()
                .all(|matched| matched.as_ref().map(|l| l.index) == Some(last)),
            _ => false,
        };
        GroupStatus {
            running: m.running_state.is_ok(),
            role,
            vote: wire_vote(&m.vote),
            last_log_index: m.last_log_index,
            committed: m.local_committed.as_ref().map(wire_log_id),
            membership: m.membership_config.log_id().as_ref().map(wire_log_id),
            replicated,
        }
    }

    fn members(&self) -> Members {
        let stored = self.metrics().borrow_watched().membership_config.clone();
        let m = stored.membership();
        let joint = m.get_joint_config().len() > 1;
        let mut voters: Vec<NodeId> = if joint {
            Vec::new()
        } else {
            m.voter_ids().collect()
        };
        voters.sort_unstable();
        Members {
            voters,
            addrs: m.nodes().map(|(id, n)| (*id, n.addr.clone())).collect(),
        }
    }

    fn set_ticking(&self, on: bool) {
        self.runtime_config().tick(on);
    }

    fn append_stream(
        &self,
        input: BoxStream<'static, AppendEntriesRequest<TypeConfig>>,
    ) -> BoxStream<'static, PeerResponse> {
        self.stream_append(input)
            .map(|r| match r {
                Ok(Ok(_)) => PeerResponse::Append(peer::AppendResponse::Success),
                Ok(Err(StreamAppendError::Conflict(_))) => {
                    PeerResponse::Append(peer::AppendResponse::Conflict)
                }
                Ok(Err(StreamAppendError::HigherVote(v))) => {
                    PeerResponse::Append(peer::AppendResponse::HigherVote(wire_vote(&v)))
                }
                Err(fatal) => PeerResponse::Error {
                    code: ErrorCode::Internal as u16,
                    message: fatal.to_string(),
                },
            })
            .boxed()
    }

    fn probe(&self, timeout: Duration) -> BoxFuture<'_, bool> {
        Box::pin(async move {
            matches!(
                tokio::time::timeout(timeout, self.with_raft_state(|_| ())).await,
                Ok(Ok(()))
            )
        })
    }

    fn renew_lease(&self, timeout: Duration) -> BoxFuture<'_, bool> {
        Box::pin(async move {
            // A sole voter is its own quorum: no heartbeat is answered, so
            // no ack would ever come, and openraft takes its writes as they
            // are (each is committed by the leader's own flush).
            let sole_voter = {
                let m = self.metrics().borrow_watched().clone();
                let mut voters = m.membership_config.membership().voter_ids();
                m.state == ServerState::Leader
                    && voters.next() == Some(m.id)
                    && voters.next().is_none()
            };
            if sole_voter {
                return true;
            }
            let since = <openraft::alias::InstantOf<TypeConfig> as openraft::Instant>::now();
            if self.trigger().heartbeat().await.is_err() {
                return false;
            }
            self.wait(Some(timeout))
                .metrics(
                    |m| m.last_quorum_acked.as_ref().is_some_and(|t| **t >= since),
                    "leader lease renewed",
                )
                .await
                .is_ok()
        })
    }

    fn handle(&self, rpc: PeerRpc, body: Bytes) -> BoxFuture<'_, PeerResponse> {
        Box::pin(async move {
            let refused = |e: String| PeerResponse::Error {
                code: ErrorCode::Internal as u16,
                message: e,
            };
            match rpc {
                PeerRpc::Append(req) => {
                    let req = match decode_append(&req, body) {
                        Ok(r) => r,
                        Err(e) => {
                            return PeerResponse::Error {
                                code: ErrorCode::CorruptBatch as u16,
                                message: e,
                            }
                        }
                    };
                    match self.append_entries(req).await {
                        Ok(r) => PeerResponse::Append(match r {
                            AppendEntriesResponse::Success => peer::AppendResponse::Success,
                            AppendEntriesResponse::PartialSuccess(l) => {
                                peer::AppendResponse::PartialSuccess(l.as_ref().map(wire_log_id))
                            }
                            AppendEntriesResponse::Conflict => peer::AppendResponse::Conflict,
                            AppendEntriesResponse::HigherVote(v) => {
                                peer::AppendResponse::HigherVote(wire_vote(&v))
                            }
                        }),
                        Err(e) => refused(e.to_string()),
                    }
                }
                PeerRpc::Vote(v) => match self.vote(decode_vote_request(&v)).await {
                    Ok(r) => PeerResponse::Vote(encode_vote_response(&r)),
                    Err(e) => refused(e.to_string()),
                },
                PeerRpc::PreVote(v) => match self.pre_vote(decode_vote_request(&v)).await {
                    Ok(r) => PeerResponse::Vote(encode_vote_response(&r)),
                    Err(e) => refused(e.to_string()),
                },
                PeerRpc::Snapshot(s) => {
                    let membership = match types::from_wire_membership(&s.membership) {
                        Ok(m) => m,
                        Err(e) => return refused(e.to_string()),
                    };
                    let meta = SnapshotMeta {
                        last_log_id: s.last_log_id.as_ref().map(from_wire_log_id),
                        last_membership: StoredMembership::new(
                            s.membership_log_id.as_ref().map(from_wire_log_id),
                            membership,
                        ),
                    };
                    let snap = Snapshot {
                        meta,
                        snapshot: body,
                    };
                    match self
                        .install_full_snapshot(from_wire_vote(&s.vote), snap)
                        .await
                    {
                        Ok(r) => PeerResponse::Snapshot(wire_vote(&r.vote)),
                        Err(e) => refused(e.to_string()),
                    }
                }
                PeerRpc::Removed => refused("Removed is a node message, not a group's".into()),
                PeerRpc::Propose => {
                    let cmd = crate::types::Command::controller(&body);
                    match self.client_write(cmd).await {
                        Ok(r) => PeerResponse::Proposed {
                            reply: r.data.reply.to_vec(),
                        },
                        Err(openraft::errors::RaftError::APIError(
                            openraft::errors::ClientWriteError::ForwardToLeader(f),
                        )) => PeerResponse::NotLeader {
                            leader: f.leader_id,
                        },
                        Err(e) => refused(e.to_string()),
                    }
                }
                // Pings are node-level ([`dispatch`] answers them).
                PeerRpc::AppendStream(_) => PeerResponse::Error {
                    code: ErrorCode::UnexpectedMessage as u16,
                    message: "an append stream frame outside an append stream".into(),
                },
                PeerRpc::Ping(_) => PeerResponse::Error {
                    code: ErrorCode::UnexpectedMessage as u16,
                    message: "a ping is not a group's RPC".into(),
                },
                PeerRpc::TransferLeader(t) => {
                    let req = TransferLeaderRequest::new(
                        from_wire_vote(&t.from_leader),
                        t.to,
                        t.last_log_id.as_ref().map(from_wire_log_id),
                    );
                    match self.handle_transfer_leader(req).await {
                        Ok(Ok(())) => PeerResponse::TransferLeaderDone,
                        Ok(Err(e)) => refused(e.to_string()),
                        Err(e) => refused(e.to_string()),
                    }
                }
            }
        })
    }
}

/// The groups this node hosts, by group id, and the node's quiescer.
#[derive(Default)]
pub struct GroupRegistry {
    groups: RwLock<HashMap<u64, Arc<dyn GroupRpc>>>,
    /// Set (to the sender's id) when a peer says this node was removed
    /// from the cluster.
    removed: tokio::sync::watch::Sender<Option<NodeId>>,
    quiet: OnceLock<Arc<Quiescer>>,
    /// The node's outgoing connections (set when its first group opens).
    pool: OnceLock<Arc<PeerPool>>,
    /// Nodes told they are no longer members, and when.
    told_removed: Mutex<HashMap<NodeId, tokio::time::Instant>>,
}

/// How often a node that is not a member is told so, at most, while it
/// keeps asking for votes.
const REMOVED_NOTICE_EVERY: Duration = Duration::from_secs(5);
/// How long telling it may take.
const REMOVED_NOTICE_TIMEOUT: Duration = Duration::from_secs(2);

impl GroupRegistry {
    /// Changes to `Some(by)` when this node is told it left the cluster.
    pub fn removed(&self) -> tokio::sync::watch::Receiver<Option<NodeId>> {
        self.removed.subscribe()
    }

    /// Start the node's quiescer and its pinger (once; later calls do
    /// nothing). Until then pings are answered without quieting anything.
    pub fn start_quiet(self: &Arc<Self>, quiescer: Quiescer, pool: Arc<PeerPool>) {
        let mut started = false;
        let q = self.quiet.get_or_init(|| {
            started = true;
            Arc::new(quiescer)
        });
        if started {
            tokio::spawn(run_pinger(q.clone(), Arc::downgrade(self), pool));
        }
    }

    /// The node's quiescer, once started.
    pub fn quiescer(&self) -> Option<&Arc<Quiescer>> {
        self.quiet.get()
    }

    /// The pool used to answer peers outside a group RPC (once; later calls
    /// do nothing).
    pub fn set_pool(&self, pool: Arc<PeerPool>) {
        let _ = self.pool.set(pool);
    }

    /// Node `from`, at `addr`, asked for a controller (pre-)vote. If this
    /// node leads the controller and `from` is none of its members, `from`
    /// was removed while it was down (the removal's own notice could not
    /// reach it) and, restarted on its old data, campaigns for a
    /// membership that no longer exists, for ever. Tell it, so that it
    /// stops as a node removed while up does. Only the leader judges: its
    /// membership is the newest there is, so a node being added (already a
    /// learner there) is never told.
    fn tell_if_removed(&self, from: NodeId, addr: SocketAddr) {
        let Some(g) = self.get(CONTROLLER_GROUP) else {
            return;
        };
        if g.status().role != Role::Leader || g.members().addrs.iter().any(|(id, _)| *id == from) {
            return;
        }
        let Some(pool) = self.pool.get().cloned() else {
            return;
        };
        {
            let mut told = lock(&self.told_removed);
            let now = tokio::time::Instant::now();
            if told
                .get(&from)
                .is_some_and(|t| now.duration_since(*t) < REMOVED_NOTICE_EVERY)
            {
                return;
            }
            told.insert(from, now);
        }
        tracing::warn!(
            node = from,
            %addr,
            "a node that is not a member of the cluster asks for controller votes: telling it it was removed"
        );
        tokio::spawn(async move {
            if let Err(e) = pool
                .notify_removed(&addr.to_string(), REMOVED_NOTICE_TIMEOUT)
                .await
            {
                tracing::debug!(node = from, error = %e, "could not tell a removed node");
            }
        });
    }

    /// A quiescer without its pinger (tests drive it by hand).
    #[cfg(test)]
    pub(crate) fn set_quiescer(&self, q: Quiescer) {
        let _ = self.quiet.set(Arc::new(q));
    }

    /// Call before proposing to group `group`. openraft (0.10) refuses a
    /// write on a leader whose quorum lease has run out, and a quiet leader
    /// sends no heartbeats, so its lease is out: this wakes a quiet leader
    /// and waits (up to the lease) for one heartbeat round to renew it,
    /// about one round trip. A group that is not quiet returns at once. Any
    /// path that proposes to a partition group (data, membership changes)
    /// must call it; the controller group never goes quiet.
    pub async fn ready_to_write(&self, group: u64) {
        let (Some(q), Some(g)) = (self.quiet.get(), self.get(group)) else {
            return;
        };
        if q.wake_for_write(group, &*g, tokio::time::Instant::now())
            && !g.renew_lease(q.config().lease).await
        {
            tracing::debug!(group, "woken quiet leader did not renew its lease in time");
        }
    }

    fn all(&self) -> Vec<(u64, Arc<dyn GroupRpc>)> {
        self.groups
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(id, g)| (*id, g.clone()))
            .collect()
    }

    /// Answer a peer's ping (see [`crate::quiesce`]).
    pub fn on_ping(&self, from: NodeId, ping: &Ping) -> Pong {
        match self.quiet.get() {
            Some(q) => q.on_ping(from, ping, &|g| self.get(g), tokio::time::Instant::now()),
            None => Pong {
                incarnation: 0,
                answers: vec![peer::QuietAnswer::Differs; ping.claims.len()],
            },
        }
    }

    pub fn insert(&self, group: u64, g: Arc<dyn GroupRpc>) {
        self.groups
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(group, g);
    }
    pub fn remove(&self, group: u64) {
        self.groups
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&group);
    }
    pub fn get(&self, group: u64) -> Option<Arc<dyn GroupRpc>> {
        self.groups
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&group)
            .cloned()
    }
}

/// Serve one peer connection until it closes: one RPC per stream.
pub async fn serve_peer_connection(conn: quinn::Connection, registry: Arc<GroupRegistry>) {
    loop {
        let (mut send, mut recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(_) => return,
        };
        let registry = registry.clone();
        let remote = conn.remote_address();
        tokio::spawn(async move {
            let resp = match read_frame::<PeerRequest>(&mut recv).await {
                Ok(Some((req, body))) if matches!(req.rpc, PeerRpc::AppendStream(_)) => {
                    return pipeline::serve(&registry, req, body, send, recv).await;
                }
                Ok(Some((req, body))) => {
                    // Peers dial from their listening socket: `remote` is
                    // where the sender is served.
                    if req.group == CONTROLLER_GROUP
                        && matches!(req.rpc, PeerRpc::Vote(_) | PeerRpc::PreVote(_))
                    {
                        registry.tell_if_removed(req.from, remote);
                    }
                    dispatch(&registry, req, body).await
                }
                Ok(None) => return,
                Err(e) => PeerResponse::Error {
                    code: ErrorCode::MalformedFrame as u16,
                    message: e.0,
                },
            };
            if write_frame(&mut send, &resp, Bytes::new()).await.is_ok() {
                let _ = send.finish();
            }
        });
    }
}

/// One request to its handler: a ping to the quiescer, the rest to their
/// group. A (pre-)vote for a group that is quiet here under a live lease is
/// refused without reaching openraft (see [`Quiescer::refuses_vote`]).
pub async fn dispatch(registry: &GroupRegistry, req: PeerRequest, body: Bytes) -> PeerResponse {
    match &req.rpc {
        PeerRpc::Ping(ping) => return PeerResponse::Pong(registry.on_ping(req.from, ping)),
        PeerRpc::Removed => {
            tracing::warn!(by = req.from, "this node was removed from the cluster");
            registry.removed.send_replace(Some(req.from));
            return PeerResponse::Acknowledged;
        }
        // Data batches go through the client protocol, which validates
        // them; peers only forward metadata changes.
        PeerRpc::Propose if req.group != CONTROLLER_GROUP => {
            return PeerResponse::Error {
                code: ErrorCode::InvalidArgument as u16,
                message: format!(
                    "group {}: only the controller takes forwarded proposals",
                    req.group
                ),
            };
        }
        _ => {}
    }
    let Some(g) = registry.get(req.group) else {
        return PeerResponse::Error {
            code: ErrorCode::PartitionNotFound as u16,
            message: format!("group {} is not hosted on this node (yet)", req.group),
        };
    };
    if let (PeerRpc::Vote(v) | PeerRpc::PreVote(v), Some(q)) = (&req.rpc, registry.quiescer()) {
        if let Some(refusal) = q.refuses_vote(
            req.from,
            req.group,
            &*g,
            v.leadership_transfer,
            tokio::time::Instant::now(),
        ) {
            tracing::debug!(
                group = req.group,
                from = req.from,
                "vote refused: the group is quiet under a live lease"
            );
            return PeerResponse::Vote(refusal);
        }
    }
    g.handle(req.rpc, body).await
}

/// The node's pinger: every heartbeat interval one [`Ping`] to each peer
/// (each bounded by the lease; up to a lease's worth unanswered per peer),
/// and probes of quiet leaders' Raft cores. Ends when the registry is
/// dropped.
async fn run_pinger(q: Arc<Quiescer>, registry: Weak<GroupRegistry>, pool: Arc<PeerPool>) {
    let mut every = tokio::time::interval(q.config().ping_every);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let Some(reg) = registry.upgrade() else {
            return;
        };
        let round = q.round(&reg.all(), tokio::time::Instant::now());
        drop(reg);
        for out in round.pings {
            let (q, pool, registry) = (q.clone(), pool.clone(), registry.clone());
            tokio::spawn(async move {
                let claims = out.ping.claims.clone();
                let req = PeerRequest {
                    from: pool.me,
                    group: CONTROLLER_GROUP,
                    rpc: PeerRpc::Ping(out.ping),
                };
                let pong = match pool
                    .call(&out.addr, &req, Bytes::new(), q.config().lease)
                    .await
                {
                    Ok((PeerResponse::Pong(p), _)) => Some(p),
                    // A node that cannot read pings (an older version)
                    // is alive, but quiets nothing: it must never be taken
                    // for gone, or its replicas would lose their heartbeats.
                    Ok(_) => Some(Pong {
                        incarnation: 0,
                        answers: vec![peer::QuietAnswer::Differs; claims.len()],
                    }),
                    Err(_) => None,
                };
                let lookup = |g: u64| registry.upgrade().and_then(|r| r.get(g));
                q.on_pong(
                    out.peer,
                    &claims,
                    pong,
                    &lookup,
                    tokio::time::Instant::now(),
                );
            });
        }
        for (id, g, at) in round.wakes {
            let q = q.clone();
            tokio::spawn(async move {
                tokio::time::sleep_until(at).await;
                q.wake_due(id, &*g, at, tokio::time::Instant::now());
            });
        }
        for (id, g) in round.probes {
            let q = q.clone();
            tokio::spawn(async move {
                if !g.probe(q.config().probe_timeout).await {
                    q.probe_failed(id, &*g, tokio::time::Instant::now());
                }
            });
        }
    }
}

/// Whether an accepted connection speaks the peer protocol.
pub fn is_peer_connection(conn: &quinn::Connection) -> bool {
    conn.handshake_data()
        .and_then(|h| h.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|h| h.protocol)
        .is_some_and(|p| p == PEER_ALPN)
}

// ---- framing ---------------------------------------------------------------

async fn write_frame<M: arrowbus_wire::codec::Message>(
    send: &mut quinn::SendStream,
    msg: &M,
    body: Bytes,
) -> Result<(), PeerError> {
    let head =
        arrowbus_wire::encode_frame(msg, body.len()).map_err(|e| PeerError(e.to_string()))?;
    let mut chunks = [Bytes::from(head), body];
    send.write_all_chunks(&mut chunks)
        .await
        .map_err(|e| PeerError(format!("write: {e}")))
}

async fn read_frame<M: arrowbus_wire::codec::Message>(
    recv: &mut quinn::RecvStream,
) -> Result<Option<(M, Bytes)>, PeerError> {
    use arrowbus_wire::{FrameHeader, FRAME_HEADER_BYTES};
    let mut head = [0u8; FRAME_HEADER_BYTES];
    match recv.read_exact(&mut head).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(e) => return Err(PeerError(format!("read: {e}"))),
    }
    let header = FrameHeader::decode(&head, M::DIRECTION).map_err(|e| PeerError(e.to_string()))?;
    let control = arrowbus_quic::read_exact_vec(recv, header.control_len as usize)
        .await
        .map_err(|e| PeerError(format!("read: {e}")))?;
    let msg = arrowbus_wire::decode_control::<M>(&control).map_err(|e| PeerError(e.to_string()))?;
    let body = arrowbus_quic::read_exact_vec(recv, header.body_len as usize)
        .await
        .map_err(|e| PeerError(format!("read: {e}")))?;
    Ok(Some((msg, Bytes::from(body))))
}

#[cfg(test)]
mod append_tests {
    use super::*;
    use crate::types::{log_id, Command, Vote};

    fn request(prev: Option<u64>, first: u64, n: u64) -> AppendEntriesRequest<TypeConfig> {
        AppendEntriesRequest {
            vote: Vote::new_committed(2, 1),
            prev_log_id: prev.map(|p| log_id(2, 1, p)),
            leader_commit: None,
            entries: (first..first + n)
                .map(|i| Entry::new_normal(log_id(2, 1, i), Command::controller(&[i as u8])))
                .collect(),
        }
    }

    #[test]
    fn appends_whose_entries_follow_prev_round_trip() {
        for (prev, first) in [(None, 0), (Some(4), 5)] {
            let (req, body) = encode_append(&request(prev, first, 3)).unwrap();
            let back = decode_append(&req, body).unwrap();
            let idx: Vec<u64> = back.entries.iter().map(|e| e.index()).collect();
            assert_eq!(idx, vec![first, first + 1, first + 2]);
            assert_eq!(back.prev_log_id.map(|p| p.index), prev);
        }
        // A heartbeat (no entries) follows any prev.
        let (req, body) = encode_append(&request(Some(9), 10, 0)).unwrap();
        assert!(decode_append(&req, body).unwrap().entries.is_empty());
    }

    #[test]
    fn entries_that_skip_or_overlap_prev_are_refused_on_both_sides() {
        // prev 4 but entries from 6 (a gap: the follower would keep its
        // entry 5 as if it were the leader's), from 4 (overlap), and a
        // first append that does not start at index 0.
        for (prev, first) in [(Some(4), 6), (Some(4), 4), (None, 1)] {
            let rpc = request(prev, first, 2);
            let err = encode_append(&rpc).unwrap_err();
            assert!(err.0.contains("malformed append"), "{}", err.0);
            // A peer that sends one anyway is refused by the receiver: a
            // well-formed request with its prev_log_id changed on the wire.
            let (mut req, body) = encode_append(&request(Some(first - 1), first, 2)).unwrap();
            req.prev_log_id = prev.map(|p| wire_log_id(&log_id(2, 1, p)));
            let err = decode_append(&req, body).unwrap_err();
            assert!(err.contains("prev_log_id says the next index"), "{err}");
        }
    }
}
