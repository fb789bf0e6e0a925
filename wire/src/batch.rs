//! The batch header: the fixed-size prefix of every stored batch, identical on
//! the wire (publish and delivery) and on disk (segment files).
//!
//! ```text
//!  off size field            notes
//!    0    2 magic            0xAB 0xB7
//!    2    1 version          BATCH_VERSION
//!    3    1 kind             BatchKind (data, commit, abort, raft-internal)
//!    4    2 flags            bit 0: transactional
//!    6    2 producer_epoch
//!    8    4 header_crc       CRC32C of bytes 0..8 and 12..80 (all but itself)
//!   12    4 body_len         bytes of Arrow IPC that follow the header
//!   16    4 body_crc         CRC32C of the body (computed by the producer: end to end)
//!   20    4 row_count
//!   24    8 base_offset      first row offset; assigned by the partition leader
//!   32    8 timestamp_ms     append time, ms since the Unix epoch; assigned by the leader
//!   40    8 producer_id      -1: no producer id
//!   48    4 base_sequence    -1: no sequence
//!   52    4 schema_id        the topic schema version the body was encoded against
//!   56    8 log_term         Raft log id of the entry that carries this batch
//!   64    8 log_leader
//!   72    8 log_index
//!   80      body (body_len bytes)
//! ```
//!
//! The body CRC is the producer's and never changes, so a subscriber can verify
//! bytes end to end. Fields the broker assigns (offsets, time, log id) are covered
//! by the header CRC, which the broker recomputes when it sets them.

use thiserror::Error;

/// Size of [`BatchHeader`] when encoded.
pub const BATCH_HEADER_BYTES: usize = 80;
/// First two bytes of every batch.
pub const BATCH_MAGIC: [u8; 2] = [0xAB, 0xB7];
/// Batch format version. Bump on any layout change; readers refuse unknown ones.
pub const BATCH_VERSION: u8 = 1;

/// Flag bit: the batch belongs to a transaction.
pub const FLAG_TRANSACTIONAL: u16 = 1;

/// What a log entry carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum BatchKind {
    /// Application rows (Arrow IPC body).
    Data = 0,
    /// Transaction COMMIT marker: takes one offset, never delivered to applications.
    Commit = 1,
    /// Transaction ABORT marker: takes one offset, never delivered to applications.
    Abort = 2,
    /// Raft-internal entry (blank or membership): takes no offsets, never delivered.
    Raft = 3,
}

impl BatchKind {
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::Data),
            1 => Some(Self::Commit),
            2 => Some(Self::Abort),
            3 => Some(Self::Raft),
            _ => None,
        }
    }

    /// Control batches and Raft entries are never handed to applications.
    pub fn is_delivered(self) -> bool {
        self == Self::Data
    }
}

