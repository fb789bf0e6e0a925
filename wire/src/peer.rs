//! Node-to-node messages: the Raft RPCs of every Raft group a node hosts,
//! multiplexed over one QUIC connection per peer (ALPN [`PEER_ALPN`]). One RPC
//! per bidirectional stream: a [`PeerRequest`] frame, answered by one
//! [`PeerResponse`] frame.
//!
//! These types are plain data, independent of the consensus library: the
//! `raft` crate converts them to and from openraft's types, so a library
//! upgrade never changes the bytes between nodes.
//!
//! An append request carries entry metadata in the control section and the
//! entries' bodies, concatenated in entry order, as the frame body; each
//! [`WireEntry::Data`] says how many body bytes are its own.
//!
//! Besides the per-group RPCs, each node sends each peer one [`Ping`] per
//! heartbeat interval: node liveness plus, for every group the sender leads
//! and wants quiet, a [`QuietClaim`]. The [`Pong`] answers each claim on its
//! own ([`QuietAnswer`], same order). The `raft` crate's `quiesce` module
//! says what the claims mean.

use rkyv::{Archive, Deserialize, Serialize};

/// ALPN of node-to-node connections. Clients that offer only
/// [`crate::frame::ALPN`] never reach the Raft handlers.
pub const PEER_ALPN: &[u8] = b"arrowbus-peer/1";

/// Group 0 is the controller group; partition groups are numbered by
/// [`partition_group`].
pub const CONTROLLER_GROUP: u64 = 0;

