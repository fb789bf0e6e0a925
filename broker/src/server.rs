//! The QUIC server: accepts connections, dispatches each bidirectional stream
//! by its first frame (unary request, producer pipeline, subscription), and
//! turns broker errors into error frames. It owns no data: topics and logs
//! live in [`Topics`].

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arrowbus_raft::log::{CachedRead, Cursor, StoredBatch};
use arrowbus_wire::limits::{
    MAX_BATCH_BYTES, MAX_CONNECTIONS, MAX_CREDIT_BATCHES_PER_SUBSCRIPTION,
    MAX_CREDIT_BYTES_PER_SUBSCRIPTION, MAX_INFLIGHT_BATCHES_PER_PRODUCER,
    MAX_SUBSCRIPTIONS_PER_CONNECTION,
};
use arrowbus_wire::peer::partition_group;
use arrowbus_wire::{
    Ack, BatchDelivery, BatchHeader, BatchKind, ClientMessage, ClusterMetadata, CreateTopic,
    Credit, ErrorCode, ErrorReply, Frame, Publish, ServerMessage, StartAt, Subscribe, Subscribed,
    BATCH_HEADER_BYTES,
};
use bytes::Bytes;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::config::BrokerConfig;
use crate::error::BrokerError;
use crate::framing::{read_frame, write_frame, write_frame_parts, ReadError};
use crate::ipc;
use crate::topics::{write_error, NewTopic, Proposal, Topics};

/// Bodies at least this large are decoded on the blocking pool: validating a
/// large batch takes long enough to stall other connections' tasks.
const BLOCKING_DECODE_MIN_BYTES: usize = 64 * 1024;
/// Most batches read from the log per blocking read call: bounds the latency
/// one subscription's read adds before its first batch is sent.
const READ_BATCHES_PER_CALL_MAX: usize = 64;
/// Most bytes read from the log per blocking read call (beyond the first batch).
const READ_BYTES_PER_CALL_MAX: u64 = 4 * 1024 * 1024;
/// How long a publish waits for this node to apply the topic's schema (set
/// at the controller leader just before, by the client's first publish).
const SCHEMA_APPLY_WAIT: Duration = Duration::from_secs(1);
/// How often an idle subscription checks that its replica still leads.
const SUBSCRIBER_LEADER_CHECK: Duration = Duration::from_millis(500);
/// How long an idle subscription stays on a replica that no longer leads
/// before it is ended with `NotLeader` (a leader change usually completes
/// well within it, and then the subscription just carries on).
const SUBSCRIBER_LEADER_GRACE: Duration = Duration::from_secs(2);
/// How long a graceful shutdown waits for in-flight publishes to be acknowledged.
const SHUTDOWN_DRAIN_MAX: Duration = Duration::from_secs(10);
/// QUIC application close code sent to clients on shutdown.
pub const CLOSE_SHUTDOWN: u32 = 1;
/// QUIC application close code for refused connections (limit reached).
pub const CLOSE_TOO_MANY_CONNECTIONS: u32 = 2;

pub struct Broker {
    pub config: BrokerConfig,
    pub topics: Arc<Topics>,
    shutting_down: AtomicBool,
    connections: AtomicUsize,
    /// Publishes enqueued and not yet answered: what a graceful shutdown waits for.
    inflight_publishes: AtomicUsize,
    /// Test-only: acknowledge publishes before they commit (see [`UNSAFE_ACK_ENV`]).
    unsafe_ack_before_commit: bool,
}

/// Setting this environment variable to `1` makes busd acknowledge publishes
/// as soon as they are proposed, before any replica (the leader included)
/// has fsynced them. It exists only so that the fault-injection harness
/// (`jepsen-like`) can prove it detects lost acknowledged writes; it breaks
/// the durability promise and must never be set in production.
pub const UNSAFE_ACK_ENV: &str = "ARROWBUS_UNSAFE_ACK_BEFORE_COMMIT";

impl Broker {
    pub fn new(config: BrokerConfig, topics: Arc<Topics>) -> Arc<Self> {
        Arc::new(Self {
            config,
            topics,
            shutting_down: AtomicBool::new(false),
            connections: AtomicUsize::new(0),
            inflight_publishes: AtomicUsize::new(0),
            unsafe_ack_before_commit: {
                let on = std::env::var(UNSAFE_ACK_ENV).is_ok_and(|v| v == "1");
                if on {
                    warn!("{UNSAFE_ACK_ENV}=1: publishes are acknowledged BEFORE they are durable or replicated; acknowledged data WILL be lost on failures. Test use only.");
                }
                on
            },
        })
    }

