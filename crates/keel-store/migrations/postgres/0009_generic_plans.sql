-- The lease as one function, and plans made once per connection for it and the completion
-- (issue 14).
--
-- PL/pgSQL keeps a statement's plan for the session only when the plan cache chooses the
-- generic plan. For the statements of keel_complete it did not: with array parameters
-- the custom plans looked cheaper, so each call planned both statements again (Postgres 15,
-- pg_stat_statements with track_planning over `keel bench --workloads w2p`: 9,797 plans in
-- 9,790 calls, 0.17 ms of planning per completion, more than the 0.16 ms the two statements
-- took to run). The lease's update was sent unnamed and planned at every call on purpose
-- (0.10 ms): a named statement's generic plan, made while the table was young, could keep
-- a scan of the whole table. At one job per call, the pace of a steady trickle, planning
-- was a third of Postgres' time per job.
--
-- plan_cache_mode = force_generic_plan in a function's settings plans its statements once
-- per connection; the other settings leave the planner only the shapes that are right at
-- any size, so a plan made on a young table stays right as it grows.
ALTER FUNCTION keel_complete(uuid[], uuid[], text[], timestamptz)
    SET plan_cache_mode = force_generic_plan;

-- The lease: keel_lease_walk's walk (migration 7), inlined, and the update of the rows it
-- locked, found by primary key. The walk follows jobs_lease_idx in lease order and skips
-- rows another replica has locked (SKIP LOCKED), so concurrent leasers never wait on each
-- other and never get the same job. A paused queue yields nothing: one queues_pkey probe
-- per call, outside FOR UPDATE, so leasers never lock its settings row. The update has no
-- state term: the walk returns only available jobs, locked, so none changes before the
-- update, and a state term matching the lease index's predicate had the planner scan that
-- whole index for the ids on a table without statistics.
--
-- A `queued`-scope unique job gives up its key for good when first leased, so the same key
-- can be enqueued again while it runs. The state list is the Lease transition's sources and
-- 'running' its target; a unit test in keel-store (postgres::sql) checks both against the
-- state machine. keel_lease_walk stays for replicas of the previous version during a
-- rolling upgrade.
CREATE FUNCTION keel_lease(p_queue text, p_max bigint, p_owner text,
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
