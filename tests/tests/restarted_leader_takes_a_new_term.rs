//! A leader that crashes and restarts must win a new election before it
//! writes again: it may never carry on in its old term.
//!
//! Why it matters: a leader replicates entries before its own copy is
//! durable, so a `kill -9` can take entries from the leader's log that its
//! followers already hold. Carrying on in the old term, it would write new
//! entries under those very log ids (same term, same leader, same index),
//! and the followers, seeing log ids they already have, would keep the old
//! ones: replicas diverge and an acknowledged batch can be overwritten.
//! jepsen-like found exactly that (CI smoke, and
//! `jepsen-like run --nodes 3 --time-limit 45 --nemesis kill,partition
//! --seed 1795356924169897233`: index 303 of one partition was value 303 on
//! two followers and 305 on the leader, both under log id (3, node 1, 303)).
//!
//! A node of one is the leader of all its partitions, so every restart
//! exercises the rule: the entries written after each restart must carry a
//! term above every term before it.

use std::time::Duration;

use arrowbus::NewTopic;
use arrowbus_tests::cluster::{data_headers, partition_dir_in};
use arrowbus_tests::{ticks, Busd};

const RESTARTS: usize = 3;
const BATCHES: usize = 4;

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_leader_writes_only_in_a_new_term() {
    let mut busd = Busd::start();
    busd.client()
        .await
        .admin()
        .create_topic(NewTopic::new("terms").partitions(1))
        .await
        .unwrap();
    // Offsets published in each life of the process.
    let mut lives: Vec<Vec<u64>> = Vec::new();
    let mut next = 0i64;
    for life in 0..=RESTARTS {
        if life > 0 {
            busd.kill9();
            busd.restart();
        }
        let client = busd.client().await;
        let producer = client.producer();
        let mut offsets = Vec::new();
        for _ in 0..BATCHES {
            let ack = tokio::time::timeout(
                Duration::from_secs(30),
                producer.publish("terms", &ticks(next, 3)),
            )
            .await
            .unwrap_or_else(|_| panic!("publish after restart {life} timed out\n{}", busd.log()))
            .unwrap_or_else(|e| panic!("publish after restart {life}: {e}\n{}", busd.log()));
            next += 3;
            offsets.push(ack.base_offset);
        }
        lives.push(offsets);
    }
    assert_eq!(busd.terminate(), Some(0), "graceful stop\n{}", busd.log());

    let headers = data_headers(&partition_dir_in(&busd.data_dir(), "terms-", 0));
    let term_at = |offset: u64| {
        headers
            .iter()
            .find(|h| h.base_offset == offset)
            .map(|h| h.log_id.term)
            .unwrap_or_else(|| panic!("acked offset {offset} is not in the log: {headers:?}"))
    };
    let mut highest_before = 0u64;
    for (life, offsets) in lives.iter().enumerate() {
        let terms: Vec<u64> = offsets.iter().map(|o| term_at(*o)).collect();
        println!("life {life}: offsets {offsets:?} terms {terms:?}");
        for t in &terms {
            assert!(
                *t > highest_before,
                "life {life} wrote in term {t}, but an earlier life already reached term \
                 {highest_before}: the restarted leader carried on in its old term ({terms:?})"
            );
        }
        highest_before = terms.iter().copied().max().unwrap_or(highest_before);
    }
}
