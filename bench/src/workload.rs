//! What busbench publishes: a market-tick schema and batches of it sized by
//! rows or by encoded bytes. Each sent batch carries its own identity so the
//! subscriber can compute latency and detect loss without any side channel:
//!
//! - `timestamp` (every row): the batch's *intended* send time, µs since the
//!   Unix epoch on the bench's [`crate::latency::Clock`];
//! - `size[0]`: the batch's sequence number within its phase.
//!
//! Pure apart from building Arrow arrays: no I/O.

use std::sync::Arc;

use anyhow::{bail, Context};
use arrow_array::{
    Array, ArrayRef, DictionaryArray, Float64Array, Int64Array, RecordBatch, StringArray,
    TimestampMicrosecondArray,
};
use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};

/// Symbols drawn for the `symbol` column: a small set, as in a real feed.
const SYMBOLS: [&str; 8] = [
    "AAPL", "MSFT", "GOOG", "AMZN", "NVDA", "META", "TSLA", "IBM",
];
/// Rows used to estimate the encoded bytes per row for byte-sized batches.
const SIZE_PROBE_ROWS: usize = 4096;
/// Largest batch busbench builds, in rows; far above what 16 MiB allows.
const MAX_ROWS_PER_BATCH: usize = 4_000_000;

/// The tick schema: timestamp (µs, UTC), symbol, price, size, side ('B'/'S',
/// dictionary-encoded).
pub fn tick_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new(
            "timestamp",
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            false,
        ),
        Field::new("symbol", DataType::Utf8, false),
        Field::new("price", DataType::Float64, false),
        Field::new("size", DataType::Int64, false),
        Field::new(
            "side",
            DataType::Dictionary(Box::new(DataType::Int8), Box::new(DataType::Utf8)),
            false,
        ),
    ]))
}

/// How large each batch of a workload is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeSpec {
    /// Exactly this many rows.
    Rows(usize),
    /// As many rows as encode to about this many bytes (Arrow IPC body).
    Bytes(usize),
}

impl SizeSpec {
    /// `1`, `1000` (rows); `64k`, `64KiB`, `1m`, `1MiB` (bytes, binary units).
    pub fn parse(s: &str) -> Result<Self, String> {
        let t = s.trim().to_ascii_lowercase();
        let (num, mult) = if let Some(n) = t.strip_suffix("kib").or_else(|| t.strip_suffix('k')) {
            (n, Some(1024))
        } else if let Some(n) = t.strip_suffix("mib").or_else(|| t.strip_suffix('m')) {
            (n, Some(1024 * 1024))
        } else {
            (t.as_str(), None)
        };
        let n: usize = num
            .trim()
            .parse()
            .map_err(|_| format!("{s:?}: expected a row count (1000) or a size (64k, 1m)"))?;
        if n == 0 {
            return Err(format!("{s:?}: a batch needs at least one row or byte"));
        }
        Ok(match mult {
            Some(m) => SizeSpec::Bytes(n.saturating_mul(m)),
            None => SizeSpec::Rows(n),
        })
    }

    pub fn label(&self) -> String {
        match *self {
            SizeSpec::Rows(1) => "1 row".into(),
            SizeSpec::Rows(n) => format!("{n} rows"),
            SizeSpec::Bytes(b) if b % (1024 * 1024) == 0 => format!("{} MiB", b / (1024 * 1024)),
            SizeSpec::Bytes(b) if b % 1024 == 0 => format!("{} KiB", b / 1024),
            SizeSpec::Bytes(b) => format!("{b} B"),
        }
    }

    /// A name fragment usable in a topic name.
    pub fn slug(&self) -> String {
        self.label().replace(' ', "").to_ascii_lowercase()
    }
}

/// A pre-built batch of the tick schema; [`Template::stamp`] makes each sent
/// batch from it by rewriting only the `timestamp` and `size` columns.
pub struct Template {
    schema: SchemaRef,
    symbol: ArrayRef,
    price: ArrayRef,
    side: ArrayRef,
    sizes: Vec<i64>,
    /// Arrow IPC body bytes of one batch (what the client sends and the broker stores, less the 64-byte batch header).
    pub encoded_bytes: usize,
}

impl Template {
    pub fn new(spec: SizeSpec) -> anyhow::Result<Self> {
        let rows = match spec {
            SizeSpec::Rows(n) => n,
            SizeSpec::Bytes(target) => {
                let probe = Self::with_rows(SIZE_PROBE_ROWS)?;
                let empty = Self::with_rows(1)?;
                let per_row = (probe.encoded_bytes.saturating_sub(empty.encoded_bytes)) as f64
                    / (SIZE_PROBE_ROWS - 1) as f64;
                if per_row <= 0.0 {
                    bail!("cannot estimate the encoded size of a tick row");
                }
                let fixed = empty.encoded_bytes as f64 - per_row;
                (((target as f64 - fixed) / per_row).floor() as usize).max(1)
            }
        };
        Self::with_rows(rows)
    }