/// The identity of the Raft log entry that stores a batch. A single-node
/// partition is a Raft group of one; its entries still carry a log id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct LogId {
    pub term: u64,
    pub leader: u64,
    pub index: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchHeader {
    pub kind: BatchKind,
    pub flags: u16,
    pub producer_epoch: u16,
    pub body_len: u32,
    pub body_crc: u32,
    pub row_count: u32,
    pub base_offset: u64,
    pub timestamp_ms: i64,
    pub producer_id: i64,
    pub base_sequence: i32,
    pub schema_id: u32,
    pub log_id: LogId,
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum BatchError {
    #[error("batch is {got} bytes, shorter than the {BATCH_HEADER_BYTES}-byte header")]
    Short { got: usize },
    #[error("bad batch magic {found:02x?}: not an arrowbus batch")]
    Magic { found: [u8; 2] },
    #[error("batch version {found} is not supported (this build reads version {BATCH_VERSION})")]
    Version { found: u8 },
    #[error("batch header CRC mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    HeaderCrc { stored: u32, computed: u32 },
    #[error("unknown batch kind {found}")]
    Kind { found: u8 },
    #[error("batch body is {got} bytes, header says {expected}")]
    BodyLen { expected: u32, got: usize },
    #[error("batch body CRC mismatch: header says {stored:#010x}, body has {computed:#010x}")]
    BodyCrc { stored: u32, computed: u32 },
}

impl BatchHeader {
    /// A data batch header as a producer builds it: the broker fills in offsets,
    /// time and log id.
    pub fn for_body(body: &[u8], row_count: u32, schema_id: u32) -> Result<Self, BatchError> {
        let body_len = u32::try_from(body.len()).map_err(|_| BatchError::BodyLen {
            expected: u32::MAX,
            got: body.len(),
        })?;
        Ok(Self {
            kind: BatchKind::Data,
            flags: 0,
            producer_epoch: 0,
            body_len,
            body_crc: crc32c::crc32c(body),
            row_count,
            base_offset: 0,
            timestamp_ms: 0,
            producer_id: -1,
            base_sequence: -1,
            schema_id,
            log_id: LogId::default(),
        })
    }

    /// Encode with a freshly computed header CRC.
    pub fn encode(&self) -> [u8; BATCH_HEADER_BYTES] {
        let mut b = [0u8; BATCH_HEADER_BYTES];
        b[0..2].copy_from_slice(&BATCH_MAGIC);
        b[2] = BATCH_VERSION;
        b[3] = self.kind as u8;
        b[4..6].copy_from_slice(&self.flags.to_le_bytes());
        b[6..8].copy_from_slice(&self.producer_epoch.to_le_bytes());
        b[12..16].copy_from_slice(&self.body_len.to_le_bytes());
        b[16..20].copy_from_slice(&self.body_crc.to_le_bytes());
        b[20..24].copy_from_slice(&self.row_count.to_le_bytes());
        b[24..32].copy_from_slice(&self.base_offset.to_le_bytes());
        b[32..40].copy_from_slice(&self.timestamp_ms.to_le_bytes());
        b[40..48].copy_from_slice(&self.producer_id.to_le_bytes());
        b[48..52].copy_from_slice(&self.base_sequence.to_le_bytes());
        b[52..56].copy_from_slice(&self.schema_id.to_le_bytes());
        b[56..64].copy_from_slice(&self.log_id.term.to_le_bytes());
        b[64..72].copy_from_slice(&self.log_id.leader.to_le_bytes());
        b[72..80].copy_from_slice(&self.log_id.index.to_le_bytes());
        let crc = header_crc(&b);
        b[8..12].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decode and check magic, version, kind and header CRC. The body is not
    /// looked at: see [`BatchHeader::verify_body`].
    pub fn decode(bytes: &[u8]) -> Result<Self, BatchError> {
        let b: &[u8; BATCH_HEADER_BYTES] = bytes
            .get(..BATCH_HEADER_BYTES)
            .and_then(|s| s.try_into().ok())
            .ok_or(BatchError::Short { got: bytes.len() })?;
        if b[0..2] != BATCH_MAGIC {
            return Err(BatchError::Magic {
                found: [b[0], b[1]],
            });
        }
        if b[2] != BATCH_VERSION {
            return Err(BatchError::Version { found: b[2] });
        }
        let stored = u32_at(b, 8);
        let computed = header_crc(b);
        if stored != computed {
            return Err(BatchError::HeaderCrc { stored, computed });
        }
        let kind = BatchKind::from_u8(b[3]).ok_or(BatchError::Kind { found: b[3] })?;
        Ok(Self {
            kind,
            flags: u16::from_le_bytes([b[4], b[5]]),
            producer_epoch: u16::from_le_bytes([b[6], b[7]]),
            body_len: u32_at(b, 12),
            body_crc: u32_at(b, 16),
            row_count: u32_at(b, 20),
            base_offset: u64_at(b, 24),
            timestamp_ms: u64_at(b, 32) as i64,
            producer_id: u64_at(b, 40) as i64,
            base_sequence: u32_at(b, 48) as i32,
            schema_id: u32_at(b, 52),
            log_id: LogId {
                term: u64_at(b, 56),
                leader: u64_at(b, 64),
                index: u64_at(b, 72),
            },
        })
    }

    /// Check that `body` is exactly the body this header describes.
    pub fn verify_body(&self, body: &[u8]) -> Result<(), BatchError> {
        if body.len() != self.body_len as usize {
            return Err(BatchError::BodyLen {
                expected: self.body_len,
                got: body.len(),
            });
        }
        let computed = crc32c::crc32c(body);
        if computed != self.body_crc {
            return Err(BatchError::BodyCrc {
                stored: self.body_crc,
                computed,
            });
        }
        Ok(())
    }

    /// Encoded size of header plus body.
    pub fn record_len(&self) -> u64 {
        BATCH_HEADER_BYTES as u64 + u64::from(self.body_len)
    }

    /// Offsets this batch takes: its rows for data, one for a control marker,
    /// none for a Raft-internal entry.
    pub fn offset_count(&self) -> u64 {
        match self.kind {
            BatchKind::Data => u64::from(self.row_count),
            BatchKind::Commit | BatchKind::Abort => 1,
            BatchKind::Raft => 0,
        }
    }

    /// The offset after this batch. Saturates: a header claiming offsets near
    /// u64::MAX is corrupt, and must not overflow whoever reads it.
    pub fn next_offset(&self) -> u64 {
        self.base_offset.saturating_add(self.offset_count())
    }

    pub fn is_transactional(&self) -> bool {
        self.flags & FLAG_TRANSACTIONAL != 0
    }
}

/// CRC32C over every header byte except the CRC field itself.
fn header_crc(b: &[u8; BATCH_HEADER_BYTES]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&b[..8]), &b[12..])
}

