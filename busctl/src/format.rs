//! Readers for the files `busctl` publishes or takes schemas from: Arrow IPC
//! (stream and file), Parquet and CSV. Everything here is blocking I/O; the
//! async side runs it on a blocking thread (see [`spawn_batches`]). Batches
//! are read one at a time: a file is never held in memory as a whole.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use arrow_array::RecordBatch;
use arrow_schema::{ArrowError, SchemaRef};
use tokio::sync::mpsc;

use crate::cli::FileFormat;

/// Rows per batch read from CSV and Parquet. Large enough that per-batch
/// overhead (headers, acks) is small, small enough that a batch of wide rows
/// stays far below the 16 MiB batch limit most of the time (`send_split`
/// halves the rest).
const READ_BATCH_ROWS: usize = 64 * 1024;

/// CSV records read to infer column types. A later value that does not fit the
/// inferred type fails the read with its line number; 10k rows makes that
/// rare and costs one extra pass over a bounded prefix.
const CSV_INFER_MAX_RECORDS: usize = 10_000;

/// Batches read ahead of the publisher. Bounds memory to a few batches while
/// letting file decoding overlap with the network.
const READ_AHEAD_BATCHES: usize = 4;

const ARROW_FILE_MAGIC: &[u8; 6] = b"ARROW1";
const PARQUET_MAGIC: &[u8; 4] = b"PAR1";
const IPC_CONTINUATION: [u8; 4] = [0xFF; 4];

/// The concrete format of a file after detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    IpcFile,
    IpcStream,
    Parquet,
    Csv,
}

impl Detected {
    pub fn name(self) -> &'static str {
        match self {
            Detected::IpcFile => "Arrow IPC file",
            Detected::IpcStream => "Arrow IPC stream",
            Detected::Parquet => "Parquet",
            Detected::Csv => "CSV",
        }
    }
}

/// Decide the format: magic bytes when they are conclusive, then the
/// extension, else CSV. An explicit `--format` wins, except that IPC is
/// always told apart into file and stream by its magic.
pub fn detect(path: &Path, requested: FileFormat) -> Result<Detected> {
    let mut head = [0u8; 8];
    let n = read_head(path, &mut head)?;
    let head = &head[..n];
    let is_arrow_file = head.starts_with(ARROW_FILE_MAGIC);
    let is_stream = head.starts_with(&IPC_CONTINUATION);
    let is_parquet = head.starts_with(PARQUET_MAGIC);
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase())
        .unwrap_or_default();
    let detected = match requested {
        FileFormat::Ipc if is_arrow_file => Detected::IpcFile,
        FileFormat::Ipc => Detected::IpcStream,
        FileFormat::Parquet => Detected::Parquet,
        FileFormat::Csv => Detected::Csv,
        FileFormat::Auto if is_arrow_file => Detected::IpcFile,
        FileFormat::Auto if is_parquet => Detected::Parquet,
        FileFormat::Auto if is_stream => Detected::IpcStream,
        FileFormat::Auto => match ext.as_str() {
            "arrow" | "arrows" | "ipc" | "feather" | "stream" => bail!(
                "{}: extension .{ext} says Arrow IPC, but the file starts with neither ARROW1 nor the 0xFFFFFFFF continuation marker",
                path.display()
            ),
            "parquet" | "pq" => bail!("{}: extension .{ext} says Parquet, but the file does not start with PAR1", path.display()),
            _ => Detected::Csv,
        },
    };
    if n == 0 {
        bail!(
            "{}: the file is empty (not {})",
            path.display(),
            detected.name()
        );
    }
    Ok(detected)
}

fn read_head(path: &Path, buf: &mut [u8]) -> Result<usize> {
    let mut f = open(path)?;
    let mut n = 0;
    while n < buf.len() {
        let k = f
            .read(&mut buf[n..])
            .with_context(|| format!("cannot read {}", path.display()))?;
        if k == 0 {
            break;
        }
        n += k;
    }
    Ok(n)
}

fn open(path: &Path) -> Result<File> {
    File::open(path).with_context(|| format!("cannot open {}", path.display()))
}

/// A `Read` that counts the bytes it has delivered, for progress reports.
struct Counting<R> {
    inner: R,
    read: Arc<AtomicU64>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

impl<R: Seek> Seek for Counting<R> {
    fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
        self.inner.seek(pos)
    }
}

