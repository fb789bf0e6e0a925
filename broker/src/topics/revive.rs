//! Restarting a partition replica whose Raft core stopped.
//!
//! openraft stops a group's core for good on a storage error (a log write
//! that failed, e.g. a follower's disk filled up; an fsync that failed) or
//! an internal panic. Without this, that replica would stay dead until busd
//! restarts, while the rest of the node keeps running: one full disk on a
//! follower would cost the partition a replica until someone noticed. So a
//! node checks its groups, and a stopped one is shut down (its log closed,
//! so nothing more is written by that instance) and opened again from disk
//! by the next reconcile, which recovers the log as after a crash: for an
//! fsync that failed this is the only safe way back, since the page cache
//! no longer says what the disk holds. The reopened replica rejoins as a
//! follower and catches up from the leader.
//!
//! A replica that stops again right away (the disk is still full) is
//! restarted with a growing delay, up to [`REVIVE_MAX_DELAY`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use openraft::async_runtime::WatchReceiver;
use tokio::time::Instant;

use super::{Partition, Topics};

/// How often a node looks for stopped partition groups.
const REVIVE_CHECK_EVERY: Duration = Duration::from_secs(1);
/// Delay before the first restart of a stopped group; doubled for each
/// restart that did not last [`REVIVE_RESET_AFTER`].
const REVIVE_FIRST_DELAY: Duration = Duration::from_secs(1);
/// The longest delay between two restarts of one group.
const REVIVE_MAX_DELAY: Duration = Duration::from_secs(30);
/// A restarted group that ran this long starts over at the first delay.
const REVIVE_RESET_AFTER: Duration = Duration::from_secs(300);

/// Restarts of one group: how many in a row, and when the last was.
struct Revivals {
    count: u32,
    last: Instant,
}

impl Revivals {
    fn delay(&self) -> Duration {
        REVIVE_FIRST_DELAY
            .saturating_mul(1u32 << self.count.min(16))
            .min(REVIVE_MAX_DELAY)
    }
}

/// Why `p`'s Raft core stopped, or None while it runs.
fn stopped(p: &Partition) -> Option<String> {
    let m = p.group.raft.metrics();
    let m = m.borrow_watched();
    m.running_state.as_ref().err().map(|e| e.to_string())
}

impl Topics {
    /// Resolves once this node's controller group has stopped (openraft
    /// stops a group for good on a storage error), with the reason. The
    /// controller is not reopened in place like a partition: its state
    /// machine (sled) and every partition follow it, so the node exits and
    /// a restart recovers all of it from disk, as after a crash.
    pub async fn controller_stopped(&self) -> String {
        let mut rx = self.controller.raft.metrics();
        loop {
            if let Err(e) = &rx.borrow_watched().running_state {
                return e.to_string();
            }
            if rx.changed().await.is_err() {
                return "the controller group's metrics ended".to_owned();
            }
        }
    }

    pub(super) async fn revive_loop(self: Arc<Self>) {
        let mut history: HashMap<u64, Revivals> = HashMap::new();
        // First sighting of each stopped group: its restart waits from there.
        let mut seen: HashMap<u64, Instant> = HashMap::new();
        // A restart whose reopening did not complete: reconcile again.
        let mut unfinished = false;
        loop {
            tokio::time::sleep(REVIVE_CHECK_EVERY).await;
            if unfinished {
                unfinished = !self.reopen().await;
            }
            let now = Instant::now();
            history.retain(|_, r| now.duration_since(r.last) < REVIVE_RESET_AFTER);
            let dead: Vec<(u64, Arc<Partition>, String)> = self
                .lock_groups()
                .iter()
                .filter_map(|(gid, p)| stopped(p).map(|why| (*gid, p.clone(), why)))
                .collect();
            seen.retain(|gid, _| dead.iter().any(|(g, ..)| g == gid));
            for (gid, p, why) in dead {
                let first_seen = *seen.entry(gid).or_insert_with(|| {
                    tracing::error!(topic = %p.topic, partition = p.id, reason = %why,
                        "partition replica stopped (its Raft core failed); restarting it");
                    now
                });
                let delay = history
                    .get(&gid)
                    .map_or(REVIVE_FIRST_DELAY, Revivals::delay);
                if now.duration_since(first_seen) < delay {
                    continue;
                }
                seen.remove(&gid);
                let r = history.entry(gid).or_insert(Revivals {
                    count: 0,
                    last: now,
                });
                r.count += 1;
                r.last = now;
                if self.close_stopped(gid, &p).await {
                    tracing::info!(topic = %p.topic, partition = p.id, "reopening a stopped partition replica");
                    unfinished = !self.reopen().await;
                }
            }
        }
    }

    /// Take the stopped replica `p` of group `gid` out of service and close
    /// its log; false if it was reconciled away or replaced meanwhile.
    async fn close_stopped(&self, gid: u64, p: &Arc<Partition>) -> bool {
        // Under the reconcile lock: no reconcile may open the group again
        // before this instance has closed its log.
        let _guard = self.reconcile_lock.lock().await;
        let same = {
            let mut groups = self.lock_groups();
            let same = groups.get(&gid).is_some_and(|q| Arc::ptr_eq(q, p));
            if same {
                groups.remove(&gid);
            }
            same
        };
        if same {
            p.group.shutdown(&self.env.registry).await;
        }
        same
    }

    /// Reconcile, which opens every replica this node should host and does
    /// not: true once it did (on the newest controller state).
    async fn reopen(&self) -> bool {
        match self.reconcile().await {
            Ok(done) => done,
            Err(e) => {
                tracing::error!(error = %e, "reopening partition replicas failed; retrying");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restart_delays_double_up_to_the_cap() {
        let delays: Vec<u64> = (0..8)
            .map(|count| {
                Revivals {
                    count,
                    last: Instant::now(),
                }
                .delay()
                .as_secs()
            })
            .collect();
        assert_eq!(delays, vec![1, 2, 4, 8, 16, 30, 30, 30]);
        let huge = Revivals {
            count: u32::MAX,
            last: Instant::now(),
        };
        assert_eq!(huge.delay(), REVIVE_MAX_DELAY);
    }
}