    /// Accept connections until `shutdown` fires, then drain and close.
    pub async fn serve(
        self: Arc<Self>,
        endpoint: quinn::Endpoint,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut conns = JoinSet::new();
        let retention = tokio::spawn(self.clone().retention_loop(shutdown.clone()));
        loop {
            tokio::select! {
                incoming = endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    if self.connections.load(Ordering::Relaxed) >= MAX_CONNECTIONS {
                        warn!(remote = %incoming.remote_address(), "refusing connection: {MAX_CONNECTIONS} connections open");
                        incoming.refuse();
                        continue;
                    }
                    let broker = self.clone();
                    conns.spawn(async move { broker.connection(incoming).await });
                }
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
                _ = shutdown.changed() => break,
            }
        }
        info!("shutting down: handing over leadership, refusing new publishes, draining in-flight ones");
        self.shutting_down.store(true, Ordering::SeqCst);
        // While the peers are still connected: move leadership away so
        // clients fail over at once instead of after an election timeout.
        self.topics.transfer_leadership().await;
        endpoint.set_server_config(None);
        let deadline = tokio::time::Instant::now() + SHUTDOWN_DRAIN_MAX;
        while self.inflight_publishes.load(Ordering::SeqCst) > 0
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        endpoint.close(CLOSE_SHUTDOWN.into(), b"broker shutting down");
        conns.shutdown().await;
        retention.abort();
        let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
        self.topics.close_all().await;
        info!("shutdown complete");
    }

    async fn retention_loop(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let every = Duration::from_millis(self.config.log.retention_check_interval_ms);
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = shutdown.changed() => return,
            }
            // Through Raft, never behind its back: a replicated partition's
            // log is also its Raft log, which a lagging follower may still
            // need. Each partition is snapshotted at its retention cut and
            // openraft purges up to it (`Partition::enforce_retention`).
            let now = crate::topics::now_ms();
            for t in self.topics.list() {
                if t.meta.retention_ms.is_none() && t.meta.retention_bytes.is_none() {
                    continue;
                }
                for p in (0..t.partitions()).filter_map(|p| t.partition(p).ok()) {
                    match p
                        .enforce_retention(now, t.meta.retention_ms, t.meta.retention_bytes)
                        .await
                    {
                        Ok(Some(cut)) => {
                            debug!(topic = %t.meta.name, partition = p.id, cut, "retention: snapshot at the cut, purge requested")
                        }
                        Ok(None) => {}
                        Err(e) => {
                            warn!(topic = %t.meta.name, partition = p.id, error = %e, "retention failed")
                        }
                    }
                }
            }
        }
    }

    async fn connection(self: Arc<Self>, incoming: quinn::Incoming) {
        let remote = incoming.remote_address();
        let conn = match incoming.await {
            Ok(c) => c,
            Err(e) => {
                debug!(%remote, error = %e, "handshake failed");
                return;
            }
        };
        if arrowbus_raft::network::is_peer_connection(&conn) {
            debug!(%remote, "peer node connected");
            arrowbus_raft::network::serve_peer_connection(conn, self.topics.registry()).await;
            return;
        }
        self.connections.fetch_add(1, Ordering::Relaxed);
        let _guard = CountGuard(&self.connections);
        let span = info_span!("conn", %remote);
        async {
            debug!("connected");
            let subscriptions = Arc::new(AtomicUsize::new(0));
            let mut streams = JoinSet::new();
            loop {
                tokio::select! {
                    s = conn.accept_bi() => match s {
                        Ok((send, recv)) => {
                            let broker = self.clone();
                            let subs = subscriptions.clone();
                            streams.spawn(async move { broker.stream(send, recv, subs).await });
                        }
                        Err(e) => {
                            debug!(reason = %e, "connection closed");
                            break;
                        }
                    },
                    Some(_) = streams.join_next(), if !streams.is_empty() => {}
                }
            }
            // Dropping the JoinSet aborts the connection's streams: they own
            // nothing that outlives the connection.
        }
        .instrument(span)
        .await;
    }

    async fn stream(
        self: Arc<Self>,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
        subs: Arc<AtomicUsize>,
    ) {
        let first = match read_frame::<ClientMessage>(&mut recv).await {
            Ok(Some(f)) => f,
            Ok(None) => return,
            Err(e) => {
                reject_stream(
                    &mut send,
                    &mut recv,
                    ErrorCode::for_read_error(&e),
                    e.to_string(),
                )
                .await;
                return;
            }
        };
        match first.msg {
            ClientMessage::Publish(p) => self.publish_pipeline(send, recv, p, first.body).await,
            ClientMessage::Subscribe(s) => {
                if subs.fetch_add(1, Ordering::SeqCst) >= MAX_SUBSCRIPTIONS_PER_CONNECTION {
                    subs.fetch_sub(1, Ordering::SeqCst);
                    let msg = format!(
                        "this connection already has {MAX_SUBSCRIPTIONS_PER_CONNECTION} subscriptions; open another connection"
                    );
                    reject_stream(&mut send, &mut recv, ErrorCode::TooManySubscriptions, msg).await;
                    return;
                }
                let _guard = CountGuard(&subs);
                let span = info_span!("sub", topic = %s.topic, partition = s.partition);
                self.subscription(send, recv, s).instrument(span).await
            }
            ClientMessage::Credit(_) => {
                let msg = "Credit is only valid on a subscription stream, after Subscribe";
                reject_stream(
                    &mut send,
                    &mut recv,
                    ErrorCode::UnexpectedMessage,
                    msg.into(),
                )
                .await;
            }
            other => {
                let reply = match self.unary(other).await {
                    Ok(m) => m,
                    Err(e) => ServerMessage::Error(e.reply(0)),
                };
                if write_frame(&mut send, &reply, Bytes::new()).await.is_ok() {
                    let _ = send.finish();
                }
            }
        }
    }

    async fn unary(self: &Arc<Self>, msg: ClientMessage) -> Result<ServerMessage, BrokerError> {
        match msg {
            ClientMessage::CreateTopic(c) => {
                let CreateTopic {
                    name,
                    partitions,
                    replication_factor,
                    retention_ms,
                    retention_bytes,
                    schema_ipc,
                } = c;
                let defaults = (
                    self.config.log.default_retention_ms,
                    self.config.log.default_retention_bytes,
                );
                let topic = self
                    .topics
                    .create(
                        NewTopic {
                            name,
                            partitions,
                            replication_factor,
                            retention_ms,
                            retention_bytes,
                            schema_ipc,
                        },
                        defaults,
                    )
                    .await?;
                info!(topic = %topic.meta.name, partitions = topic.partitions(), replication_factor = topic.meta.replication_factor, "topic created");
                Ok(ServerMessage::Topic(topic.info()))
            }
            ClientMessage::DeleteTopic { topic } => {
                self.topics.delete(&topic).await?;
                info!(%topic, "topic deleted");
                Ok(ServerMessage::TopicDeleted { topic })
            }
            ClientMessage::ListTopics => Ok(ServerMessage::Topics(
                self.topics.list().iter().map(|t| t.info()).collect(),
            )),
            ClientMessage::DescribeTopic { topic } => {
                Ok(ServerMessage::Topic(self.topics.get(&topic)?.info()))
            }
            ClientMessage::Metadata => Ok(ServerMessage::Metadata(ClusterMetadata {
                nodes: self.topics.nodes(),
            })),
            ClientMessage::ClusterStatus => Ok(ServerMessage::Cluster(
                self.topics.status(self.config.advertised()),
            )),
            ClientMessage::AddNode { id, addr } => {
                let change = self.topics.add_node(id, &addr).await?;
                info!(node = id, %addr, moves = change.moves.len(), "node added");
                Ok(ServerMessage::NodeChange(node_change(change)))
            }
            ClientMessage::RemoveNode { id } => {
                let change = self.topics.remove_node(id).await?;
                if change.removed {
                    info!(node = id, "node removed");
                }
                Ok(ServerMessage::NodeChange(node_change(change)))
            }
            ClientMessage::SetSchemaIfAbsent { topic, schema_ipc } => {
                let s = self
                    .topics
                    .set_schema_if_absent(&topic, &schema_ipc)
                    .await?;
                Ok(ServerMessage::Schema {
                    schema_id: s.id,
                    schema_ipc: s.ipc.to_vec(),
                })
            }
            ClientMessage::Publish(_) | ClientMessage::Subscribe(_) | ClientMessage::Credit(_) => {
                Err(BrokerError::new(
                    ErrorCode::UnexpectedMessage,
                    "streaming message in a unary request",
                ))
            }
        }
    }

    /// A producer pipeline: publishes are validated and enqueued in arrival
    /// order by this task; their acks are written in the same order by a
    /// second one. The channel between them holds at most the in-flight
    /// window, so a producer that sends faster than the log syncs is slowed by
    /// QUIC flow control, not buffered.
    async fn publish_pipeline(
        self: Arc<Self>,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
        first: Publish,
        first_body: Vec<u8>,
    ) {
        let (tx, mut rx) = mpsc::channel::<(Publish, Result<Proposal, BrokerError>)>(
            MAX_INFLIGHT_BATCHES_PER_PRODUCER,
        );
        let broker = self.clone();
        let acker = async move {
            let mut client_gone = false;
            while let Some((p, res)) = rx.recv().await {
                let reply = match res {
                    Ok(proposal) if broker.unsafe_ack_before_commit => {
                        // Test-only (see UNSAFE_ACK_ENV): answer now and let
                        // replication happen, or not, afterwards.
                        broker.inflight_publishes.fetch_sub(1, Ordering::SeqCst);
                        ServerMessage::Ack(Ack {
                            request_id: p.request_id,
                            partition: p.partition,
                            base_offset: proposal.predicted_base_offset,
                            rows: proposal.rows,
                            timestamp_ms: proposal.timestamp_ms,
                        })
                    }
                    Ok(proposal) => {
                        let r = proposal.rx.await;
                        broker.inflight_publishes.fetch_sub(1, Ordering::SeqCst);
                        let what = format!("partition {}/{}", p.topic, p.partition);
                        match r {
                            Ok(Ok(resp)) => ServerMessage::Ack(Ack {
                                request_id: p.request_id,
                                partition: p.partition,
                                base_offset: resp.data.base_offset,
                                rows: resp.data.rows,
                                timestamp_ms: resp.data.timestamp_ms,
                            }),
                            Ok(Err(e)) => ServerMessage::Error(write_error(e, &what).reply(p.request_id)),
                            // The group stopped before answering (shutdown or
                            // topic deleted): the batch may or may not commit.
                            Err(_) => ServerMessage::Error(
                                BrokerError::new(ErrorCode::ShuttingDown, format!("{what} stopped before the batch committed; it may or may not be stored"))
                                    .reply(p.request_id),
                            ),
                        }
                    }
                    Err(e) => ServerMessage::Error(e.reply(p.request_id)),
                };
                // Once the client is gone, keep awaiting the enqueued
                // publishes (they are still stored) so the in-flight count a
                // graceful shutdown waits for stays exact; just stop writing.
                if !client_gone && write_frame(&mut send, &reply, Bytes::new()).await.is_err() {
                    client_gone = true;
                }
            }
            if !client_gone {
                let _ = send.finish();
            }
        };
        let broker = self.clone();
        let reader = async move {
            let mut next = Some((first, first_body));
            loop {
                let (p, body) = match next.take() {
                    Some(x) => x,
                    None => {
                        match read_frame::<ClientMessage>(&mut recv).await {
                            Ok(Some(Frame {
                                msg: ClientMessage::Publish(p),
                                body,
                            })) => (p, body),
                            Ok(None) => break,
                            other => {
                                // The stream itself is broken: answer with a
                                // stream-level error (request id 0) and stop.
                                let e = match other {
                                Err(e) => BrokerError::new(ErrorCode::for_read_error(&e), e.to_string()),
                                Ok(_) => BrokerError::new(
                                    ErrorCode::UnexpectedMessage,
                                    "only Publish frames may follow a Publish on a producer stream",
                                ),
                            };
                                let stream_level = Publish {
                                    request_id: 0,
                                    topic: String::new(),
                                    partition: 0,
                                };
                                let _ = tx.send((stream_level, Err(e))).await;
                                break;
                            }
                        }
                    }
                };
                let res = broker
                    .clone()
                    .validate_and_enqueue(&p, Bytes::from(body))
                    .await;
                if res.is_ok() {
                    broker.inflight_publishes.fetch_add(1, Ordering::SeqCst);
                }
                if tx.send((p, res)).await.is_err() {
                    break;
                }
            }
            let _ = recv.stop(0u32.into());
        };
        tokio::join!(reader, acker);
    }

    /// The write path up to the log: limits, topic, CRCs, schema id, full
    /// Arrow decode and validation, then enqueue (offsets are assigned there).
    async fn validate_and_enqueue(
        self: Arc<Self>,
        p: &Publish,
        record: Bytes,
    ) -> Result<Proposal, BrokerError> {
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(BrokerError::new(
                ErrorCode::ShuttingDown,
                "the broker is shutting down; retry against it once it is back, or another node",
            ));
        }
        if record.len() > MAX_BATCH_BYTES as usize {
            return Err(BrokerError::new(
                ErrorCode::BatchTooLarge,
                format!(
                    "batch of {} bytes exceeds the limit of {MAX_BATCH_BYTES}; split it",
                    record.len()
                ),
            ));
        }
        let topic = self
            .topics
            .get_with_schema(&p.topic, SCHEMA_APPLY_WAIT)
            .await?;
        let partition = topic.partition(p.partition)?.clone();
        // Before the expensive checks: a follower redirects at once.
        partition.ensure_leader()?;
        partition.ensure_space(record.len() as u64)?;
        let header = BatchHeader::decode(&record)
            .map_err(|e| BrokerError::new(ErrorCode::CorruptBatch, e.to_string()))?;
        let body = record.slice(BATCH_HEADER_BYTES..);
        header
            .verify_body(&body)
            .map_err(|e| BrokerError::new(ErrorCode::CorruptBatch, e.to_string()))?;
        if header.kind != BatchKind::Data {
            return Err(BrokerError::new(
                ErrorCode::InvalidArgument,
                "producers publish data batches only; control batches are written by the broker",
            ));
        }
        if header.is_transactional() || header.producer_id != -1 {
            return Err(BrokerError::new(ErrorCode::InvalidArgument, "idempotent and transactional producers are not available in this version; publish without a producer id"));
        }
        let schema = topic.schema().ok_or_else(|| {
            BrokerError::new(ErrorCode::SchemaNotSet, format!("topic '{}' has no schema yet; send SetSchemaIfAbsent first (the clients do this on the first publish)", p.topic))
        })?;
        if header.schema_id != schema.id {
            return Err(BrokerError::new(
                ErrorCode::SchemaMismatch,
                format!("batch is encoded for schema id {} but topic '{}' has schema id {}; refresh the topic schema", header.schema_id, p.topic, schema.id),
            ));
        }
        let rows = if body.len() >= BLOCKING_DECODE_MIN_BYTES {
            let b = body.clone();
            blocking(move || {
                ipc::decode_body(&schema, b)
                    .map(|x| x.num_rows())
                    .map_err(BrokerError::from)
            })
            .await?
        } else {
            ipc::decode_body(&schema, body.clone())?.num_rows()
        };
        if rows != header.row_count as usize {
            return Err(BrokerError::new(
                ErrorCode::CorruptBatch,
                format!(
                    "batch header says {} rows, the Arrow body has {rows}",
                    header.row_count
                ),
            ));
        }
        // A quiet partition's leader takes writes only once its Raft lease
        // is renewed (`arrowbus_raft::quiesce`): one round trip, for the
        // first write after an idle second; at once otherwise.
        self.topics
            .registry()
            .ready_to_write(partition_group(topic.meta.id, partition.id))
            .await;
        partition.propose(header, body).await
    }

    /// A subscription: push stored batches while credit lasts, wait for
    /// credit or new data otherwise. Memory held: at most one read's worth of
    /// batches, bounded by the credit.
    async fn subscription(
        self: Arc<Self>,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
        s: Subscribe,
    ) {
        let setup = || -> Result<_, BrokerError> {
            check_credit(Credit::default(), s.credit)?;
            let topic = self.topics.get(&s.topic)?;
            let partition = topic.partition(s.partition)?.clone();
            // Subscriptions are served by the leader: it knows the commit
            // point first, and clients find it the same way as for publish.
            partition.ensure_leader()?;
            let log = partition.log().clone();
            let flushed = partition.visible();
            let hw = *flushed.borrow();
            // The leader may apply (commit) entries before its own copy is
            // flushed; the log can only seek within what is flushed.
            let latest = hw.next_offset.min(log.flushed().borrow().next_offset);
            let (cursor, start_offset) = match s.start {
                StartAt::Earliest => {
                    let c = log.seek_offset(log.start_offset())?;
                    let o = c.next_offset();
                    (c, o)
                }
                StartAt::Latest => (log.seek_offset(latest)?, latest),
                StartAt::Offset(o) => (log.seek_offset(o)?, o),
                StartAt::Timestamp(t) => {
                    let c = log.seek_timestamp(t)?;
                    let o = c.next_offset();
                    (c, o)
                }
            };
            Ok((topic, partition, log, flushed, hw, cursor, start_offset))
        };
        let (topic, partition, log, mut flushed, hw, mut cursor, start_offset) = match setup() {
            Ok(x) => x,
            Err(e) => {
                let _ =
                    write_frame(&mut send, &ServerMessage::Error(e.reply(0)), Bytes::new()).await;
                let _ = send.finish();
                return;
            }
        };
        let schema = topic.schema();
        let subscribed = ServerMessage::Subscribed(Subscribed {
            schema_id: schema.as_ref().map_or(0, |s| s.id),
            schema_ipc: schema.map(|s| s.ipc.to_vec()).unwrap_or_default(),
            start_offset,
            high_watermark: hw.next_offset,
        });
        if write_frame(&mut send, &subscribed, Bytes::new())
            .await
            .is_err()
        {
            return;
        }
        debug!(start_offset, "subscribed");

        // Credit frames are read by their own task: reading a frame is not
        // cancel-safe, so it cannot sit in the select below.
        let (credit_tx, mut credit_rx) = mpsc::channel::<Result<Credit, BrokerError>>(16);
        let credit_reader = tokio::spawn(async move {
            loop {
                let r = match read_frame::<ClientMessage>(&mut recv).await {
                    Ok(Some(Frame {
                        msg: ClientMessage::Credit(c),
                        ..
                    })) => Ok(c),
                    Ok(Some(_)) => Err(BrokerError::new(
                        ErrorCode::UnexpectedMessage,
                        "only Credit frames may follow Subscribe",
                    )),
                    Ok(None) => return,
                    Err(e) => Err(BrokerError::new(
                        ErrorCode::for_read_error(&e),
                        e.to_string(),
                    )),
                };
                let stop = r.is_err();
                if credit_tx.send(r).await.is_err() || stop {
                    return;
                }
            }
        });
        let _abort = AbortOnDrop(credit_reader);

        let mut credit = s.credit;
        let mut skip_before = start_offset;
        let mut disk = log.flushed();
        // While idle, check now and then that this replica still leads: a
        // former leader keeps delivering what it applies, but once it is cut
        // off or the partition moved to other nodes nothing more arrives,
        // and the subscriber must move (it resumes at its next offset).
        let mut leader_check = tokio::time::interval(SUBSCRIBER_LEADER_CHECK);
        leader_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut not_leader_since: Option<tokio::time::Instant> = None;
        loop {
            if credit.batches == 0 || credit.bytes == 0 {
                match credit_rx.recv().await {
                    Some(Ok(c)) => match check_credit(credit, c) {
                        Ok(total) => credit = total,
                        Err(e) => return fail(&mut send, e).await,
                    },
                    Some(Err(e)) => return fail(&mut send, e).await,
                    None => return, // subscriber finished its side: done
                }
                continue;
            }
            let visible = *flushed.borrow_and_update();
            // A subscriber that keeps up reads from the log's tail cache,
            // here; only a miss goes to a blocking thread for the file
            // (two thread hand-offs per read otherwise, at every batch).
            let (mut batches, miss) = read_cached(&log, &mut cursor, visible.index, credit);
            if batches.is_empty() && miss {
                let log2 = log.clone();
                let (c, at) = (credit, cursor.clone());
                let read = blocking(move || read_some(&log2, at, visible.index, c)).await;
                (cursor, batches) = match read {
                    Ok(x) => x,
                    Err(e) => return fail(&mut send, e).await,
                };
            }
            if batches.is_empty() {
                tokio::select! {
                    // Committed entries this replica has not flushed yet
                    // become readable when its own write completes.
                    _ = disk.changed() => {},
                    changed = flushed.changed() => if changed.is_err() {
                        return fail(&mut send, BrokerError::new(ErrorCode::TopicNotFound, format!("topic '{}' was deleted or the broker is shutting down", s.topic))).await;
                    },
                    c = credit_rx.recv() => match c {
                        Some(Ok(c)) => match check_credit(credit, c) {
                            Ok(total) => credit = total,
                            Err(e) => return fail(&mut send, e).await,
                        },
                        Some(Err(e)) => return fail(&mut send, e).await,
                        None => return,
                    },
                    _ = leader_check.tick() => match partition.ensure_leader() {
                        Ok(()) => not_leader_since = None,
                        Err(e) => {
                            let since = *not_leader_since.get_or_insert_with(tokio::time::Instant::now);
                            if since.elapsed() >= SUBSCRIBER_LEADER_GRACE {
                                return fail(&mut send, e).await;
                            }
                        }
                    },
                }
                continue;
            }
            for b in batches {
                // Control and Raft entries are never delivered, so they cost
                // no credit: the subscriber only returns credit for what it got.
                if !b.header.kind.is_delivered() {
                    continue;
                }
                credit.batches -= 1;
                credit.bytes = credit.bytes.saturating_sub(b.record_len());
                let skip_rows = skip_before
                    .saturating_sub(b.header.base_offset)
                    .min(u64::from(b.header.row_count)) as u32;
                skip_before = 0;
                let msg = ServerMessage::Batch(BatchDelivery {
                    skip_rows,
                    high_watermark: visible.next_offset,
                });
                let record = [Bytes::copy_from_slice(&b.encoded), b.body];
                if write_frame_parts(&mut send, &msg, record).await.is_err() {
                    return; // subscriber went away
                }
            }
        }
    }
}

