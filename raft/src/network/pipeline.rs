//! Pipelined appends: several AppendEntries in flight per follower, in
//! order, on one QUIC stream per replication session.
//!
//! Why: with one append at a time, every round trip holds the follower's
//! fdatasync, and entries that arrive meanwhile wait for the next round; a
//! replicated partition then ran at half the speed of a single node
//! (`bench/results/2026-11-22-replicas.md`). openraft 0.10 hands the network
//! a stream of requests (each carries what the log gained since the last
//! one) and takes a stream of results, matched to what it sent by log id;
//! the follower side (`Raft::stream_append`) is pipelined into its core.
//!
//! Sending ([`open`]): a writer task pulls requests, splits each into frames
//! of at most `MAX_BODY_BYTES` of entries, and writes them while at most
//! [`MAX_IN_FLIGHT_FRAMES`] frames and [`MAX_IN_FLIGHT_BYTES`] are
//! unanswered; the result stream reads one answer per frame, in order. Each
//! answer has a deadline (the same rule as a single append: openraft's
//! timeout, at least `APPEND_TIMEOUT_MIN` for entries) that never falls
//! before the previous frame's, since answers come in order. Dropping the
//! result stream stops the writer (which also releases openraft's request
//! stream) and resets the QUIC stream.
//!
//! Receiving ([`serve`]): every frame is decoded and validated (frame
//! limits, rkyv, batch headers and body CRCs) before it reaches the group's
//! Raft, and must name the stream's group and sender. A bad frame ends the
//! stream: the frames before it are answered, then an `Error`.

use std::sync::Arc;

use arrowbus_wire::peer::{self, PeerRequest, PeerResponse, PeerRpc};
use arrowbus_wire::ErrorCode;
use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt};
use openraft::errors::{NetworkError, RPCError, Unreachable};
use openraft::network::RPCOption;
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, StreamAppendResult};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::{
    append_timeout, decode_append, encode_append, from_wire_append, read_frame, write_frame,
    GroupRegistry, PeerClient, PeerError,
};
use crate::types::{LogId, TypeConfig};
use arrowbus_wire::limits::MAX_BODY_BYTES;
use openraft::entry::RaftEntry;
use openraft::EntryPayload;

/// Most frames unanswered on one stream. openraft puts everything the log
/// gained since its last request into the next one, so a few in flight
/// cover a follower's fdatasync; more would only queue behind it.
pub(crate) const MAX_IN_FLIGHT_FRAMES: usize = 8;

/// Most entry bytes unanswered on one stream: bounds what a leader holds
/// for a slow follower (besides the log itself) and what the follower
/// buffers. Four maximal batches.
pub(crate) const MAX_IN_FLIGHT_BYTES: usize = 4 * MAX_BODY_BYTES as usize;

// A frame takes its bytes from the budget whole (as one `u32` of permits):
// the largest must fit, or it would wait forever.
const _: () = assert!(MAX_BODY_BYTES as usize <= MAX_IN_FLIGHT_BYTES);
const _: () = assert!(MAX_IN_FLIGHT_BYTES <= u32::MAX as usize);

type Result<T> = std::result::Result<T, RPCError<TypeConfig>>;
type Results = BoxStream<'static, Result<StreamAppendResult<TypeConfig>>>;

/// A frame sent and not answered yet.
struct InFlight {
    prev: Option<LogId>,
    last: Option<LogId>,
    deadline: Instant,
    timeout: std::time::Duration,
    /// Datagrams received on the connection when it was sent (for the
    /// pool's silence detection).
    received_before: u64,
    sent_at: Instant,
    _budget: OwnedSemaphorePermit,
}

/// What the writer tells the result stream.
enum Sent {
    Frame(InFlight),
    /// The writer could not send; the stream fails with this.
    Failed(String),
}

