-- Unique jobs, cron schedules with their tick keys, and the maintenance leader: the same
-- shape as migrations/postgres/0003_scale_out.sql (see it for why), in SQLite's types
-- (timestamps as INTEGER microseconds, ids as 16-byte BLOBs, JSON as TEXT). One process
-- uses a SQLite database, so it always wins the leader row; the table keeps the code path
-- and the fencing the same on both backends.
ALTER TABLE jobs ADD COLUMN unique_key TEXT;
ALTER TABLE jobs ADD COLUMN unique_scope TEXT
    CHECK (unique_scope IN ('queued', 'active', 'period'));

CREATE UNIQUE INDEX jobs_unique_idx ON jobs (tenant, unique_key)
    WHERE unique_key IS NOT NULL
      AND (unique_scope = 'period'
           OR state IN ('scheduled', 'available', 'retryable', 'running'));

CREATE TABLE schedules (
    tenant       TEXT    NOT NULL,
    name         TEXT    NOT NULL,
    cron         TEXT    NOT NULL,
    timezone     TEXT    NOT NULL,
    job          TEXT    NOT NULL,
    paused       INTEGER NOT NULL DEFAULT 0 CHECK (paused IN (0, 1)),
    catch_up_ms  INTEGER NOT NULL CHECK (catch_up_ms >= 0),
    last_tick_at INTEGER,
    created_at   INTEGER NOT NULL,
    updated_at   INTEGER NOT NULL,
    PRIMARY KEY (tenant, name)
) WITHOUT ROWID;

CREATE TABLE schedule_ticks (
    tenant   TEXT    NOT NULL,
    schedule TEXT    NOT NULL,
    tick_at  INTEGER NOT NULL,
    job_id   BLOB    NOT NULL CHECK (length(job_id) = 16),
    PRIMARY KEY (tenant, schedule, tick_at)
) WITHOUT ROWID;

CREATE INDEX schedule_ticks_tick_idx ON schedule_ticks (tick_at);

CREATE TABLE leaders (
    role       TEXT    NOT NULL PRIMARY KEY,
    owner      TEXT    NOT NULL,
    epoch      INTEGER NOT NULL CHECK (epoch > 0),
    expires_at INTEGER NOT NULL
) WITHOUT ROWID;
