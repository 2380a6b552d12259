//! W5: the server's footprint — start-up time and resident memory at idle.

use std::time::Duration;

use super::{Ctx, mib};
use crate::bench::report::RunRecord;
use crate::bench::server::rss_kib;
use crate::stats::KIB_PER_MIB;

/// Idle time before the idle RSS is read (W5): long enough for startup allocations to be
/// released and the first maintenance pass to run.
const IDLE_SETTLE: Duration = Duration::from_secs(2);

/// W5: start-up time (measured by the harness when it spawned the server) and RSS at idle.
pub(super) async fn w5_footprint(ctx: &Ctx<'_>, rec: &mut RunRecord) -> anyhow::Result<()> {
    rec.set(
        "w5.ready_ms",
        ctx.ready_after.map(|d| d.as_secs_f64() * 1000.0),
    );
    let Some(pid) = ctx.pid else {
        rec.notes
            .push("W5: no server pid (pass --pid with --url): RSS not measured".into());
        return Ok(());
    };
    tokio::time::sleep(IDLE_SETTLE).await;
    let idle = rss_kib(pid).await?;
    rec.set("w5.rss_idle_mib", mib(Some(idle)));
    ctx.progress.note(&format!(
        "  W5  ready in {} · idle RSS {:.1} MiB",
        ctx.ready_after
            .map(|d| format!("{:.0} ms", d.as_secs_f64() * 1000.0))
            .unwrap_or_else(|| "(not started here)".into()),
        idle as f64 / KIB_PER_MIB
    ));
    Ok(())
}
