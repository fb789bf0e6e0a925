//! The broker's disk fills up: publishes fail with `StorageFull`, nothing
//! acknowledged is lost, the broker keeps serving reads, and publishing works
//! again as soon as space returns. Uses a real, small tmpfs (needs root, as
//! CI and the dev machines have).

use std::path::{Path, PathBuf};
use std::process::Command;

use arrowbus::{ErrorCode, NewTopic};
use arrowbus_tests::tmpfs::Tmpfs;
use arrowbus_tests::{read_seqs, ticks, Busd};

/// Size of the test file system: room for the certificates, topic metadata
/// and a few dozen batches.
const FS_MIB: u64 = 24;
/// Filler that takes most of it, freed later to "return space".
const FILLER_MIB: u64 = 12;

/// A small tmpfs in a temporary directory, and a node directory inside it.
/// Drop order matters to callers: the node, then the tmpfs, then `outer`.
fn node_on_tmpfs() -> (tempfile::TempDir, PathBuf, Tmpfs, tempfile::TempDir) {
    let outer = tempfile::Builder::new()
        .prefix("arrowbus-tmpfs-")
        .tempdir()
        .unwrap();
    let mount_dir = outer.path().join("fs");
    let fs = Tmpfs::mount(&mount_dir, FS_MIB);
    let node_dir = tempfile::Builder::new()
        .prefix("node-")
        .tempdir_in(&mount_dir)
        .unwrap();
    (outer, mount_dir, fs, node_dir)
}

#[tokio::test(flavor = "multi_thread")]
async fn disk_full_fails_publishes_cleanly_and_recovers() {
    let (_outer, mount_dir, fs, node_dir) = node_on_tmpfs();
    let filler = mount_dir.join("filler");
    std::fs::write(&filler, vec![0u8; (FILLER_MIB << 20) as usize]).unwrap();

    let busd = Busd::start_in(node_dir, &[]);
    let client = busd.client().await;
    client
        .admin()
        .create_topic(NewTopic::new("t"))
        .await
        .unwrap();
    let producer = client.producer();

    // ~128 KiB per batch: publish until the disk is full.
    let mut acked = Vec::new();
    let mut next = 0i64;
    let full = loop {
        match producer.publish("t", &ticks(next, 3000)).await {
            Ok(ack) => acked.push((ack, next)),
            Err(e) => break e,
        }
        next += 3000;
        assert!(next < 3000 * 10_000, "the disk never filled up");
    };
    assert_eq!(full.code(), Some(ErrorCode::StorageFull), "{full}");
    assert!(full.to_string().contains("disk is full"), "{full}");
    assert!(acked.len() > 5, "only {} batches fit", acked.len());

    // Still full: still refused, and reads still work.
    let again = producer.publish("t", &ticks(next, 3000)).await.unwrap_err();
    assert_eq!(again.code(), Some(ErrorCode::StorageFull));
    let read_back = read_seqs(&client, "t").await;
    let expected: Vec<i64> = acked.iter().flat_map(|(_, s)| *s..*s + 3000).collect();
    assert_eq!(
        read_back, expected,
        "acknowledged data changed while the disk was full"
    );

    // Space returns: publishing resumes where it left off.
    std::fs::remove_file(&filler).unwrap();
    let ack = producer
        .publish("t", &ticks(1_000_000, 3000))
        .await
        .unwrap();
    let last = acked.last().unwrap().0;
    assert_eq!(ack.base_offset, last.base_offset + u64::from(last.rows));
    let mut expected = expected;
    expected.extend(1_000_000..1_003_000);
    assert_eq!(read_seqs(&client, "t").await, expected);
    drop(busd);
    drop(fs);
}

fn remount(dir: &Path, mode: &str) {
    let ok = Command::new("mount")
        .args(["-o", &format!("remount,{mode}")])
        .arg(dir)
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "remount {mode} of {} failed", dir.display());
}

#[tokio::test(flavor = "multi_thread")]
async fn unwritable_data_dir_stops_the_node_clearly_and_loses_nothing() {
    let (outer, mount_dir, fs, node_dir) = node_on_tmpfs();
    let mut busd = Busd::start_in(node_dir, &[]);
    {
        let client = busd.client().await;
        client
            .admin()
            .create_topic(NewTopic::new("t"))
            .await
            .unwrap();
        let producer = client.producer();
        for i in 0..4 {
            producer.publish("t", &ticks(i * 3000, 3000)).await.unwrap();
        }
    }
    // The kernel refuses a read-only remount while files are open for
    // writing, so the disk turns read-only while the node is down.
    busd.kill9();
    remount(&mount_dir, "ro");
    let out = Command::new(arrowbus_tests::busd_path())
        .arg("dev")
        .arg("--data-dir")
        .arg(busd.data_dir())
        .arg("--listen")
        .arg(format!("127.0.0.1:{}", arrowbus_tests::free_port()))
        .arg("--profile")
        .arg(outer.path().join("profile.toml"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(3),
        "expected the storage exit code; stderr:\n{stderr}"
    );
    assert!(
        stderr.contains("Read-only file system"),
        "the reason is not named:\n{stderr}"
    );
    assert!(
        stderr.contains(&busd.data_dir().display().to_string()),
        "the path is not named:\n{stderr}"
    );

    // Writable again: the node starts and everything acknowledged is there.
    remount(&mount_dir, "rw");
    busd.restart();
    let client = busd.client().await;
    assert_eq!(
        read_seqs(&client, "t").await,
        (0..12_000).collect::<Vec<_>>()
    );
    let ack = client
        .producer()
        .publish("t", &ticks(12_000, 3000))
        .await
        .unwrap();
    assert_eq!(ack.base_offset, 12_000);
    drop(busd);
    drop(fs);
}
