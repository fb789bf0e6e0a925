//! What the peer drivers share: the producer window they are held to, and
//! the Arrow IPC encoding and decoding every bus uses for its messages.
//!
//! Peers that have no window of their own get one from [`Window`]: the same
//! bound on unacknowledged bytes as arrowbus's producer (64 MiB), and a count
//! bound chosen per run.

use std::sync::Arc;

use anyhow::Context;
use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;
use arrowbus::schema::{encode_body, encode_schema, BodyDecoder, TopicSchema};
use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Bytes a peer producer may have unacknowledged: arrowbus's own producer
/// limit (`MAX_INFLIGHT_BYTES_PER_PRODUCER`), so no system gets a deeper
/// byte pipeline than arrowbus.
pub const WINDOW_BYTES: u32 = 64 * 1024 * 1024;

/// The count and byte bound on a peer producer's unacknowledged batches.
#[derive(Clone)]
pub struct Window {
    batches: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
}

/// Held by an in-flight batch; dropping it (when the ack arrives) frees its
/// place in the window.
pub struct WindowPermit {
    _batch: OwnedSemaphorePermit,
    _bytes: OwnedSemaphorePermit,
}

impl Window {
    pub fn new(max_batches: usize) -> Self {
        Self {
            batches: Arc::new(Semaphore::new(max_batches.max(1))),
            bytes: Arc::new(Semaphore::new(WINDOW_BYTES as usize)),
        }
    }

    /// Wait for room for one batch of `len` bytes.
    pub async fn acquire(&self, len: usize) -> anyhow::Result<WindowPermit> {
        // A batch larger than the whole window still goes out alone.
        let n = u32::try_from(len)
            .unwrap_or(WINDOW_BYTES)
            .clamp(1, WINDOW_BYTES);
        let batch = self
            .batches
            .clone()
            .acquire_owned()
            .await
            .context("the producer window was closed")?;
        let bytes = self
            .bytes
            .clone()
            .acquire_many_owned(n)
            .await
            .context("the producer window was closed")?;
        Ok(WindowPermit {
            _batch: batch,
            _bytes: bytes,
        })
    }
}

/// Encodes the IPC body every bus sends (see the module doc).
pub fn body_of(batch: &RecordBatch) -> anyhow::Result<Bytes> {
    encode_body(batch).context("encoding the Arrow IPC body")
}

/// Decodes bodies received from a peer with the same decoder the arrowbus
/// client uses (a fresh Arrow stream decoder primed with the schema).
pub struct PeerDecoder(BodyDecoder);

impl PeerDecoder {
    pub fn new(schema: &SchemaRef) -> anyhow::Result<Self> {
        let ipc = encode_schema(schema).context("encoding the tick schema")?;
        let ts = TopicSchema::from_ipc(0, ipc).context("decoding the tick schema")?;
        Ok(Self(
            BodyDecoder::new(&ts).context("building a body decoder")?,
        ))
    }

    pub fn decode(&mut self, body: Bytes) -> anyhow::Result<RecordBatch> {
        self.0
            .decode(body)
            .context("a delivered body is not the Arrow IPC that was sent")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::{identify, Template};

    #[test]
    fn bodies_round_trip_through_the_peer_decoder() -> anyhow::Result<()> {
        let t = Template::with_rows(100)?;
        let batch = t.stamp(42, 1_700_000_000_000_000)?;
        let body = body_of(&batch)?;
        assert_eq!(body.len(), t.encoded_bytes);
        let mut d = PeerDecoder::new(&t.schema())?;
        let back = d.decode(body.clone())?;
        assert_eq!(back, batch);
        assert_eq!(identify(&back)?, (42, 1_700_000_000_000_000));
        // Each body is self-contained: a second decode needs no state.
        assert_eq!(d.decode(body)?, batch);
        assert!(d.decode(Bytes::from_static(b"not arrow")).is_err());
        Ok(())
    }

    #[tokio::test]
    async fn the_window_bounds_batches_and_bytes() -> anyhow::Result<()> {
        let w = Window::new(2);
        let a = w.acquire(10).await?;
        let _b = w.acquire(10).await?;
        let third = tokio::time::timeout(std::time::Duration::from_millis(50), w.acquire(10)).await;
        assert!(third.is_err(), "a third batch must wait for a free place");
        drop(a);
        let _c = tokio::time::timeout(std::time::Duration::from_secs(5), w.acquire(10)).await??;
        // Bytes: a batch larger than the window still goes out alone.
        let big = Window::new(100);
        let x = big.acquire(WINDOW_BYTES as usize * 2).await?;
        let blocked =
            tokio::time::timeout(std::time::Duration::from_millis(50), big.acquire(1)).await;
        assert!(blocked.is_err(), "the window's bytes are all taken");
        drop(x);
        Ok(())
    }
}
