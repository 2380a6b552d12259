//! Leadership: which replica runs maintenance and cron.
//!
//! Every replica campaigns through [`keel_core::LeaderStore::campaign`] (a leader row with a term
//! that lapses unless renewed). The winner renews every third of the term; the others try
//! again as soon as the current term lapses. The state is published in the handle's
//! [`LeaderWatch`](crate::LeaderWatch), which maintenance and cron follow.
//!
//! A leader only acts on a term it can prove, so it steps down *at once*, without waiting
//! for the term to lapse, when:
//! - a campaign fails (a store error) or does not answer within a quarter of the term:
//!   losing the database means losing leadership, while the other replicas take over once
//!   the term lapses in the database;
//! - its last successful renewal is older than three quarters of the term (the rest is
//!   the safety margin for clock drift and scheduling delays), which the cadence above
//!   makes impossible unless this process was starved;
//! - a fenced write is refused with [`StoreError::NotLeader`] (see [`step_down`]);
//! - shutdown begins; it then resigns, so another replica takes over at its next campaign
//!   rather than after the term lapses.
//!
//! Stepping down early is always safe: leadership is an efficiency (one replica does the
//! work), and the writes that must happen once (cron ticks) are fenced by the store.

use std::sync::Arc;
use std::time::Duration;

use keel_core::StoreError;
use keel_core::store::{CampaignParams, LeaderEpoch, Leadership};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::runtime::Shared;
use crate::telemetry;

/// The cadence derived from the term's length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Timing {
    ttl: Duration,
    /// Time between two campaigns of the leader.
    renew_every: Duration,
    /// Longest one campaign (or resignation) may take before it counts as failed.
    call_timeout: Duration,
    /// How long after a successful campaign was *sent* the term is trusted locally.
    trust_for: Duration,
}

impl Timing {
    fn of(ttl: Duration) -> Self {
        // Renew at 1/3; a renewal resolves (answer or timeout) by 1/3 + 1/4 = 7/12 of the
        // term, well before the trust runs out at 3/4, so a healthy leader never lapses,
        // and one that loses the database knows it within 1/4 of a term of trying.
        Self {
            ttl,
            renew_every: ttl / 3,
            call_timeout: ttl / 4,
            trust_for: ttl - ttl / 4,
        }
    }
}

/// Campaigns until `stop` fires, then resigns.
pub(crate) async fn run(shared: Arc<Shared>, stop: CancellationToken) {
    let timing = Timing::of(shared.config.leader_ttl);
    let me = shared.config.worker_id.clone();
    telemetry::leader(false);
    // Until when (local monotonic time) the term this replica holds is trusted.
    let mut trusted_until: Option<Instant> = None;
    loop {
        let sent = Instant::now();
        let deadline = trusted_until.map_or(sent + timing.call_timeout, |t| {
            t.min(sent + timing.call_timeout)
        });
        let campaign = shared.store.campaign(CampaignParams {
            owner: me.clone(),
            ttl: timing.ttl,
        });
        let answer = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            answer = tokio::time::timeout_at(deadline, campaign) => answer,
        };
        let mut next = sent + timing.renew_every;
        match answer {
            Ok(Ok(won)) if won.owner == me => {
                trusted_until = Some(sent + timing.trust_for);
                acquired(&shared, won.epoch);
            }
            Ok(Ok(other)) => {
                trusted_until = None;
                lose(&shared, "another replica holds the leadership");
                next = next.min(Instant::now() + until_lapse(&shared, &other, timing));
            }
            Ok(Err(e)) => {
                trusted_until = None;
                telemetry::store_error("campaign");
                if shared.handle.leadership.is_leader() {
                    telemetry::report_store_error("renewing the maintenance leadership", &e);
                    lose(&shared, "the renewal failed");
                } else {
                    tracing::debug!(error = %telemetry::ErrorChain(&e), "campaign for the maintenance leadership failed");
                }
            }
            Err(_elapsed) => {
                trusted_until = None;
                telemetry::store_error("campaign");
                lose(&shared, "the renewal did not answer in time");
            }
        }
        let overdue = trusted_until.unwrap_or(next);
        tokio::select! {
            biased;
            () = stop.cancelled() => break,
            () = shared.recampaign.notified() => {}
            // Only if this task was starved past the next renewal (`next` comes first).
            () = tokio::time::sleep_until(overdue), if trusted_until.is_some() => {
                trusted_until = None;
                lose(&shared, "the renewal is overdue");
            }
            () = tokio::time::sleep_until(next) => {}
        }
    }
    resign(&shared, timing).await;
}

