//! Queues: counts per state and pausing.

use std::collections::BTreeMap;

use keel_core::JobState;
use keel_core::store::{ListParams, StateCounts};

use super::{Harness, insert_one, job, job_in_state, lease, lease_one, q};

/// Statistics agree with the rows; the depths are the same counts without the finished
/// jobs (and without the queues that hold only finished ones).
pub async fn queue_stats_match_rows(h: &Harness) {
    let mut n = 0;
    for (queue, states) in [
        (
            "s1",
            vec![
                JobState::Available,
                JobState::Available,
                JobState::Running,
                JobState::Completed,
            ],
        ),
        (
            "s2",
            vec![
                JobState::Scheduled,
                JobState::Retryable,
                JobState::Discarded,
                JobState::Cancelled,
            ],
        ),
    ] {
        for s in states {
            n += 1;
            // Each setup gets its own queue for leasing, then we count by the job's queue.
            let (j, _) = job_in_state(h, s, &format!("{queue}x{n}")).await;
            let _ = j;
        }
    }
    let stats = h.store.queue_stats(None).await.unwrap();
    let mut want: BTreeMap<String, StateCounts> = BTreeMap::new();
    let mut after = None;
    loop {
        let page = h
            .store
            .list(ListParams {
                after,
                limit: 1000,
                ..Default::default()
            })
            .await
            .unwrap();
        for j in &page.jobs {
            want.entry(j.queue.to_string()).or_default().add(j.state, 1);
        }
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    let got: BTreeMap<String, StateCounts> = stats
        .into_iter()
        .map(|s| (s.queue.to_string(), s.counts))
        .collect();
    assert_eq!(got, want);
    assert_eq!(got.values().map(|c| c.total()).sum::<u64>(), n as u64);

    let depths: BTreeMap<String, StateCounts> = h
        .store
        .queue_depths()
        .await
        .unwrap()
        .into_iter()
        .map(|s| (s.queue.to_string(), s.counts))
        .collect();
    let unfinished: BTreeMap<String, StateCounts> = want
        .into_iter()
        .filter_map(|(queue, mut c)| {
            c.completed = 0;
            c.discarded = 0;
            c.cancelled = 0;
            (c.total() > 0).then_some((queue, c))
        })
        .collect();
    assert_eq!(depths, unfinished);
    assert_eq!(
        depths.values().map(|c| c.total()).sum::<u64>(),
        5,
        "two available, one running, one scheduled, one retryable"
    );
}

/// A paused queue leases nothing until resumed; enqueueing into it still works, and the
/// flag shows in the statistics (even for a queue without jobs).
pub async fn paused_queues_are_not_leased(h: &Harness) {
    h.store.set_queue_paused(q("held"), true).await.unwrap();
    h.store.set_queue_paused(q("empty"), true).await.unwrap();
    let j = insert_one(h, job("held")).await;
    insert_one(h, job("free")).await;
    assert!(lease(h, "held", 10).await.is_empty());
    assert_eq!(
        lease(h, "free", 10).await.len(),
        1,
        "other queues are unaffected"
    );
    let stats = h.store.queue_stats(None).await.unwrap();
    let paused: Vec<(&str, bool)> = stats.iter().map(|s| (s.queue.as_str(), s.paused)).collect();
    assert_eq!(paused, [("empty", true), ("free", false), ("held", true)]);
    assert_eq!(stats[2].counts.available, 1);
    let depths = h.store.queue_depths().await.unwrap();
    let flags: Vec<(&str, bool)> = depths
        .iter()
        .map(|s| (s.queue.as_str(), s.paused))
        .collect();
    assert_eq!(flags, [("empty", true), ("free", false), ("held", true)]);
    assert_eq!(depths[2].counts.available, 1);
    h.store.set_queue_paused(q("held"), false).await.unwrap();
    assert_eq!(lease_one(h, "held").await.0.id, j.id);
    let stats = h.store.queue_stats(None).await.unwrap();
    assert!(
        stats
            .iter()
            .all(|s| s.queue.as_str() == "empty" || !s.paused)
    );
}