/// The budget of one read: at most the credit, and at most one call's
/// worth. The first batch is read even if it alone exceeds the byte credit:
/// batches are never split.
struct ReadBudget {
    bytes: u64,
    batches: usize,
}

impl ReadBudget {
    fn of(credit: Credit) -> Self {
        Self {
            bytes: credit.bytes.min(READ_BYTES_PER_CALL_MAX),
            batches: (credit.batches as usize).min(READ_BATCHES_PER_CALL_MAX),
        }
    }

    fn allows_more(&self, out: &[StoredBatch], bytes: u64) -> bool {
        out.len() < self.batches && (out.is_empty() || bytes < self.bytes)
    }
}

/// [`read_some`] from the tail cache only (never blocks). Also says whether
/// it stopped at an entry that is not cached (the file has it).
fn read_cached(
    log: &arrowbus_raft::log::PartitionLog,
    cursor: &mut Cursor,
    max_index: u64,
    credit: Credit,
) -> (Vec<StoredBatch>, bool) {
    let budget = ReadBudget::of(credit);
    let mut out = Vec::new();
    let mut bytes = 0u64;
    while budget.allows_more(&out, bytes) {
        match log.read_cached(cursor, max_index) {
            CachedRead::Hit(b) => {
                bytes += b.record_len();
                out.push(b);
            }
            CachedRead::NotVisible => break,
            CachedRead::Miss => return (out, true),
        }
    }
    (out, false)
}