/// The Raft group id of a topic partition: the topic's id (assigned by the
/// controller, never reused) in the high 32 bits, the partition in the low.
pub fn partition_group(topic_id: u32, partition: u32) -> u64 {
    (u64::from(topic_id) << 32) | u64::from(partition)
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct WireLogId {
    pub term: u64,
    pub leader: u64,
    pub index: u64,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct WireVote {
    pub term: u64,
    pub node: u64,
    pub committed: bool,
}

/// A Raft membership: one or two (joint) voter sets, plus every node
/// (voters and learners) with its address.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct WireMembership {
    pub configs: Vec<Vec<u64>>,
    pub nodes: Vec<(u64, String)>,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum WireEntry {
    Blank(WireLogId),
    Membership(WireLogId, WireMembership),
    /// An application entry: its encoded 80-byte batch header (the
    /// controller's commands are batches of kind `Raft`) and the length of
    /// its body within the frame body.
    Data {
        log_id: WireLogId,
        header: Vec<u8>,
        body_len: u32,
    },
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct AppendRequest {
    pub vote: WireVote,
    pub prev_log_id: Option<WireLogId>,
    pub leader_commit: Option<WireLogId>,
    pub entries: Vec<WireEntry>,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum AppendResponse {
    Success,
    PartialSuccess(Option<WireLogId>),
    Conflict,
    HigherVote(WireVote),
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct VoteRequest {
    pub vote: WireVote,
    pub last_log_id: Option<WireLogId>,
    pub leadership_transfer: bool,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct VoteResponse {
    pub vote: WireVote,
    pub vote_granted: bool,
    pub last_log_id: Option<WireLogId>,
}

/// A whole snapshot: a partition's or the controller's small state at a
/// log position. Its data is the frame body.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRequest {
    pub vote: WireVote,
    pub last_log_id: Option<WireLogId>,
    pub membership_log_id: Option<WireLogId>,
    pub membership: WireMembership,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct TransferLeaderRequest {
    pub from_leader: WireVote,
    pub to: u64,
    pub last_log_id: Option<WireLogId>,
}

/// "Group `group` is quiet under me": the sender leads it at `vote`, every
/// entry up to `committed` (its last) is committed, and it sends no more
/// heartbeats while the receiver agrees. See [`Ping`].
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuietClaim {
    pub group: u64,
    pub vote: WireVote,
    pub committed: WireLogId,
}

/// Node liveness and quiescence, one per node pair and heartbeat interval,
/// whatever the number of groups. Sent as [`PeerRpc::Ping`] (the request's
/// `group` is not used).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct Ping {
    /// Chosen at random when the sender's process starts: a new value means
    /// it restarted (and leads nothing any more).
    pub incarnation: u64,
    /// Counts up within an incarnation: a ping overtaken by a later one
    /// (several may be in flight) is answered but renews nothing.
    pub seq: u64,
    pub claims: Vec<QuietClaim>,
}

/// How a receiver answered one [`QuietClaim`].
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuietAnswer {
    /// The receiver's replica is exactly as claimed (follower at that vote,
    /// same last and committed entry) and has stopped its election timer.
    Quiet,
    /// The receiver does not host the group (yet, or any more).
    NotHosted,
    /// The receiver's replica differs from the claim (another vote or
    /// role, or a log or commit point that is not the claimed one).
    Differs,
}

/// The answer to a [`Ping`]: the receiver's incarnation and one answer per
/// claim, in the claims' order.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct Pong {
    pub incarnation: u64,
    pub answers: Vec<QuietAnswer>,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum PeerRpc {
    Append(AppendRequest),
    Vote(VoteRequest),
    PreVote(VoteRequest),
    Snapshot(SnapshotRequest),
    TransferLeader(TransferLeaderRequest),
    /// Propose a controller command (the frame body: its encoding) on the
    /// receiver, which must lead the controller group. Nodes use it to
    /// record what they did (e.g. a finished partition move) wherever the
    /// controller leader is. Refused for every other group.
    Propose,
    /// The receiver was removed from the cluster (the controller committed
    /// a membership without it). It no longer hears from the controller, so
    /// without this it would keep serving stale metadata; it shuts down.
    /// The group field is ignored.
    Removed,
    /// One frame of a pipelined append stream: the first frame on a stream
    /// makes it one, and every later frame on it must be one too, for the
    /// same group. The receiver answers each frame with one
    /// [`PeerResponse::Append`], in order, once its entries are durable,
    /// while the sender keeps sending: several appends are in flight per
    /// follower, in order, on one QUIC stream. An `Error` answer ends the
    /// stream.
    AppendStream(AppendRequest),
    /// Last: a node that predates it answers `Error` (it cannot decode the
    /// request), and its peers then never quiesce groups it replicates.
    Ping(Ping),
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct PeerRequest {
    /// The sender's node id (checked against the group's membership by Raft).
    pub from: u64,
    pub group: u64,
    pub rpc: PeerRpc,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum PeerResponse {
    Append(AppendResponse),
    Vote(VoteResponse),
    /// Snapshot installed; the receiver's vote.
    Snapshot(WireVote),
    /// The receiver accepted the leadership hand-over.
    TransferLeaderDone,
    /// The proposal was committed and applied; the state machine's reply.
    Proposed {
        reply: Vec<u8>,
    },
    /// The receiver took note (of `Removed`).
    Acknowledged,
    /// The receiver does not lead the group; `leader` does, if known.
    NotLeader {
        leader: Option<u64>,
    },
    /// The RPC was not handled: unknown group (not created here yet, or
    /// removed), the node is shutting down, or the request was malformed.
    /// `code` is an [`crate::ErrorCode`].
    Error {
        code: u16,
        message: String,
    },
    Pong(Pong),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{decode_frame, encode_frame};
    use crate::frame::FrameError;

    fn claim(group: u64) -> QuietClaim {
        QuietClaim {
            group,
            vote: WireVote {
                term: 7,
                node: 2,
                committed: true,
            },
            committed: WireLogId {
                term: 7,
                leader: 2,
                index: 40 + group,
            },
        }
    }

    #[test]
    fn ping_and_pong_round_trip() {
        let req = PeerRequest {
            from: 2,
            group: CONTROLLER_GROUP,
            rpc: PeerRpc::Ping(Ping {
                incarnation: 0xdead_beef,
                seq: 12,
                claims: (1..=300).map(claim).collect(),
            }),
        };
        let bytes = encode_frame(&req, 0).unwrap();
        let (frame, used) = decode_frame::<PeerRequest>(&bytes).unwrap();
        assert_eq!(used, bytes.len());
        assert_eq!(frame.msg, req);
        assert!(frame.body.is_empty());

        let resp = PeerResponse::Pong(Pong {
            incarnation: 9,
            answers: vec![
                QuietAnswer::Quiet,
                QuietAnswer::NotHosted,
                QuietAnswer::Differs,
            ],
        });
        let bytes = encode_frame(&resp, 0).unwrap();
        assert_eq!(decode_frame::<PeerResponse>(&bytes).unwrap().0.msg, resp);
    }

    #[test]
    fn damaged_pings_do_not_decode() {
        let req = PeerRequest {
            from: 2,
            group: 0,
            rpc: PeerRpc::Ping(Ping {
                incarnation: 1,
                seq: 1,
                claims: vec![claim(1), claim(2)],
            }),
        };
        let bytes = encode_frame(&req, 0).unwrap();
        // Cut short: truncated, never a partial ping.
        assert!(matches!(
            decode_frame::<PeerRequest>(&bytes[..bytes.len() - 3]),
            Err(FrameError::Truncated { .. })
        ));
        // A control section of garbage: rkyv validation refuses it (its
        // pointers lead outside the section) instead of reading it.
        let head = crate::frame::FRAME_HEADER_BYTES;
        let mut bad = bytes.clone();
        bad[head..].fill(0xff);
        assert!(matches!(
            decode_frame::<PeerRequest>(&bad),
            Err(FrameError::Control(_))
        ));
        // A pong sent where a request is expected is refused by direction.
        let pong = encode_frame(&PeerResponse::Pong(Pong::default()), 0).unwrap();
        assert!(decode_frame::<PeerRequest>(&pong).is_err());
    }
}
