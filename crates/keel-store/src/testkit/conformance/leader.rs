//! The maintenance leader's term: won, renewed, lost and resigned.

use std::time::Duration;

use chrono::TimeDelta;
use keel_core::Clock as _;
use keel_core::store::LeaderEpoch;

use super::{Harness, campaign, replica};

/// The first campaign wins epoch 1; a rival sees the leader; renewal keeps the epoch and
/// extends the term; after it lapses another replica wins the next epoch; a resignation
/// lets another win at once; a non-leader's resignation changes nothing.
pub async fn leadership_is_won_renewed_lost_and_resigned(h: &Harness) {
    let t0 = h.clock.now();
    let a = campaign(h, "replica-a", 10).await;
    assert_eq!(a.owner, replica("replica-a"));
    assert_eq!(a.epoch, LeaderEpoch(1));
    assert_eq!(a.expires_at, t0 + TimeDelta::seconds(10));
    let seen_by_b = campaign(h, "replica-b", 10).await;
    assert_eq!(seen_by_b, a, "a rival's campaign reports the leader");

    h.clock.advance(Duration::from_secs(6));
    let renewed = campaign(h, "replica-a", 10).await;
    assert_eq!(renewed.epoch, LeaderEpoch(1), "renewal keeps the epoch");
    assert_eq!(renewed.expires_at, h.clock.now() + TimeDelta::seconds(10));

    // Past the first term's end but inside the renewed one: still A.
    h.clock.advance(Duration::from_secs(6));
    assert_eq!(
        campaign(h, "replica-b", 10).await.owner,
        replica("replica-a")
    );

    h.clock.advance(Duration::from_secs(5));
    let b = campaign(h, "replica-b", 10).await;
    assert_eq!(
        b.owner,
        replica("replica-b"),
        "the lapsed term is taken over"
    );
    assert_eq!(b.epoch, LeaderEpoch(2));
    assert_eq!(
        campaign(h, "replica-a", 10).await,
        b,
        "the old leader sees the new"
    );

    h.store.resign(&replica("replica-a")).await.unwrap();
    assert_eq!(
        campaign(h, "replica-c", 10).await,
        b,
        "only the leader's resignation counts"
    );
    h.store.resign(&replica("replica-b")).await.unwrap();
    let c = campaign(h, "replica-c", 10).await;
    assert_eq!(
        c.owner,
        replica("replica-c"),
        "a resignation frees the term at once"
    );
    assert_eq!(c.epoch, LeaderEpoch(3));
}