/// Read batches at the cursor that are visible (index <= max_index), within
/// the credit ([`ReadBudget`]). Blocking: it may read files.
fn read_some(
    log: &arrowbus_raft::log::PartitionLog,
    mut cursor: Cursor,
    max_index: u64,
    credit: Credit,
) -> Result<(Cursor, Vec<StoredBatch>), BrokerError> {
    let budget = ReadBudget::of(credit);
    let mut out = Vec::new();
    let mut bytes = 0u64;
    while budget.allows_more(&out, bytes) {
        match log.read(&mut cursor, max_index)? {
            Some(b) => {
                bytes += b.record_len();
                out.push(b);
            }
            None => break,
        }
    }
    Ok((cursor, out))
}

fn check_credit(have: Credit, add: Credit) -> Result<Credit, BrokerError> {
    let total = Credit {
        bytes: have.bytes.saturating_add(add.bytes),
        batches: have.batches.saturating_add(add.batches),
    };
    if total.bytes > MAX_CREDIT_BYTES_PER_SUBSCRIPTION
        || total.batches > MAX_CREDIT_BATCHES_PER_SUBSCRIPTION
    {
        return Err(BrokerError::new(
            ErrorCode::CreditTooLarge,
            format!(
                "credit would reach {} bytes / {} batches; a subscription holds at most {MAX_CREDIT_BYTES_PER_SUBSCRIPTION} bytes and {MAX_CREDIT_BATCHES_PER_SUBSCRIPTION} batches",
                total.bytes, total.batches
            ),
        ));
    }
    Ok(total)
}

