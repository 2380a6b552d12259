-- A heartbeat that never waits for a row lock (issue 14).
--
-- Migration 12's keel_extend_leases locked every row of its batch in id order, waiting for
-- each one another transaction held. The rows a heartbeat covers are the ones completion
-- batches write: a replica's heartbeat names its running and prefetched jobs and the jobs
-- whose completions are queued or in flight. So it waited behind completion commits, and
-- while it waited it held the locks it had already taken, stalling the completion batches
-- that came next. During `keel bench --workloads w1` on Postgres, heartbeats of 600-1,200
-- leases took 0.1-0.6 s, and in 3 of 23 runs one of about 5,000 leases ran past the 3 s
-- statement timeout, after which its leases were not extended at all.
--
-- This one locks what it can at once (SKIP LOCKED), extends those leases, and answers for
-- every lease still held, with its expiry: the new one, or, for a row another transaction
-- holds, the expiry it has now. A row someone else is writing is almost always its own
-- outcome being committed; waiting would only learn that the lease ended. Should that
-- write roll back, the lease is still held and the next heartbeat extends it, well before
-- it lapses (heartbeats come every third of a lease). Because it never waits, it cannot
-- take part in a deadlock, so its lock pass need not go in id order.
--
-- Each statement finds its rows by primary key (the function's settings leave the
-- planner only that), so the plans stay linear in the batch, as migration 12 explains.
DROP FUNCTION keel_extend_leases(uuid[], uuid[], timestamptz);

CREATE FUNCTION keel_extend_leases(p_ids uuid[], p_tokens uuid[], p_expires_at timestamptz)
RETURNS TABLE (job_id uuid, job_token uuid, expires_at timestamptz)
LANGUAGE plpgsql VOLATILE
SET enable_seqscan = off
SET enable_hashjoin = off
SET enable_mergejoin = off
SET plan_cache_mode = force_generic_plan
AS $extend$
DECLARE
    v_free uuid[];
BEGIN
    -- The leases still held whose rows nobody else holds, locked. Locking the row of a
    -- join rechecks the join's terms on its latest version, so a token that changed
    -- since the statement began is not taken for a live one.
    SELECT array_agg(f.id) INTO v_free
    FROM (
        SELECT j.id FROM unnest(p_ids, p_tokens) AS l(id, token)
        JOIN jobs j ON j.id = l.id AND j.lease_token = l.token
        FOR UPDATE OF j SKIP LOCKED
    ) f;
    -- Held since the lock pass, so their tokens cannot have changed.
    UPDATE jobs j SET lease_expires_at = p_expires_at
    FROM unnest(v_free) AS f(id)
    WHERE j.id = f.id;
    -- Every lease still held: the ones extended above (this transaction's own writes are
    -- visible here) and the ones another transaction holds, as last committed.
    RETURN QUERY
        SELECT l.id, l.token, j.lease_expires_at
        FROM unnest(p_ids, p_tokens) AS l(id, token)
        JOIN jobs j ON j.id = l.id AND j.lease_token = l.token;
END
$extend$;
