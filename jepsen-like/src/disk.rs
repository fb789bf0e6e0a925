//! Final reads of a node's own log, from its data directory after the node
//! stopped. Over the network every read is served by the partition's
//! leader (arrowbus has no follower reads), so "read every partition from
//! every node" reaches one replica only; reading each replica's segment
//! files is what lets the checker compare replicas (`node-divergence`).

use std::path::Path;

use arrow_array::{Array, Int64Array};
use arrowbus::schema::{BodyDecoder, TopicSchema};
use arrowbus_raft::log::{LogConfig, PartitionLog};

use crate::history::{Key, Reads};

/// Every data record of partitions `0..keys` of `topic` in the node whose
/// data directory is `data_dir`, as (offset, value) per key. Errors are
/// strings for the history (a failed read is itself reported).
///
/// `dump`: also write every record's log id (term, leader, index), kind,
/// offsets and values there, one line each: when replicas diverge, this is
/// what tells a bad truncation from two leaders in one term.
pub fn read_node_log(
    data_dir: &Path,
    topic: &str,
    keys: u32,
    schema: &TopicSchema,
    dump: Option<&Path>,
) -> Result<Reads, String> {
    let topics = data_dir.join("topics");
    // A topic's directory is `<name>-<id>`; the run has one topic.
    let prefix = format!("{topic}-");
    let dir = std::fs::read_dir(&topics)
        .map_err(|e| format!("{}: {e}", topics.display()))?
        .filter_map(|e| e.ok())
        .find(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .ok_or_else(|| format!("no {prefix}* directory in {}", topics.display()))?
        .path();
    let mut reads = Reads::new();
    let mut lines = String::new();
    for k in 0..keys {
        let pdir = dir.join(format!("p-{k}"));
        // A node that holds no replica of a partition (replicas < nodes)
        // reports nothing for its key rather than an empty log.
        if pdir.exists() {
            lines.push_str(&format!("# key {k}: {}\n", pdir.display()));
            read_partition(
                &pdir,
                schema,
                reads.entry(k as Key).or_default(),
                &mut lines,
            )?;
        }
    }
    if let Some(path) = dump {
        std::fs::write(path, lines).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(reads)
}

fn read_partition(
    pdir: &Path,
    schema: &TopicSchema,
    out: &mut Vec<(u64, i64)>,
    dump: &mut String,
) -> Result<(), String> {
    let (log, _) = PartitionLog::open(pdir, LogConfig::default())
        .map_err(|e| format!("opening {}: {e}", pdir.display()))?;
    let r = (|| {
        let mut decoder =
            BodyDecoder::new(schema).map_err(|e| format!("schema of the topic: {e}"))?;
        let mut cursor = log
            .seek_offset(log.start_offset())
            .map_err(|e| format!("seeking {}: {e}", pdir.display()))?;
        while let Some(b) = log
            .read(&mut cursor, u64::MAX)
            .map_err(|e| format!("reading {}: {e}", pdir.display()))?
        {
            let h = &b.header;
            let id = h.log_id;
            // index term leader kind base_offset rows [values]
            dump.push_str(&format!(
                "{} {} {} {:?} {} {}",
                id.index, id.term, id.leader, h.kind, h.base_offset, h.row_count
            ));
            if h.kind != arrowbus_wire::BatchKind::Data {
                dump.push('\n');
                continue; // Raft's own entries (elections, membership)
            }
            let batch = decoder.decode(b.body.clone()).map_err(|e| {
                format!(
                    "{} offset {}: undecodable body: {e}",
                    pdir.display(),
                    b.header.base_offset
                )
            })?;
            let values = batch
                .column_by_name("value")
                .and_then(|c| c.as_any().downcast_ref::<Int64Array>())
                .ok_or_else(|| {
                    format!(
                        "{} offset {}: no Int64 value column",
                        pdir.display(),
                        b.header.base_offset
                    )
                })?;
            for i in 0..values.len() {
                out.push((b.header.base_offset + i as u64, values.value(i)));
                dump.push_str(&format!(" {}", values.value(i)));
            }
            dump.push('\n');
        }
        Ok(())
    })();
    log.close();
    r
}
