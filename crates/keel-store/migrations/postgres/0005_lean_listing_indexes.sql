-- A leaner hot path (issue 14): the listing indexes leave out running jobs.
--
-- Every state change of a job is a non-HOT update (`state` is indexed), which adds the new
-- row version to every index whose predicate it meets. A lease (available → running) put
-- it into the primary key, the running index and both listing indexes; now only into the
-- first two. Running jobs are few (at most the workers' slots) and have their own index,
-- jobs_expired_lease_idx, which listing and counting use for them.
--
-- Rebuilding the two indexes locks the table against writes while it runs (seconds per
-- million jobs): apply it at a quiet moment on a large table.
DROP INDEX jobs_queue_state_idx;
CREATE INDEX jobs_queue_state_idx ON jobs (queue, state, id) WHERE state <> 'running';
DROP INDEX jobs_tenant_state_idx;
CREATE INDEX jobs_tenant_state_idx ON jobs (tenant, state, id) WHERE state <> 'running';
