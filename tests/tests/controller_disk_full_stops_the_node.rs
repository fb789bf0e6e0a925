//! The controller's disk fills up on one node: its controller group stops
//! (openraft stops a group for good when a log write fails), and the node
//! does not linger half-alive, serving metadata it can no longer follow: it
//! shuts down with exit code 3 and a message that says what to do. Once
//! space returns, a restart brings it back from disk and it serves again.
//! Real `busd` processes; node 3's controller directory is a real, small
//! tmpfs (needs root, as CI and the dev machines have).

use std::path::Path;
use std::time::{Duration, Instant};

use arrowbus_tests::cluster::Cluster;
use arrowbus_tests::ticks;
use arrowbus_tests::tmpfs::Tmpfs;

/// Free space left on node 3's controller file system before the load.
const LEFT_FREE: u64 = 256 * 1024;
/// Controller entries written while it is full: each is a refused
/// command (deleting a topic that does not exist), which still goes
/// through the controller's log; together well over `LEFT_FREE`.
const MAX_ENTRIES: usize = 20_000;

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap_or_else(|e| panic!("{}: {e}", from.display())) {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), &dest)
                .unwrap_or_else(|err| panic!("copy {}: {err}", e.path().display()));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_whose_controller_disk_filled_stops_and_comes_back_after_a_restart() {
    let mut cluster = Cluster::start(3);
    let client = cluster.client().await;
    cluster.create_replicated_topic(&client, "before", 1).await;

    // Node 3's controller directory onto a 16 MiB tmpfs (while it is down).
    assert_eq!(cluster.terminate(3), Some(0), "stopping node 3");
    let cdir = cluster.node(3).data_dir().join("controller");
    let saved = tempfile::tempdir().unwrap();
    copy_tree(&cdir, saved.path());
    std::fs::remove_dir_all(&cdir).unwrap();
    let fs = Tmpfs::mount(&cdir, 16);
    copy_tree(saved.path(), &cdir);
    cluster.restart(3);

    let filler = cdir.join("filler");
    let fill = fs.free_bytes().saturating_sub(LEFT_FREE);
    std::fs::write(&filler, vec![0u8; fill as usize]).unwrap();

    // Controller entries until node 3 gives up.
    let mut code = None;
    let mut written = 0;
    while written < MAX_ENTRIES {
        let _ = client.admin().delete_topic("no-such-topic").await;
        written += 1;
        if written % 100 == 0 {
            code = cluster.wait_exit(3, Duration::from_millis(1));
            if code.is_some() {
                break;
            }
        }
    }
    let code = code.or_else(|| cluster.wait_exit(3, Duration::from_secs(30)));
    println!("node 3 exited with {code:?} after {written} controller entries");
    assert_eq!(
        code,
        Some(3),
        "node 3 should stop with exit code 3 once its controller cannot write\n{}",
        cluster.logs()
    );
    let log = cluster.node(3).log();
    assert!(
        log.contains("the controller group stopped"),
        "node 3 did not say why it stopped\n{log}"
    );

    // The other two go on; with space back, node 3 restarts and serves.
    cluster.create_replicated_topic(&client, "after", 1).await;
    std::fs::remove_file(&filler).unwrap();
    cluster.restart(3);
    let producer = client.producer();
    let deadline = Instant::now() + Duration::from_secs(60);
    let ack = loop {
        match producer.publish("after", &ticks(0, 10)).await {
            Ok(a) => break a,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "publish after restart: {e}\n{}",
                    cluster.logs()
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    assert_eq!(ack.base_offset, 0);
    cluster
        .await_converged(&client, "after", 0, "node 3 restarted with space")
        .await;
    for id in 1..=3 {
        assert_eq!(cluster.terminate(id), Some(0), "stopping node {id}");
    }
    drop(fs);
}
