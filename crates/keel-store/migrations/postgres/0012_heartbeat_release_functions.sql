-- Heartbeats and releases, as functions whose plans stay linear in the batch (issue 14).
--
-- Both were one statement: a CTE locking the batch's rows in id order, and an update
-- joined to it with `j.id IN (SELECT id FROM locked)`. Whether that join stayed linear was
-- up to the planner. For a batch it believed small (a generic plan takes an array
-- parameter for ten elements; a custom plan trusts statistics that can lag the table), it
-- chose a nested loop that rereads the CTE for every row: quadratic in the batch. Under a
-- generic plan a heartbeat of 5,000 leases compared 12.5 million pairs and took 2.1 s on
-- an idle machine, against 0.04-0.07 s for the function below (Postgres 15, a table of
-- 300,000 jobs). Batches that large happen: a heartbeat covers a replica's prefetched
-- jobs and the jobs whose completions are still waiting to be written.
--
-- What this does not change: a heartbeat locks running rows that completion batches lock
-- too, and waits for each one in flight. During `keel bench --workloads w1` on Postgres,
-- before this migration, heartbeats of 600-1,200 leases took 0.1-0.6 s, and in 3 of 23
-- runs one of 4,906-5,329 leases ran past the 3 s statement timeout; after it, none in 15
-- runs. The plans logged for the slow ones were linear: their time went to those waits.
--
-- As keel_complete (migration 8) does: the rows are first locked in id order in a
-- statement of their own, then updated from the unnest()ed arrays, each id looked up by
-- primary key, fenced by its lease token. The function's settings leave the planner only
-- that shape, planned once per connection; it is right at any batch size and any table
-- size.
CREATE FUNCTION keel_extend_leases(p_ids uuid[], p_tokens uuid[], p_expires_at timestamptz)
RETURNS TABLE (job_id uuid, job_token uuid)
LANGUAGE plpgsql VOLATILE
SET enable_seqscan = off
SET enable_hashjoin = off
SET enable_mergejoin = off
SET plan_cache_mode = force_generic_plan
AS $extend$
BEGIN
    PERFORM FROM jobs j WHERE j.id = ANY(p_ids) ORDER BY j.id FOR UPDATE;
    RETURN QUERY
        UPDATE jobs j SET lease_expires_at = p_expires_at
        FROM unnest(p_ids, p_tokens) AS l(id, token)
        WHERE j.id = l.id AND j.lease_token = l.token
        RETURNING l.id, l.token;
END
$extend$;

-- A release gives the lease back: the job is available again and the attempt the lease
-- started does not count. Its queue's listeners are told, once per job released
-- (Postgres folds identical notifications of one transaction into one), by pg_notify
-- called in the FROM list: a function there runs for every row, where one in a target
-- list nobody reads may be planned away. The target state is the Release transition's;
-- a unit test in keel-store (postgres::sql) checks it against the state machine.
CREATE FUNCTION keel_release(p_ids uuid[], p_tokens uuid[], p_channel text)
RETURNS TABLE (job_id uuid, job_token uuid)
LANGUAGE plpgsql VOLATILE
SET enable_seqscan = off
SET enable_hashjoin = off
SET enable_mergejoin = off
SET plan_cache_mode = force_generic_plan
AS $release$
BEGIN
    PERFORM FROM jobs j WHERE j.id = ANY(p_ids) ORDER BY j.id FOR UPDATE;
    RETURN QUERY
        WITH released AS (
            UPDATE jobs j SET state = 'available', attempt = GREATEST(j.attempt - 1, 0),
                lease_token = NULL, lease_expires_at = NULL
            FROM unnest(p_ids, p_tokens) AS l(id, token)
            WHERE j.id = l.id AND j.lease_token = l.token
            RETURNING l.id, l.token, j.queue
        )
        SELECT r.id, r.token FROM released r, pg_notify(p_channel, r.queue) AS told;
END
$release$;
