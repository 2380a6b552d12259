-- Scale-out (several replicas on one database): unique jobs, cron schedules with their tick
-- keys, and the maintenance leader.

-- Unique jobs. `unique_key` is the caller's key (for the `period` scope, with its window
-- appended); `unique_scope` says which states hold it:
--   queued  until the job is first leased: the lease clears `unique_key` for good, so a
--           retry never re-takes a key a newer job may hold
--   active  scheduled, available, retryable and running: until the job finishes
--   period  every state: one job per key per window
-- One partial unique index enforces all three, so concurrent inserts of one key from any
-- number of replicas create one job. Rows without a key (nearly all) are not in it.
ALTER TABLE jobs
    ADD COLUMN unique_key   text,
    ADD COLUMN unique_scope text CHECK (unique_scope IN ('queued', 'active', 'period'));

CREATE UNIQUE INDEX jobs_unique_idx ON jobs (tenant, unique_key)
    WHERE unique_key IS NOT NULL
      AND (unique_scope = 'period'
           OR state IN ('scheduled', 'available', 'retryable', 'running'));

-- Cron schedules, one per (tenant, name). `job` is the template each tick enqueues (json,
-- not jsonb: its args are passed through byte for byte).
CREATE TABLE schedules (
    tenant       text        NOT NULL,
    name         text        NOT NULL,
    cron         text        NOT NULL,
    timezone     text        NOT NULL,
    job          json        NOT NULL,
    paused       boolean     NOT NULL DEFAULT false,
    catch_up_ms  bigint      NOT NULL CHECK (catch_up_ms >= 0),
    last_tick_at timestamptz,
    created_at   timestamptz NOT NULL,
    updated_at   timestamptz NOT NULL,
    PRIMARY KEY (tenant, name)
);

-- One row per enqueued tick, inserted in the same transaction as the tick's job: the
-- primary key is what makes a tick enqueue exactly once (G4), whoever tries and however
-- often. Rows older than any catch-up window are deleted by maintenance.
CREATE TABLE schedule_ticks (
    tenant   text        NOT NULL,
    schedule text        NOT NULL,
    tick_at  timestamptz NOT NULL,
    job_id   uuid        NOT NULL,
    PRIMARY KEY (tenant, schedule, tick_at)
);

CREATE INDEX schedule_ticks_tick_idx ON schedule_ticks (tick_at);

-- The maintenance leader: one row per role, held by `owner` until `expires_at` unless
-- renewed. `epoch` grows by one at every change of owner (a fencing token).
CREATE TABLE leaders (
    role       text        PRIMARY KEY,
    owner      text        NOT NULL,
    epoch      bigint      NOT NULL CHECK (epoch > 0),
    expires_at timestamptz NOT NULL
);
