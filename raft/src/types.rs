//! The openraft type configuration and the mapping between openraft's log
//! entries and the partition log's records. Every Raft group (the controller
//! and each partition) uses this one configuration, so one log store, one
//! network and one set of conversions serve them all.
//!
//! How entries are stored (one record per entry, see [`crate::log`]):
//! - application entries ([`Command`]): their own batch header and body,
//!   verbatim: a data batch, or a controller command (kind `Raft`, body tag
//!   [`TAG_COMMAND`]);
//! - blank entries: kind `Raft`, body `[TAG_BLANK]`, no rows;
//! - membership entries: kind `Raft`, body `[TAG_MEMBERSHIP]` + rkyv
//!   [`WireMembership`], no rows.
//!
//! Raft-kind records take no offsets (`offset_count` is 0), so a partition's
//! row offsets are unaffected by elections and membership changes.
//!
//! Indexes: openraft numbers entries from 0 (the initial membership); the
//! partition log from 1 (0 means empty). The log index of Raft entry `i` is
//! `i + 1` ([`to_log_index`]); every conversion goes through the helpers
//! here.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io;

use arrowbus_wire::peer::{WireLogId, WireMembership, WireVote};
use arrowbus_wire::{BatchHeader, BatchKind, LogId as StoredLogId};
use bytes::Bytes;
use openraft::entry::RaftEntry;
use openraft::impls::BasicNode;
use openraft::vote::RaftLeaderId;
use openraft::EntryPayload;
use rkyv::rancor;

use crate::log::{self, StoredBatch};

openraft::declare_raft_types!(
    /// The type configuration shared by every arrowbus Raft group.
    pub TypeConfig:
        D = Command,
        R = Applied,
        NodeId = u64,
        Node = BasicNode,
);

pub type NodeId = u64;
pub type Entry = openraft::alias::EntryOf<TypeConfig>;
pub type LogId = openraft::alias::LogIdOf<TypeConfig>;
pub type Vote = openraft::alias::VoteOf<TypeConfig>;
pub type LeaderId = openraft::alias::LeaderIdOf<TypeConfig>;
pub type Membership = openraft::Membership<NodeId, BasicNode>;
pub type StoredMembership = openraft::alias::StoredMembershipOf<TypeConfig>;
pub type SnapshotMeta = openraft::alias::SnapshotMetaOf<TypeConfig>;
pub type Raft<SM> = openraft::Raft<TypeConfig, SM>;
/// A snapshot: a group's small state (see [`crate::sm::Applier::snapshot`]).
pub type Snapshot = openraft::alias::SnapshotOf<TypeConfig, Bytes>;

/// Body tags of `Raft`-kind records.
pub const TAG_BLANK: u8 = 0;
pub const TAG_MEMBERSHIP: u8 = 1;
pub const TAG_COMMAND: u8 = 2;

/// An application entry: a batch header (kind, rows, producer fields,
/// schema id, timestamp and body CRC are the proposer's; log id and base
/// offset are assigned when it is stored) and its body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Command {
    pub header: BatchHeader,
    pub body: Bytes,
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?}({} rows, {} bytes)",
            self.header.kind,
            self.header.row_count,
            self.body.len()
        )
    }
}

impl Command {
    /// A controller command: `payload` is its own encoding, tagged so that it
    /// is never mistaken for a blank or membership entry.
    pub fn controller(payload: &[u8]) -> Self {
        let mut body = Vec::with_capacity(payload.len() + 1);
        body.push(TAG_COMMAND);
        body.extend_from_slice(payload);
        Self::raft_record(Bytes::from(body))
    }

    /// The payload of a controller command (`None` for data batches).
    pub fn controller_payload(&self) -> Option<&[u8]> {
        match (self.header.kind, self.body.first()) {
            (BatchKind::Raft, Some(&TAG_COMMAND)) => Some(&self.body[1..]),
            _ => None,
        }
    }

    fn raft_record(body: Bytes) -> Self {
        let header = BatchHeader {
            kind: BatchKind::Raft,
            flags: 0,
            producer_epoch: 0,
            // Callers build small bodies; an oversized one fails the log's checks.
            body_len: u32::try_from(body.len()).unwrap_or(u32::MAX),
            body_crc: crc32c::crc32c(&body),
            row_count: 0,
            base_offset: 0,
            timestamp_ms: 0,
            producer_id: -1,
            base_sequence: -1,
            schema_id: 0,
            log_id: StoredLogId::default(),
        };
        Self { header, body }
    }
}

/// What applying an entry produced, returned to the proposer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// First offset of a data batch (its rows are `base_offset..+rows`).
    pub base_offset: u64,
    pub rows: u32,
    pub timestamp_ms: i64,
    /// A controller command's reply, in the controller's own encoding.
    pub reply: Bytes,
}

impl fmt::Display for Applied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "applied at offset {} ({} rows)",
            self.base_offset, self.rows
        )
    }
}