/// Entry body bytes of a request.
fn body_bytes(rpc: &AppendEntriesRequest<TypeConfig>) -> usize {
    rpc.entries
        .iter()
        .map(|e| match &e.payload {
            EntryPayload::Normal(c) => c.body.len(),
            _ => 0,
        })
        .sum()
}

/// Split a request into frames of at most `limit` entry-body bytes each
/// (an entry larger than that goes alone). Each frame's `prev_log_id` is the
/// last entry of the one before, and its commit index never points past its
/// own last entry (a follower must not learn a commit beyond what it holds
/// from this frame).
pub(crate) fn split(
    rpc: AppendEntriesRequest<TypeConfig>,
    limit: usize,
) -> Vec<AppendEntriesRequest<TypeConfig>> {
    if body_bytes(&rpc) <= limit {
        return vec![rpc];
    }
    let AppendEntriesRequest {
        vote,
        prev_log_id,
        leader_commit,
        entries,
    } = rpc;
    let mut frames = Vec::new();
    let mut prev = prev_log_id;
    let mut chunk = Vec::new();
    let mut bytes = 0usize;
    let mut close = |chunk: Vec<crate::types::Entry>, prev: &mut Option<LogId>| {
        let last = chunk.last().map(|e| e.log_id());
        let commit = match (&leader_commit, &last) {
            (Some(c), Some(l)) if c.index > l.index => Some(*l),
            _ => leader_commit,
        };
        frames.push(AppendEntriesRequest {
            vote,
            prev_log_id: *prev,
            leader_commit: commit,
            entries: chunk,
        });
        *prev = last;
    };
    for e in entries {
        let len = match &e.payload {
            EntryPayload::Normal(c) => c.body.len(),
            _ => 0,
        };
        if !chunk.is_empty() && bytes + len > limit {
            close(std::mem::take(&mut chunk), &mut prev);
            bytes = 0;
        }
        bytes += len;
        chunk.push(e);
    }
    if !chunk.is_empty() {
        close(chunk, &mut prev);
    }
    frames
}

