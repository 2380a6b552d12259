-- A leaner hot path (issue 14): the listing indexes leave out running jobs.
--
-- SQLite rewrites an index entry when an UPDATE changes one of its columns or its WHERE
-- clause's truth. A lease (available → running) and a completion (running → completed)
-- each deleted and re-inserted the job in both listing indexes; now a lease only deletes
-- and a completion only inserts. Running jobs are few (at most the workers' slots) and have
-- their own index, jobs_expired_lease_idx, which listing and counting use for them.
DROP INDEX jobs_queue_state_idx;
CREATE INDEX jobs_queue_state_idx ON jobs (queue, state, id) WHERE state <> 'running';
DROP INDEX jobs_tenant_state_idx;
CREATE INDEX jobs_tenant_state_idx ON jobs (tenant, state, id) WHERE state <> 'running';
