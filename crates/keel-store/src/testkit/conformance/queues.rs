//! Queues: counts per state and pausing.

use std::collections::BTreeMap;

use keel_core::JobState;
use keel_core::store::{ListParams, StateCounts};

use super::{Harness, insert_one, job, job_in_state, lease, lease_one, q, tenant};

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

/// One queue's statistics are its entry in the full statistics, for every caller: the
/// counts of every tenant's jobs or of one tenant's, and the paused flag either way. A
/// queue nobody used answers zeros.
pub async fn one_queue_stats_match_its_entry(h: &Harness) {
    let (acme, other) = (tenant("acme"), tenant("other"));
    insert_one(h, job("mail").tenant(acme.clone())).await;
    insert_one(h, job("mail").tenant(acme.clone())).await;
    insert_one(h, job("mail").tenant(other.clone())).await;
    insert_one(h, job("sms").tenant(acme.clone())).await;
    lease_one(h, "mail").await;
    h.store.set_queue_paused(q("mail"), true).await.unwrap();
    for scope in [None, Some(acme.clone()), Some(other.clone())] {
        let all = h.store.queue_stats(scope.clone()).await.unwrap();
        let entry = all.iter().find(|s| s.queue == q("mail")).unwrap();
        let one = h
            .store
            .queue_stats_of(q("mail"), scope.clone())
            .await
            .unwrap();
        assert_eq!(&one, entry, "scope {scope:?}");
        assert!(one.paused);
    }
    let everyone = h.store.queue_stats_of(q("mail"), None).await.unwrap();
    assert_eq!((everyone.counts.available, everyone.counts.running), (2, 1));
    let other_only = h
        .store
        .queue_stats_of(q("mail"), Some(other))
        .await
        .unwrap();
    assert_eq!(other_only.counts.total(), 1, "only the tenant's own job");
    let unused = h.store.queue_stats_of(q("unused"), None).await.unwrap();
    assert_eq!(unused.queue, q("unused"));
    assert!(!unused.paused);
    assert_eq!(unused.counts.total(), 0);
}