// ---- log ids and votes ---------------------------------------------------

pub fn log_id(term: u64, leader: u64, index: u64) -> LogId {
    LogId::new(
        openraft::impls::leader_id_adv::LeaderId {
            term,
            node_id: leader,
        }
        .to_committed(),
        index,
    )
}

/// The partition-log index of Raft index `raft_index`.
pub fn to_log_index(raft_index: u64) -> u64 {
    raft_index + 1
}

/// The Raft index of partition-log index `log_index` (>= 1).
pub fn from_log_index(log_index: u64) -> u64 {
    log_index.saturating_sub(1)
}

pub fn stored_log_id(id: &LogId) -> StoredLogId {
    StoredLogId {
        term: id.leader_id.term,
        leader: id.leader_id.node_id,
        index: to_log_index(id.index),
    }
}

pub fn from_stored(id: &StoredLogId) -> LogId {
    log_id(id.term, id.leader, from_log_index(id.index))
}

pub fn wire_log_id(id: &LogId) -> WireLogId {
    WireLogId {
        term: id.leader_id.term,
        leader: id.leader_id.node_id,
        index: id.index,
    }
}

pub fn from_wire_log_id(id: &WireLogId) -> LogId {
    log_id(id.term, id.leader, id.index)
}

pub fn wire_vote(v: &Vote) -> WireVote {
    WireVote {
        term: v.leader_id.term,
        node: v.leader_id.node_id,
        committed: v.committed,
    }
}

pub fn from_wire_vote(v: &WireVote) -> Vote {
    if v.committed {
        Vote::new_committed(v.term, v.node)
    } else {
        Vote::new(v.term, v.node)
    }
}

// ---- membership ----------------------------------------------------------

pub fn wire_membership(m: &Membership) -> WireMembership {
    WireMembership {
        configs: m
            .get_joint_config()
            .iter()
            .map(|c| c.iter().copied().collect())
            .collect(),
        nodes: m.nodes().map(|(id, n)| (*id, n.addr.clone())).collect(),
    }
}

pub fn from_wire_membership(w: &WireMembership) -> io::Result<Membership> {
    let configs: Vec<BTreeSet<u64>> = w
        .configs
        .iter()
        .map(|c| c.iter().copied().collect())
        .collect();
    let nodes: BTreeMap<u64, BasicNode> = w
        .nodes
        .iter()
        .map(|(id, addr)| (*id, BasicNode { addr: addr.clone() }))
        .collect();
    Membership::new(configs, nodes).map_err(|e| invalid(format!("membership: {e}")))
}

pub fn encode_membership(m: &Membership) -> io::Result<Vec<u8>> {
    rkyv::to_bytes::<rancor::Error>(&wire_membership(m))
        .map(|v| v.to_vec())
        .map_err(|e| invalid(format!("encode membership: {e}")))
}

pub fn decode_membership(bytes: &[u8]) -> io::Result<Membership> {
    let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(bytes.len());
    aligned.extend_from_slice(bytes);
    let w = rkyv::from_bytes::<WireMembership, rancor::Error>(&aligned)
        .map_err(|e| invalid(format!("stored membership does not decode: {e}")))?;
    from_wire_membership(&w)
}

// ---- entries <-> records -------------------------------------------------

/// The record the partition log stores for `entry`.
pub fn to_record(entry: &Entry) -> io::Result<log::Entry> {
    let cmd = match &entry.payload {
        EntryPayload::Normal(cmd) => cmd.clone(),
        EntryPayload::Blank => Command::raft_record(Bytes::from_static(&[TAG_BLANK])),
        EntryPayload::Membership(m) => {
            let mut body = vec![TAG_MEMBERSHIP];
            body.extend_from_slice(&encode_membership(m)?);
            Command::raft_record(Bytes::from(body))
        }
    };
    let mut header = cmd.header;
    header.log_id = stored_log_id(&entry.log_id);
    Ok(log::Entry {
        header,
        body: cmd.body,
    })
}

/// The openraft entry a stored record holds.
pub fn from_record(rec: StoredBatch) -> io::Result<Entry> {
    let header = rec.header;
    let id = from_stored(&header.log_id);
    from_parts(id, header, rec.body)
}

/// The openraft entry for a header and body received or read back.
pub fn from_parts(id: LogId, header: BatchHeader, body: Bytes) -> io::Result<Entry> {
    if header.kind == BatchKind::Raft {
        match body.first() {
            Some(&TAG_BLANK) => return Ok(Entry::new_blank(id)),
            Some(&TAG_MEMBERSHIP) => {
                return Ok(Entry::new_membership(id, decode_membership(&body[1..])?))
            }
            Some(&TAG_COMMAND) => {}
            other => {
                return Err(invalid(format!(
                    "raft record at index {} has unknown tag {other:?}",
                    id.index
                )))
            }
        }
    }
    Ok(Entry::new_normal(id, Command { header, body }))
}

pub fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}