fn u32_at(b: &[u8; BATCH_HEADER_BYTES], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8; BATCH_HEADER_BYTES], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> BatchHeader {
        let mut h = BatchHeader::for_body(b"hello arrow", 7, 3).unwrap();
        h.base_offset = 1_000_000_007;
        h.timestamp_ms = 1_700_000_000_123;
        h.producer_id = 42;
        h.producer_epoch = 9;
        h.base_sequence = 5;
        h.flags = FLAG_TRANSACTIONAL;
        h.log_id = LogId {
            term: 4,
            leader: 2,
            index: 99,
        };
        h
    }

    #[test]
    fn round_trips_every_field() {
        let h = sample();
        let enc = h.encode();
        assert_eq!(BatchHeader::decode(&enc).unwrap(), h);
        assert_eq!(h.next_offset(), 1_000_000_014);
        assert!(h.is_transactional());
        h.verify_body(b"hello arrow").unwrap();
    }

    #[test]
    fn any_flipped_header_bit_is_detected() {
        let enc = sample().encode();
        for byte in 0..BATCH_HEADER_BYTES {
            for bit in 0..8 {
                let mut bad = enc;
                bad[byte] ^= 1 << bit;
                assert!(
                    BatchHeader::decode(&bad).is_err(),
                    "flip of byte {byte} bit {bit} went unnoticed"
                );
            }
        }
    }

    #[test]
    fn body_mismatch_is_detected() {
        let h = sample();
        assert_eq!(
            h.verify_body(b"hello arrov"),
            Err(BatchError::BodyCrc {
                stored: h.body_crc,
                computed: crc32c::crc32c(b"hello arrov")
            })
        );
        assert!(matches!(
            h.verify_body(b"hello"),
            Err(BatchError::BodyLen {
                expected: 11,
                got: 5
            })
        ));
    }

    #[test]
    fn short_input_is_refused() {
        assert_eq!(
            BatchHeader::decode(&[0xAB; 10]),
            Err(BatchError::Short { got: 10 })
        );
    }

    #[test]
    fn offsets_taken_by_kind() {
        let mut h = sample();
        h.kind = BatchKind::Commit;
        assert_eq!(h.offset_count(), 1);
        h.kind = BatchKind::Raft;
        assert_eq!(h.offset_count(), 0);
    }
}
