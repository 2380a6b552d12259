-- Keel's job table on Postgres.
--
-- One row per job. Every hot query has an index shaped for it; the partial indexes cover
-- only the rows that query can match, so they stay small while finished jobs pile up:
--   lease          jobs_lease_idx          state = 'available', ordered as leased
--   rescue         jobs_expired_lease_idx  state = 'running', by lease expiry
--   promote        jobs_due_idx            scheduled/retryable, by run_at
--   retention      jobs_finished_idx       finished, by finished_at
--   list / stats   jobs_queue_state_idx, jobs_tenant_state_idx (keyset by id)
-- Unfiltered listing walks the primary key (UUIDv7 ids sort by creation time).
CREATE TABLE jobs (
    id               uuid        PRIMARY KEY,
    queue            text        NOT NULL,
    kind             text        NOT NULL,
    tenant           text        NOT NULL,
    -- json, not jsonb: args and results are passed through byte for byte and never queried.
    args             json        NOT NULL,
    priority         smallint    NOT NULL CHECK (priority BETWEEN 0 AND 9),
    state            text        NOT NULL CHECK (state IN ('scheduled', 'available', 'running',
                                     'retryable', 'completed', 'discarded', 'cancelled')),
    attempt          integer     NOT NULL DEFAULT 0 CHECK (attempt >= 0),
    max_attempts     integer     NOT NULL CHECK (max_attempts > 0),
    timeout_ms       bigint      NOT NULL CHECK (timeout_ms > 0),
    backoff          jsonb       NOT NULL,
    tags             jsonb       NOT NULL DEFAULT '[]',
    run_at           timestamptz NOT NULL,
    errors           jsonb       NOT NULL DEFAULT '[]',
    result           json,
    lease_owner      text,
    lease_token      uuid,
    lease_expires_at timestamptz,
    created_at       timestamptz NOT NULL,
    started_at       timestamptz,
    finished_at      timestamptz,
    -- A running job always has a lease; nothing else has a live one.
    CONSTRAINT jobs_lease_iff_running CHECK (
        (state = 'running') = (lease_token IS NOT NULL AND lease_expires_at IS NOT NULL)
    )
);

CREATE INDEX jobs_lease_idx ON jobs (queue, priority, run_at, id) WHERE state = 'available';
CREATE INDEX jobs_expired_lease_idx ON jobs (lease_expires_at) WHERE state = 'running';
CREATE INDEX jobs_due_idx ON jobs (run_at) WHERE state IN ('scheduled', 'retryable');
CREATE INDEX jobs_finished_idx ON jobs (finished_at)
    WHERE state IN ('completed', 'discarded', 'cancelled');
CREATE INDEX jobs_queue_state_idx ON jobs (queue, state, id);
CREATE INDEX jobs_tenant_state_idx ON jobs (tenant, state, id);