/// Open a pipelined append stream to `client`'s peer for its group.
pub(super) async fn open<S>(client: &PeerClient, input: S, option: RPCOption) -> Result<Results>
where
    S: futures::Stream<Item = AppendEntriesRequest<TypeConfig>> + Send + Unpin + 'static,
{
    let unreachable = |e: PeerError| RPCError::Unreachable(Unreachable::new(&e));
    let conn = client
        .pool
        .connection(&client.addr)
        .await
        .map_err(unreachable)?;
    let (send, recv) = conn
        .open_bi()
        .await
        .map_err(|e| unreachable(PeerError(format!("open stream to {}: {e}", client.addr))))?;
    let (tx, rx) = mpsc::channel(MAX_IN_FLIGHT_FRAMES);
    let writer = Writer {
        pool: client.pool.clone(),
        addr: client.addr.clone(),
        conn: conn.clone(),
        from: client.pool.me,
        group: client.group,
        ttl: option.soft_ttl(),
        budget: Arc::new(Semaphore::new(MAX_IN_FLIGHT_BYTES)),
    };
    let task = AbortOnDrop(tokio::spawn(writer.run(input, send, tx)));
    let state = Reader {
        pool: client.pool.clone(),
        addr: client.addr.clone(),
        target: client.target,
        conn,
        recv,
        rx,
        last_deadline: None,
        _writer: task,
    };
    Ok(futures::stream::unfold(Some(state), |state| async move {
        let mut state = state?;
        let item = state.next().await?;
        let more = matches!(item, Ok(Ok(_)));
        Some((item, more.then_some(state)))
    })
    .boxed())
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct Writer {
    pool: Arc<super::PeerPool>,
    addr: String,
    conn: quinn::Connection,
    from: u64,
    group: u64,
    ttl: std::time::Duration,
    budget: Arc<Semaphore>,
}

impl Writer {
    async fn run<S>(self, mut input: S, mut send: quinn::SendStream, tx: mpsc::Sender<Sent>)
    where
        S: futures::Stream<Item = AppendEntriesRequest<TypeConfig>> + Send + Unpin + 'static,
    {
        loop {
            // openraft's request stream holds its replication state locked
            // while it waits for entries: stop waiting as soon as the result
            // stream is gone, so the next session can take it.
            let req = tokio::select! {
                _ = tx.closed() => return,
                r = input.next() => match r {
                    Some(r) => r,
                    None => {
                        let _ = send.finish();
                        return;
                    }
                },
            };
            for frame in split(req, MAX_BODY_BYTES as usize) {
                let bytes = body_bytes(&frame).min(MAX_IN_FLIGHT_BYTES);
                let permits = u32::try_from(bytes).unwrap_or(u32::MAX);
                let budget = tokio::select! {
                    _ = tx.closed() => return,
                    p = self.budget.clone().acquire_many_owned(permits) => match p {
                        Ok(p) => p,
                        Err(_) => return,
                    },
                };
                let (req, body) = match encode_append(&frame) {
                    Ok(x) => x,
                    Err(e) => {
                        let _ = tx.send(Sent::Failed(e.0)).await;
                        return;
                    }
                };
                // Same rule as a single append (see `PeerClient::send_append`).
                let timeout = append_timeout(
                    self.ttl,
                    frame.entries.is_empty(),
                    self.pool.is_silent(&self.addr),
                );
                let now = Instant::now();
                let sent = InFlight {
                    prev: frame.prev_log_id,
                    last: frame
                        .entries
                        .last()
                        .map(|e| e.log_id())
                        .or(frame.prev_log_id),
                    deadline: now + timeout,
                    timeout,
                    received_before: self.conn.stats().udp_rx.datagrams,
                    sent_at: now,
                    _budget: budget,
                };
                // Recorded before it is written, so its answer is expected.
                if tx.send(Sent::Frame(sent)).await.is_err() {
                    return;
                }
                let request = PeerRequest {
                    from: self.from,
                    group: self.group,
                    rpc: PeerRpc::AppendStream(req),
                };
                if let Err(e) = write_frame(&mut send, &request, body).await {
                    let _ = tx.send(Sent::Failed(e.0)).await;
                    return;
                }
            }
        }
    }
}

struct Reader {
    pool: Arc<super::PeerPool>,
    addr: String,
    target: u64,
    conn: quinn::Connection,
    recv: quinn::RecvStream,
    rx: mpsc::Receiver<Sent>,
    last_deadline: Option<Instant>,
    _writer: AbortOnDrop,
}

impl Reader {
    /// The next frame's result; `None` once the writer finished (openraft
    /// ended its request stream) and every frame was answered.
    async fn next(&mut self) -> Option<Result<StreamAppendResult<TypeConfig>>> {
        let sent = match self.rx.recv().await? {
            Sent::Frame(f) => f,
            Sent::Failed(e) => {
                let e = PeerError(format!("append stream to node {}: {e}", self.target));
                return Some(Err(RPCError::Unreachable(Unreachable::new(&e))));
            }
        };
        tracing::trace!(
            target = self.target,
            queued = self.rx.len(),
            "awaiting an append answer (queued: frames sent behind it)"
        );
        // Answers come in order: this one cannot be due before the last.
        let deadline = self
            .last_deadline
            .map_or(sent.deadline, |d| d.max(sent.deadline));
        self.last_deadline = Some(deadline);
        let answer = tokio::time::timeout_at(deadline, read_frame::<PeerResponse>(&mut self.recv));
        let fail = |msg: String| {
            let e = PeerError(format!("append stream to node {}: {msg}", self.target));
            Some(Err(RPCError::Unreachable(Unreachable::new(&e))))
        };
        match answer.await {
            Err(_) => {
                let received = self.conn.stats().udp_rx.datagrams;
                if received == sent.received_before {
                    self.pool
                        .note_silence(&self.addr, &self.conn, received, sent.sent_at);
                }
                fail(format!("no answer within {:?}", sent.timeout))
            }
            Ok(Err(e)) => fail(e.0),
            Ok(Ok(None)) => fail("the peer closed the stream".into()),
            Ok(Ok(Some((PeerResponse::Append(r), _)))) => {
                tracing::trace!(
                    target = self.target,
                    last = ?sent.last.map(|l| l.index),
                    elapsed_us = sent.sent_at.elapsed().as_micros() as u64,
                    "append answered"
                );
                let r = from_wire_append(r);
                if matches!(r, AppendEntriesResponse::Conflict) && sent.prev.is_none() {
                    // A conflict at the log's start cannot happen; a peer
                    // that says so is broken.
                    let e = PeerError(format!(
                        "node {} reported a conflict before its first entry",
                        self.target
                    ));
                    return Some(Err(RPCError::Network(NetworkError::new(&e))));
                }
                Some(Ok(r.into_stream_result(sent.prev, sent.last)))
            }
            Ok(Ok(Some((PeerResponse::Error { code, message }, _)))) => {
                fail(format!("refused: {message} (code {code})"))
            }
            Ok(Ok(Some((other, _)))) => {
                let e = PeerError(format!(
                    "node {} answered an append with {other:?}",
                    self.target
                ));
                Some(Err(RPCError::Network(NetworkError::new(&e))))
            }
        }
    }
}

/// Serve an append stream whose first frame was `first` (see the module
/// docs). Returns when the stream ends or fails.
pub(super) async fn serve(
    registry: &GroupRegistry,
    first: PeerRequest,
    first_body: Bytes,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let (from, group) = (first.from, first.group);
    let Some(g) = registry.get(group) else {
        let e = PeerResponse::Error {
            code: ErrorCode::PartitionNotFound as u16,
            message: format!("group {group} is not hosted on this node (yet)"),
        };
        if write_frame(&mut send, &e, Bytes::new()).await.is_ok() {
            let _ = send.finish();
        }
        return;
    };
    let failure: Arc<std::sync::Mutex<Option<PeerResponse>>> = Arc::default();
    let (tx, mut rx) = mpsc::channel(MAX_IN_FLIGHT_FRAMES);
    let reader = {
        let failure = failure.clone();
        AbortOnDrop(tokio::spawn(async move {
            let fail = |code: ErrorCode, message: String| {
                *crate::lock(&failure) = Some(PeerResponse::Error {
                    code: code as u16,
                    message,
                });
            };
            let mut next = Some((first, first_body));
            loop {
                let (req, body) = match next.take() {
                    Some(x) => x,
                    None => match read_frame::<PeerRequest>(&mut recv).await {
                        Ok(Some(x)) => x,
                        Ok(None) => return,
                        Err(e) => return fail(ErrorCode::MalformedFrame, e.0),
                    },
                };
                let PeerRpc::AppendStream(a) = &req.rpc else {
                    return fail(
                        ErrorCode::UnexpectedMessage,
                        "an append stream carries only append frames".into(),
                    );
                };
                if req.group != group || req.from != from {
                    return fail(
                        ErrorCode::InvalidArgument,
                        format!(
                            "append stream of node {from} for group {group} got a frame of node {} for group {}",
                            req.from, req.group
                        ),
                    );
                }
                match decode_append(a, body) {
                    Ok(r) => {
                        if tx.send(r).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => return fail(ErrorCode::CorruptBatch, e),
                }
            }
        }))
    };
    let input = futures::stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed();
    let mut results = g.append_stream(input);
    while let Some(resp) = results.next().await {
        let ok = matches!(
            resp,
            PeerResponse::Append(
                peer::AppendResponse::Success | peer::AppendResponse::PartialSuccess(_)
            )
        );
        if write_frame(&mut send, &resp, Bytes::new()).await.is_err() {
            return;
        }
        if !ok {
            let _ = send.finish();
            return;
        }
    }
    drop(reader);
    let failed = crate::lock(&failure).take();
    if let Some(e) = failed {
        tracing::warn!(from, group, "append stream refused: {e:?}");
        if write_frame(&mut send, &e, Bytes::new()).await.is_err() {
            return;
        }
    }
    let _ = send.finish();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{log_id, Command, Entry, Vote};

    /// Entries 1..=n at term 1, entry i carrying `sizes[i-1]` payload bytes.
    fn request(
        prev: Option<u64>,
        sizes: &[usize],
        commit: Option<u64>,
    ) -> AppendEntriesRequest<TypeConfig> {
        let first = prev.map_or(1, |p| p + 1);
        let entries: Vec<Entry> = sizes
            .iter()
            .enumerate()
            .map(|(i, n)| {
                Entry::new_normal(
                    log_id(1, 1, first + i as u64),
                    Command::controller(&vec![7u8; n.saturating_sub(1)]),
                )
            })
            .collect();
        AppendEntriesRequest {
            vote: Vote::new_committed(1, 1),
            prev_log_id: prev.map(|p| log_id(1, 1, p)),
            leader_commit: commit.map(|c| log_id(1, 1, c)),
            entries,
        }
    }

    fn indexes(r: &AppendEntriesRequest<TypeConfig>) -> Vec<u64> {
        r.entries.iter().map(|e| e.log_id().index).collect()
    }

    #[test]
    fn a_request_within_the_limit_is_one_frame() {
        let frames = split(request(Some(4), &[10, 10, 10], Some(7)), 30);
        assert_eq!(frames.len(), 1);
        assert_eq!(indexes(&frames[0]), vec![5, 6, 7]);
        assert_eq!(frames[0].prev_log_id, Some(log_id(1, 1, 4)));
        assert_eq!(frames[0].leader_commit, Some(log_id(1, 1, 7)));
    }

    #[test]
    fn frames_chain_their_prev_ids_and_never_commit_past_their_end() {
        // 10 + 10 | 25 | 40 (alone, over the limit) | 5 + 5 + 5
        let frames = split(request(Some(4), &[10, 10, 25, 40, 5, 5, 5], Some(11)), 25);
        let got: Vec<Vec<u64>> = frames.iter().map(indexes).collect();
        assert_eq!(got, vec![vec![5, 6], vec![7], vec![8], vec![9, 10, 11]]);
        let prevs: Vec<Option<u64>> = frames
            .iter()
            .map(|f| f.prev_log_id.map(|l| l.index))
            .collect();
        assert_eq!(prevs, vec![Some(4), Some(6), Some(7), Some(8)]);
        let commits: Vec<Option<u64>> = frames
            .iter()
            .map(|f| f.leader_commit.map(|l| l.index))
            .collect();
        assert_eq!(commits, vec![Some(6), Some(7), Some(8), Some(11)]);
        assert!(frames.iter().all(|f| f.vote == Vote::new_committed(1, 1)));
    }

    #[test]
    fn a_commit_behind_the_frames_is_kept_as_is() {
        let frames = split(request(None, &[20, 20], Some(1)), 20);
        let commits: Vec<Option<u64>> = frames
            .iter()
            .map(|f| f.leader_commit.map(|l| l.index))
            .collect();
        assert_eq!(commits, vec![Some(1), Some(1)]);
        assert_eq!(frames[0].prev_log_id, None);
        let none = split(request(None, &[20, 20], None), 20);
        assert!(none.iter().all(|f| f.leader_commit.is_none()));
    }

    #[test]
    fn empty_requests_stay_one_frame() {
        let frames = split(request(Some(9), &[], Some(9)), 1);
        assert_eq!(frames.len(), 1);
        assert!(frames[0].entries.is_empty());
        assert_eq!(frames[0].prev_log_id, Some(log_id(1, 1, 9)));
    }
}