    pub fn with_rows(rows: usize) -> anyhow::Result<Self> {
        if rows == 0 || rows > MAX_ROWS_PER_BATCH {
            bail!("{rows} rows per batch: use 1..={MAX_ROWS_PER_BATCH}");
        }
        let mut rng = Lcg(0x9E37_79B9_7F4A_7C15);
        let symbol: StringArray = (0..rows)
            .map(|_| Some(SYMBOLS[rng.below(SYMBOLS.len() as u64) as usize]))
            .collect();
        let price: Float64Array = (0..rows)
            .map(|_| Some(100.0 + rng.below(100_000) as f64 / 100.0))
            .collect();
        let sizes: Vec<i64> = (0..rows).map(|_| 1 + rng.below(1000) as i64).collect();
        let side: DictionaryArray<arrow_array::types::Int8Type> = (0..rows)
            .map(|_| if rng.below(2) == 0 { "B" } else { "S" })
            .collect();
        let mut t = Self {
            schema: tick_schema(),
            symbol: Arc::new(symbol),
            price: Arc::new(price),
            side: Arc::new(side),
            sizes,
            encoded_bytes: 0,
        };
        let batch = t.stamp(0, 0)?;
        t.encoded_bytes = encoded_body_bytes(&batch)?;
        Ok(t)
    }

    pub fn rows(&self) -> usize {
        self.sizes.len()
    }

    pub fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    /// The batch to send as number `seq`, intended for `intended_us` (µs since the epoch).
    pub fn stamp(&self, seq: u64, intended_us: i64) -> anyhow::Result<RecordBatch> {
        let rows = self.rows();
        let ts = TimestampMicrosecondArray::from(vec![intended_us; rows]).with_timezone("UTC");
        let mut sizes = self.sizes.clone();
        if let Some(first) = sizes.first_mut() {
            *first = i64::try_from(seq).context("sequence number overflows i64")?;
        }
        RecordBatch::try_new(
            self.schema.clone(),
            vec![
                Arc::new(ts),
                self.symbol.clone(),
                self.price.clone(),
                Arc::new(Int64Array::from(sizes)),
                self.side.clone(),
            ],
        )
        .context("building a tick batch")
    }
}

/// What a delivered batch says about itself: (sequence number, intended send
/// time in µs since the epoch).
pub fn identify(batch: &RecordBatch) -> anyhow::Result<(u64, i64)> {
    if batch.num_rows() == 0 {
        bail!("delivered batch has no rows");
    }
    let size = batch
        .column_by_name("size")
        .and_then(|c| c.as_any().downcast_ref::<Int64Array>())
        .context("delivered batch has no Int64 'size' column")?;
    let ts = batch
        .column_by_name("timestamp")
        .and_then(|c| c.as_any().downcast_ref::<TimestampMicrosecondArray>())
        .context("delivered batch has no Timestamp(µs) 'timestamp' column")?;
    if size.is_null(0) || ts.is_null(0) {
        bail!("delivered batch has a null sequence number or timestamp");
    }
    let seq = u64::try_from(size.value(0)).context("negative sequence number")?;
    Ok((seq, ts.value(0)))
}

/// Bytes of the Arrow IPC encoding of a batch (schema message excluded).
pub fn encoded_body_bytes(batch: &RecordBatch) -> anyhow::Result<usize> {
    let stream = |b: Option<&RecordBatch>| -> anyhow::Result<usize> {
        let mut out = Vec::new();
        let mut w = arrow_ipc::writer::StreamWriter::try_new(&mut out, &batch.schema())?;
        if let Some(b) = b {
            w.write(b)?;
        }
        w.finish()?;
        drop(w);
        Ok(out.len())
    };
    Ok(stream(Some(batch))? - stream(None)?)
}

/// A tiny deterministic generator: the data only has to look like ticks.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(SizeSpec::parse("1"), Ok(SizeSpec::Rows(1)));
        assert_eq!(SizeSpec::parse("1000"), Ok(SizeSpec::Rows(1000)));
        assert_eq!(SizeSpec::parse("64k"), Ok(SizeSpec::Bytes(65536)));
        assert_eq!(SizeSpec::parse("64KiB"), Ok(SizeSpec::Bytes(65536)));
        assert_eq!(SizeSpec::parse("1m"), Ok(SizeSpec::Bytes(1 << 20)));
        assert!(SizeSpec::parse("0").is_err());
        assert!(SizeSpec::parse("big").is_err());
        assert_eq!(SizeSpec::parse("1m").map(|s| s.label()), Ok("1 MiB".into()));
        assert_eq!(
            SizeSpec::parse("1000").map(|s| s.slug()),
            Ok("1000rows".into())
        );
    }

    #[test]
    fn byte_sized_batches_land_near_their_target() -> anyhow::Result<()> {
        for target in [64 * 1024, 1024 * 1024] {
            let t = Template::new(SizeSpec::Bytes(target))?;
            let err = (t.encoded_bytes as f64 - target as f64).abs() / target as f64;
            assert!(
                err < 0.02,
                "target {target}, got {} bytes ({} rows)",
                t.encoded_bytes,
                t.rows()
            );
        }
        Ok(())
    }

    #[test]
    fn stamped_batches_identify_themselves() -> anyhow::Result<()> {
        let t = Template::with_rows(10)?;
        let b = t.stamp(42, 1_700_000_000_000_000)?;
        assert_eq!(b.num_rows(), 10);
        assert_eq!(identify(&b)?, (42, 1_700_000_000_000_000));
        let one = Template::with_rows(1)?.stamp(7, 5)?;
        assert_eq!(identify(&one)?, (7, 5));
        Ok(())
    }
}