async fn fail(send: &mut quinn::SendStream, e: BrokerError) {
    let _ = write_frame(send, &ServerMessage::Error(e.reply(0)), Bytes::new()).await;
    let _ = send.finish();
}

async fn reject_stream(
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    code: ErrorCode,
    message: String,
) {
    let reply = ServerMessage::Error(ErrorReply::new(code, message));
    let _ = write_frame(send, &reply, Bytes::new()).await;
    let _ = send.finish();
    let _ = recv.stop(0u32.into());
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, BrokerError> + Send + 'static,
) -> Result<T, BrokerError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| BrokerError::internal(format!("blocking task failed: {e}")))?
}

struct CountGuard<'a>(&'a AtomicUsize);
impl Drop for CountGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

trait ForReadError {
    fn for_read_error(e: &ReadError) -> ErrorCode;
}

impl ForReadError for ErrorCode {
    fn for_read_error(e: &ReadError) -> ErrorCode {
        use arrowbus_wire::FrameError as F;
        match e {
            ReadError::Frame(F::Version { .. }) => ErrorCode::UnsupportedVersion,
            ReadError::Frame(F::ControlLen { .. } | F::BodyTooLarge { .. }) => {
                ErrorCode::FrameTooLarge
            }
            _ => ErrorCode::MalformedFrame,
        }
    }
}