type BatchIter = Box<dyn Iterator<Item = Result<RecordBatch, ArrowError>> + Send>;

/// An opened file: its schema and a streaming iterator over its batches.
pub struct BatchFile {
    pub format: Detected,
    pub schema: SchemaRef,
    /// Size of the file in bytes.
    pub len: u64,
    /// Bytes consumed so far (estimated from rows for Parquet).
    pub bytes_read: Arc<AtomicU64>,
    batches: BatchIter,
}

impl BatchFile {
    pub fn open(path: &Path, requested: FileFormat) -> Result<Self> {
        let format = detect(path, requested)?;
        let what = |e: ArrowError| {
            anyhow!(
                "{}: not a readable {} file: {e}",
                path.display(),
                format.name()
            )
        };
        let file = open(path)?;
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        let bytes_read = Arc::new(AtomicU64::new(0));
        let counting = |f: File| Counting {
            inner: f,
            read: bytes_read.clone(),
        };
        let (schema, batches): (SchemaRef, BatchIter) = match format {
            Detected::IpcStream => {
                let r =
                    arrow_ipc::reader::StreamReader::try_new(BufReader::new(counting(file)), None)
                        .map_err(what)?;
                (r.schema(), Box::new(r))
            }
            Detected::IpcFile => {
                let r =
                    arrow_ipc::reader::FileReader::try_new(BufReader::new(counting(file)), None)
                        .map_err(what)?;
                (r.schema(), Box::new(r))
            }
            Detected::Parquet => {
                let b =
                    parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
                        .map_err(|e| {
                            anyhow!("{}: not a readable Parquet file: {e}", path.display())
                        })?;
                let total_rows = u64::try_from(b.metadata().file_metadata().num_rows())
                    .unwrap_or(0)
                    .max(1);
                let schema = b.schema().clone();
                let reader = b
                    .with_batch_size(READ_BATCH_ROWS)
                    .build()
                    .map_err(|e| anyhow!("{}: not a readable Parquet file: {e}", path.display()))?;
                // Parquet reads by column chunk; estimate progress from rows.
                let (counter, mut rows) = (bytes_read.clone(), 0u64);
                let iter = reader.inspect(move |b| {
                    if let Ok(b) = b {
                        rows += b.num_rows() as u64;
                        counter.store(len.saturating_mul(rows) / total_rows, Ordering::Relaxed);
                    }
                });
                (schema, Box::new(iter))
            }
            Detected::Csv => {
                let fmt = arrow_csv::reader::Format::default().with_header(true);
                let mut f = file;
                let (schema, _) = fmt
                    .infer_schema(&mut f, Some(CSV_INFER_MAX_RECORDS))
                    .map_err(|e| anyhow!("{}: cannot infer a CSV schema: {e}", path.display()))?;
                if schema.fields().is_empty() {
                    bail!("{}: no CSV header found", path.display());
                }
                f.rewind()
                    .with_context(|| format!("cannot rewind {}", path.display()))?;
                let schema = Arc::new(schema);
                let r = arrow_csv::ReaderBuilder::new(schema.clone())
                    .with_format(fmt)
                    .with_batch_size(READ_BATCH_ROWS)
                    .build(BufReader::new(counting(f)))
                    .map_err(what)?;
                (schema, Box::new(r))
            }
        };
        Ok(Self {
            format,
            schema,
            len,
            bytes_read,
            batches,
        })
    }
}

/// The schema of a file, for `topics create --schema-from`.
pub fn read_schema(path: &Path) -> Result<(Detected, SchemaRef)> {
    let f = BatchFile::open(path, FileFormat::Auto)?;
    Ok((f.format, f.schema))
}

