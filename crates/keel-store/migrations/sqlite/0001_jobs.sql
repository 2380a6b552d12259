-- Keel's job table on SQLite. Same shape and indexes as the Postgres schema (see
-- migrations/postgres/0001_jobs.sql for why each index exists), in SQLite's types:
--   ids and lease tokens: 16-byte BLOBs (UUID bytes; byte order = UUIDv7 time order)
--   timestamps: INTEGER microseconds since the Unix epoch (same precision as timestamptz)
--   JSON: TEXT, kept byte for byte
CREATE TABLE jobs (
    id               BLOB    NOT NULL PRIMARY KEY CHECK (length(id) = 16),
    queue            TEXT    NOT NULL,
    kind             TEXT    NOT NULL,
    tenant           TEXT    NOT NULL,
    args             TEXT    NOT NULL,
    priority         INTEGER NOT NULL CHECK (priority BETWEEN 0 AND 9),
    state            TEXT    NOT NULL CHECK (state IN ('scheduled', 'available', 'running',
                                 'retryable', 'completed', 'discarded', 'cancelled')),
    attempt          INTEGER NOT NULL DEFAULT 0 CHECK (attempt >= 0),
    max_attempts     INTEGER NOT NULL CHECK (max_attempts > 0),
    timeout_ms       INTEGER NOT NULL CHECK (timeout_ms > 0),
    backoff          TEXT    NOT NULL,
    tags             TEXT    NOT NULL DEFAULT '[]',
    run_at           INTEGER NOT NULL,
    errors           TEXT    NOT NULL DEFAULT '[]',
    result           TEXT,
    lease_owner      TEXT,
    lease_token      BLOB,
    lease_expires_at INTEGER,
    created_at       INTEGER NOT NULL,
    started_at       INTEGER,
    finished_at      INTEGER,
    CHECK ((state = 'running') = (lease_token IS NOT NULL AND lease_expires_at IS NOT NULL))
);

CREATE INDEX jobs_lease_idx ON jobs (queue, priority, run_at, id) WHERE state = 'available';
CREATE INDEX jobs_expired_lease_idx ON jobs (lease_expires_at) WHERE state = 'running';
CREATE INDEX jobs_due_idx ON jobs (run_at) WHERE state IN ('scheduled', 'retryable');
CREATE INDEX jobs_finished_idx ON jobs (finished_at)
    WHERE state IN ('completed', 'discarded', 'cancelled');
CREATE INDEX jobs_queue_state_idx ON jobs (queue, state, id);
CREATE INDEX jobs_tenant_state_idx ON jobs (tenant, state, id);