/// Bind the QUIC endpoint with the configured transport limits.
pub fn bind_endpoint(
    config: &BrokerConfig,
    crypto: Arc<rustls::ServerConfig>,
) -> anyhow::Result<quinn::Endpoint> {
    use quinn::{IdleTimeout, TransportConfig, VarInt};
    let q = &config.quic;
    let mut transport = TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(VarInt::from_u32(q.max_concurrent_streams))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .receive_window(VarInt::try_from(q.connection_receive_window_bytes)?)
        .stream_receive_window(VarInt::try_from(q.stream_receive_window_bytes)?)
        .send_window(q.send_window_bytes)
        .max_idle_timeout(Some(IdleTimeout::try_from(Duration::from_millis(
            q.idle_timeout_ms,
        ))?))
        .keep_alive_interval(Some(Duration::from_millis(q.keep_alive_ms)));
    arrowbus_quic::tune_transport(&mut transport);
    let quic_crypto = quinn::crypto::rustls::QuicServerConfig::try_from(crypto)?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(quic_crypto));
    server.transport_config(Arc::new(transport));
    let (socket, buffers) =
        arrowbus_quic::bind_udp(config.listen, q.socket_buffer_bytes).map_err(|e| {
            anyhow::anyhow!(
                "cannot bind UDP {}: {e} (is another busd running there?)",
                config.listen
            )
        })?;
    if buffers.clamped() {
        warn!("{}", buffers.advice());
    }
    let key_path = config.data_dir.join("quic-reset-key");
    let (reset_key, replaced) = arrowbus_quic::load_or_create_reset_key(&key_path)
        .map_err(|e| anyhow::anyhow!("QUIC reset key {}: {e}", key_path.display()))?;
    if replaced {
        warn!(path = %key_path.display(), "the QUIC reset key file was damaged and has been replaced");
    }
    Ok(arrowbus_quic::server_endpoint(socket, server, &reset_key)?)
}

pub fn local_addr(endpoint: &quinn::Endpoint) -> Option<SocketAddr> {
    endpoint.local_addr().ok()
}

fn node_change(c: crate::topics::NodeChange) -> arrowbus_wire::NodeChange {
    arrowbus_wire::NodeChange {
        moves: c
            .moves
            .into_iter()
            .map(|m| arrowbus_wire::PartitionMove {
                topic: m.topic,
                partition: m.partition,
                from: m.from,
                to: m.to,
            })
            .collect(),
        moving: c.moving as u64,
        removed: c.removed,
    }
}
