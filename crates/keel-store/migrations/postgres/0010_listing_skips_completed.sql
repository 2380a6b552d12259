-- A leaner hot path, second step (issue 14): the listing indexes leave out completed jobs
-- too, so a job's completion, like its lease, adds no entry to them.
--
-- Every state change of a job on Postgres is a non-HOT update: the new row version gets an
-- entry in each index whose predicate it meets. A noop job's lifecycle wrote ten index
-- entries (insert 4, lease 2, completion 4); it now writes eight, and the two that are
-- gone were the dearest: the same pgbench lifecycle on this table runs about 13 % faster
-- (docs/benchmarks.md, seventh pass of issue 14).
--
-- Listing completed jobs walks the primary key in id order from the cursor, filtering:
-- completed jobs are most of a kept table, so a page meets them densely. The states a job
-- is looked for by (waiting, failing, discarded, cancelled) stay indexed by queue and by
-- tenant; running jobs have their own index, jobs_expired_lease_idx.
--
-- Rebuilding the two indexes locks the table against writes while it runs (seconds per
-- million jobs): apply it at a quiet moment on a large table. An older replica running
-- beside a migrated one still lists correctly, by other plans.
DROP INDEX jobs_queue_state_idx;
CREATE INDEX jobs_queue_state_idx ON jobs (queue, state, id)
    WHERE state NOT IN ('running', 'completed');
DROP INDEX jobs_tenant_state_idx;
CREATE INDEX jobs_tenant_state_idx ON jobs (tenant, state, id)
    WHERE state NOT IN ('running', 'completed');
