-- Heartbeats and releases, as functions whose plans stay linear in the batch (issue 14).
--
-- Both were one statement: a CTE locking the batch's rows in id order, and an update
-- joined to it with `j.id IN (SELECT id FROM locked)`. Planned for a batch the planner
-- thought small (a generic plan estimates an array parameter at ten elements; a custom
-- one trusts statistics that can lag the table), that join became a nested loop that
-- rescans the CTE for every row: quadratic in the batch. A heartbeat of 5,000 leases then
-- compared 12.5 million pairs and took 2.1 s on an idle machine (EXPLAIN ANALYZE, Postgres
-- 15, 300,000 jobs), and during `keel bench --workloads w1` on Postgres, when a stall had
-- left thousands of completions waiting (their leases are extended with the rest), it
-- ran past the statement timeout: "extending 5329 leases failed", twice in six runs. Every
-- row it had locked held back the completions of those jobs until it gave up.
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