/// Read the file's batches on a blocking thread, at most
/// `READ_AHEAD_BATCHES` ahead of the consumer. Errors carry the file name and
/// the index of the batch that failed.
pub fn spawn_batches(
    file: BatchFile,
    path: PathBuf,
) -> (
    mpsc::Receiver<Result<RecordBatch>>,
    tokio::task::JoinHandle<()>,
) {
    let (tx, rx) = mpsc::channel(READ_AHEAD_BATCHES);
    let format = file.format;
    let handle = tokio::task::spawn_blocking(move || {
        for (i, b) in file.batches.enumerate() {
            let item = b.map_err(|e| {
                anyhow!(
                    "{}: batch {i} of the {} is unreadable: {e}",
                    path.display(),
                    format.name()
                )
            });
            let stop = item.is_err();
            if tx.blocking_send(item).is_err() || stop {
                return;
            }
        }
    });
    (rx, handle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    #[test]
    fn parquet_and_csv_files_stream_their_batches() {
        use arrow_array::{Array, Int64Array, StringArray};
        let dir = std::env::temp_dir().join(format!("busctl-read-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let schema = Arc::new(arrow_schema::Schema::new(vec![
            arrow_schema::Field::new("n", arrow_schema::DataType::Int64, false),
            arrow_schema::Field::new("s", arrow_schema::DataType::Utf8, true),
        ]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(Int64Array::from(vec![1, 2, 3])),
                Arc::new(StringArray::from(vec![Some("a"), None, Some("c")])),
            ],
        )
        .unwrap();
        let pq = dir.join("data.bin"); // no telling extension: found by magic
        let mut w =
            parquet::arrow::ArrowWriter::try_new(File::create(&pq).unwrap(), schema.clone(), None)
                .unwrap();
        w.write(&batch.slice(0, 2)).unwrap();
        w.flush().unwrap(); // a second row group
        w.write(&batch.slice(2, 1)).unwrap();
        w.close().unwrap();
        let f = BatchFile::open(&pq, FileFormat::Auto).unwrap();
        assert_eq!(f.format, Detected::Parquet);
        assert_eq!(f.schema.fields(), schema.fields());
        let got: Vec<RecordBatch> = f.batches.map(|b| b.unwrap()).collect();
        assert_eq!(got.iter().map(|b| b.num_rows()).sum::<usize>(), 3);
        let ns: Vec<i64> = got
            .iter()
            .flat_map(|b| {
                b.column(0)
                    .as_any()
                    .downcast_ref::<Int64Array>()
                    .unwrap()
                    .values()
                    .to_vec()
            })
            .collect();
        assert_eq!(ns, [1, 2, 3]);
        let ss: Vec<Option<String>> = got
            .iter()
            .flat_map(|b| {
                let a = b.column(1).as_any().downcast_ref::<StringArray>().unwrap();
                (0..a.len())
                    .map(|i| a.is_valid(i).then(|| a.value(i).to_owned()))
                    .collect::<Vec<_>>()
            })
            .collect();
        assert_eq!(ss, [Some("a".into()), None, Some("c".into())]);

        let csv = dir.join("data.csv");
        std::fs::write(&csv, "n,s\n1,a\n2,\n3,c\n").unwrap();
        let f = BatchFile::open(&csv, FileFormat::Auto).unwrap();
        assert_eq!(f.format, Detected::Csv);
        let got: Vec<RecordBatch> = f.batches.map(|b| b.unwrap()).collect();
        assert_eq!(got.len(), 1);
        let s = got[0]
            .column(1)
            .as_any()
            .downcast_ref::<StringArray>()
            .unwrap();
        assert_eq!((s.value(0), s.is_null(1), s.value(2)), ("a", true, "c"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn formats_are_detected_by_magic_then_extension() {
        let dir = std::env::temp_dir().join(format!("busctl-detect-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let a = write(&dir, "x.bin", b"ARROW1\0\0rest");
        let s = write(&dir, "x.data", &[0xFF, 0xFF, 0xFF, 0xFF, 1, 0, 0, 0]);
        let p = write(&dir, "x.csv", b"PAR1....");
        let c = write(&dir, "x.txt", b"a,b\n1,2\n");
        let bad = write(&dir, "x.parquet", b"a,b\n1,2\n");
        let empty = write(&dir, "e.csv", b"");
        assert_eq!(detect(&a, FileFormat::Auto).unwrap(), Detected::IpcFile);
        assert_eq!(detect(&s, FileFormat::Auto).unwrap(), Detected::IpcStream);
        assert_eq!(detect(&p, FileFormat::Auto).unwrap(), Detected::Parquet);
        assert_eq!(detect(&c, FileFormat::Auto).unwrap(), Detected::Csv);
        assert_eq!(detect(&c, FileFormat::Ipc).unwrap(), Detected::IpcStream);
        assert!(detect(&bad, FileFormat::Auto)
            .unwrap_err()
            .to_string()
            .contains("PAR1"));
        assert!(detect(&empty, FileFormat::Auto)
            .unwrap_err()
            .to_string()
            .contains("empty"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
