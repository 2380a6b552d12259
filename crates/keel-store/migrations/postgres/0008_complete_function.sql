-- Completions, as a function whose plan is made once per connection (issue 14).
--
-- A batch of completions ran as one statement over unnest()ed arrays, sent unnamed so it
-- was planned afresh each time: a generic plan made on a young table (statistics from a few
-- hundred rows) hash-joined a sequential scan of the whole job table into every batch until
-- the next ANALYZE. Planning it cost 0.21 ms a batch, against 0.78 ms to run it
-- (pg_stat_statements over `keel bench --workloads w1` on Postgres 15: 10,990 batches of 29
-- jobs on average, 2.3 s of planning in 10.8 s). At one job per batch, as at a steady
-- trickle, planning the lease and the completion cost about 0.3 ms of Postgres CPU per job.
--
-- Here the plans are made by PL/pgSQL, which keeps them for the session like prepared
-- statements, and the function's settings leave the planner only the shape that is right
-- at any size: the leases' ids, each looked up by primary key. The rows are first locked
-- in id order, in a statement of their own (a heartbeat batch over the same running jobs
-- would otherwise lock them in another order, and the two deadlock; as a join inside the
-- update, the lock pass made a batch of 300 a third slower with hash joins off). Each row
-- then changes only while its lease token still matches (the fence), and the (id, token)
-- pairs that completed come back, so the caller can tell a stale lease from a missing job.
-- lease_owner stays, as a record of who ran the job. The target state is the Complete
-- transition's; a unit test in keel-store (postgres::sql) checks it against the state
-- machine.
CREATE FUNCTION keel_complete(p_ids uuid[], p_tokens uuid[], p_results text[],
                              p_finished_at timestamptz)
RETURNS TABLE (job_id uuid, job_token uuid)
LANGUAGE plpgsql VOLATILE
SET enable_seqscan = off
SET enable_hashjoin = off
SET enable_mergejoin = off
AS $complete$
BEGIN
    PERFORM FROM jobs j WHERE j.id = ANY(p_ids) ORDER BY j.id FOR UPDATE;
    RETURN QUERY
        UPDATE jobs j SET state = 'completed', result = l.result::json,
            finished_at = p_finished_at, lease_token = NULL, lease_expires_at = NULL
        FROM unnest(p_ids, p_tokens, p_results) AS l(id, token, result)
        WHERE j.id = l.id AND j.lease_token = l.token
        RETURNING l.id, l.token;
END
$complete$;
