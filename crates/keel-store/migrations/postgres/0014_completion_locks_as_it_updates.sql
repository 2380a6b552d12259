-- A completion that locks its rows as it writes them, in id order (issue 14).
--
-- Migration 8's keel_complete ran two statements: a lock pass over the batch's rows in id
-- order, then the update. The lock pass was there for one partner: a heartbeat batch that
-- locked the same running rows in another order, and waited, so the two could deadlock.
-- Since migration 13 the heartbeat waits for no lock (SKIP LOCKED), so it cannot take part
-- in a deadlock. The writers that still wait on running rows lock them one row at a time
-- (fail, cancel, retry) or in id order (keel_release, and this function); the maintenance
-- leader's writes skip locked rows.
--
-- The lock pass cost a statement per batch and a lock record per job: during `keel bench
-- --workloads w1` on Postgres 15 it took 4.4 us of the 31.5 us each completion spent in
-- its statements, and 55 of the 532 bytes of WAL it wrote per job (pg_stat_statements).
-- Now the update itself takes each row's lock as it reaches it. The batch is sorted by id
-- first, and the function's settings leave the planner one shape, a nested loop over the
-- sorted batch that looks each id up by primary key, so the rows are reached, and locked,
-- in id order; `postgres::tests::plans` checks that shape. A row another transaction holds
-- is waited for, then its token checked again on its latest version, as before.
CREATE OR REPLACE FUNCTION keel_complete(p_ids uuid[], p_tokens uuid[], p_results text[],
                                         p_finished_at timestamptz)
RETURNS TABLE (job_id uuid, job_token uuid)
LANGUAGE plpgsql VOLATILE
SET enable_seqscan = off
SET enable_hashjoin = off
SET enable_mergejoin = off
SET plan_cache_mode = force_generic_plan
AS $complete$
BEGIN
    RETURN QUERY
        UPDATE jobs j SET state = 'completed', result = l.result::json,
            finished_at = p_finished_at, lease_token = NULL, lease_expires_at = NULL
        FROM (SELECT u.id, u.token, u.result
              FROM unnest(p_ids, p_tokens, p_results) AS u(id, token, result)
              ORDER BY u.id) AS l
        WHERE j.id = l.id AND j.lease_token = l.token
        RETURNING l.id, l.token;
END
$complete$;
