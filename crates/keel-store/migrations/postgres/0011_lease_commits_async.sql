-- The lease commits without waiting for its WAL to reach disk (issue 14).
--
-- A lease is the one write of a job's lifecycle that nobody is told about: no client
-- waits for it, and the job is not finished by it. Yet its commit waited for a WAL flush
-- like any other, and a queue leases one batch at a time: sampled from pg_stat_activity
-- during a drain, a third of the lease's time was spent in WALSync and WALWrite, with
-- Postgres at one core of two (docs/benchmarks.md, seventh pass of issue 14). Committed
-- asynchronously, the lease is visible to every session at once, as before, and reaches
-- disk within three wal_writer_delay (600 ms by default), or sooner, with the next durable
-- commit of any session: the WAL is flushed in order, so once a job's completion, a
-- heartbeat or an enqueue has been acknowledged, every lease before it is on disk too.
--
-- What a crash of Postgres itself (not of Keel) can now lose is the leases of its last
-- moments. Their jobs come back as they were before the lease: available, with the
-- attempt not counted. A replica running such a job finds its lease gone at the next
-- heartbeat or at its completion (the token no longer matches: a lost lease, counted in
-- keel_jobs_lease_lost_total, G2), and the job runs again, as it would have after the lease
-- expired. Nothing acknowledged is lost: enqueues (G1), completions, heartbeats, retries
-- and cancels still commit durably.
--
-- The function is migration 9's, with the setting as its first step. A SET clause would
-- not do: it restores the setting when the function returns, before the commit reads it.
CREATE OR REPLACE FUNCTION keel_lease(p_queue text, p_max bigint, p_owner text,
                           p_expires_at timestamptz, p_started_at timestamptz,
                           p_tenant text, p_kinds text[])
RETURNS SETOF jobs
LANGUAGE plpgsql VOLATILE
SET enable_seqscan = off
SET enable_sort = off
SET enable_bitmapscan = off
SET plan_cache_mode = force_generic_plan
AS $lease$
BEGIN
    -- For this transaction only (is_local): the setting ends with it, so the connection's
    -- next transaction (a completion, an enqueue) commits durably as before.
    PERFORM set_config('synchronous_commit', 'off', true);
    RETURN QUERY
        UPDATE jobs j SET state = 'running', attempt = j.attempt + 1, lease_owner = p_owner,
            lease_token = gen_random_uuid(), lease_expires_at = p_expires_at,
            started_at = p_started_at,
            unique_key = CASE WHEN j.unique_scope = 'queued' THEN NULL ELSE j.unique_key END
        WHERE j.id = ANY(ARRAY(
            SELECT w.id FROM jobs w
            WHERE w.state IN ('available') AND w.queue = p_queue
              AND NOT EXISTS (SELECT 1 FROM queues s WHERE s.name = p_queue AND s.paused)
              AND (p_tenant IS NULL OR w.tenant = p_tenant)
              AND (cardinality(p_kinds) = 0 OR w.kind = ANY(p_kinds))
            ORDER BY w.priority, w.run_at, w.id
            LIMIT p_max
            FOR UPDATE OF w SKIP LOCKED))
        RETURNING j.*;
END
$lease$;