/// How long until the term `leader` holds lapses (plus a little, so the campaign finds it
/// lapsed), so a candidate campaigns then rather than up to a third of a term later. At
/// least a quarter of the renewal interval, so a store whose clock disagrees with ours
/// cannot make us spin.
fn until_lapse(shared: &Shared, leader: &Leadership, timing: Timing) -> Duration {
    const SLACK: Duration = Duration::from_millis(20);
    let left = (leader.expires_at - shared.clock.now())
        .to_std()
        .unwrap_or(Duration::ZERO);
    (left + SLACK).clamp(timing.renew_every / 4, timing.renew_every)
}

fn acquired(shared: &Shared, epoch: LeaderEpoch) {
    let previous = shared.handle.leadership.set(Some(epoch));
    if previous == Some(epoch) {
        return;
    }
    if let Some(old) = previous {
        telemetry::leader_change("lost");
        tracing::warn!(epoch = old.0, "maintenance leadership term ended");
    }
    telemetry::leader(true);
    telemetry::leader_change("acquired");
    tracing::info!(
        epoch = epoch.0,
        worker_id = %shared.config.worker_id,
        "became the maintenance leader: running maintenance and cron here"
    );
}

/// Publishes that this replica no longer leads, if it did.
fn lose(shared: &Shared, why: &str) {
    if let Some(epoch) = shared.handle.leadership.set(None) {
        lost(epoch, why);
    }
}

fn lost(epoch: LeaderEpoch, why: &str) {
    telemetry::leader(false);
    telemetry::leader_change("lost");
    tracing::warn!(
        epoch = epoch.0,
        "lost the maintenance leadership ({why}); maintenance and cron stop here"
    );
}

/// Steps down from term `epoch` at once, because the store refused a write fenced with it
/// ([`StoreError::NotLeader`]), and asks the leader task to campaign again now (it learns
/// who leads, and wins again if the term is in fact free). News about an older term does
/// not undo a newer one.
pub(crate) fn step_down(shared: &Shared, epoch: LeaderEpoch, why: &str) {
    if shared.handle.leadership.clear_if(epoch) {
        lost(epoch, why);
    }
    shared.recampaign.notify_one();
}

/// On shutdown: stop leading here first, then give the term up in the store so another
/// replica takes over at its next campaign. Bounded like a campaign; if it fails, the term
/// simply lapses.
async fn resign(shared: &Shared, timing: Timing) {
    let Some(epoch) = shared.handle.leadership.set(None) else {
        return;
    };
    telemetry::leader(false);
    telemetry::leader_change("lost");
    let resigned = tokio::time::timeout(
        timing.call_timeout,
        shared.store.resign(&shared.config.worker_id),
    )
    .await;
    match resigned {
        Ok(Ok(())) => {
            tracing::info!(
                epoch = epoch.0,
                "resigned the maintenance leadership (shutdown)"
            );
        }
        Ok(Err(e)) => {
            telemetry::store_error("resign");
            report_resign_failure(&e);
        }
        Err(_elapsed) => {
            telemetry::store_error("resign");
            tracing::warn!(
                "resigning the maintenance leadership timed out; another replica takes over when the term lapses"
            );
        }
    }
}

fn report_resign_failure(e: &StoreError) {
    tracing::warn!(
        error = %telemetry::ErrorChain(e),
        "resigning the maintenance leadership failed; another replica takes over when the term lapses"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_renewal_resolves_before_the_local_trust_runs_out() {
        for ttl_ms in [500, 1000, 5000, 60_000] {
            let t = Timing::of(Duration::from_millis(ttl_ms));
            assert!(t.renew_every + t.call_timeout < t.trust_for, "{t:?}");
            assert!(t.trust_for < t.ttl, "{t:?}");
        }
    }
}
