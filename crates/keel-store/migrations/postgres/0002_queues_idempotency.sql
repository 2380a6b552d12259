-- Queue settings: a row exists once a queue has been paused or resumed. Leasing checks it
-- with a primary-key lookup, so a paused queue costs nothing on the hot path of others.
CREATE TABLE queues (
    name       text        PRIMARY KEY,
    paused     boolean     NOT NULL DEFAULT false,
    updated_at timestamptz NOT NULL
);

-- Idempotency keys (G3): one row per (tenant, key), inserted in the same transaction as the
-- jobs it created, with a fingerprint of the request and the exact response. The primary key
-- makes concurrent first uses of one key serialise: the loser's insert waits for the winner
-- to commit, finds the row, and replays its response.
CREATE TABLE idempotency_keys (
    tenant      text        NOT NULL,
    key         text        NOT NULL,
    fingerprint text        NOT NULL,
    status      smallint    NOT NULL,
    body        bytea       NOT NULL,
    created_at  timestamptz NOT NULL,
    expires_at  timestamptz NOT NULL,
    PRIMARY KEY (tenant, key)
);

CREATE INDEX idempotency_keys_expires_idx ON idempotency_keys (expires_at);
