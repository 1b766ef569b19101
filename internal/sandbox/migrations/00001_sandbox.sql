-- +goose Up
-- The offline Stripe sandbox's state, in a schema of its own. Objects are
-- kept as their JSON wire form, so that new object types need no new table.
CREATE TABLE stripe_sandbox.objects (
    id         text PRIMARY KEY,
    type       text NOT NULL,
    seq        bigint NOT NULL UNIQUE,
    data       jsonb NOT NULL,
    private    jsonb NOT NULL DEFAULT '{}',
    updated_at timestamptz NOT NULL
);
CREATE INDEX objects_type_seq ON stripe_sandbox.objects (type, seq);

CREATE TABLE stripe_sandbox.events (
    id      text PRIMARY KEY,
    seq     bigint NOT NULL UNIQUE,
    type    text NOT NULL,
    created bigint NOT NULL,
    payload text NOT NULL
);

CREATE TABLE stripe_sandbox.deliveries (
    event_id        text PRIMARY KEY REFERENCES stripe_sandbox.events (id),
    event_type      text NOT NULL,
    seq             bigint NOT NULL,
    status          text NOT NULL CHECK (status IN ('pending', 'succeeded', 'failed')),
    attempts        integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    next_attempt_at timestamptz,
    last_status     integer,
    last_answer     text,
    last_error      text,
    delivered_at    timestamptz,
    created_at      timestamptz NOT NULL
);

CREATE TABLE stripe_sandbox.delivery_attempts (
    event_id    text NOT NULL REFERENCES stripe_sandbox.events (id),
    event_type  text NOT NULL,
    attempt     integer NOT NULL CHECK (attempt >= 1),
    at          timestamptz NOT NULL,
    status      integer NOT NULL,
    answer      text NOT NULL,
    error       text NOT NULL,
    duration_ms bigint NOT NULL,
    PRIMARY KEY (event_id, attempt)
);

CREATE TABLE stripe_sandbox.idempotency_keys (
    key        text PRIMARY KEY,
    method     text NOT NULL,
    path       text NOT NULL,
    params     text NOT NULL,
    status     integer NOT NULL,
    body       text NOT NULL,
    created_at timestamptz NOT NULL
);

CREATE TABLE stripe_sandbox.meter_events (
    seq         bigint PRIMARY KEY,
    identifier  text NOT NULL,
    event_name  text NOT NULL,
    payload     jsonb NOT NULL,
    ts          timestamptz NOT NULL,
    via         text NOT NULL CHECK (via IN ('v1', 'v2')),
    duplicate   boolean NOT NULL,
    received_at timestamptz NOT NULL
);
CREATE UNIQUE INDEX meter_events_identifier_once ON stripe_sandbox.meter_events (identifier) WHERE NOT duplicate;

-- +goose Down
DROP TABLE stripe_sandbox.meter_events;
DROP TABLE stripe_sandbox.idempotency_keys;
DROP TABLE stripe_sandbox.delivery_attempts;
DROP TABLE stripe_sandbox.deliveries;
DROP TABLE stripe_sandbox.events;
DROP TABLE stripe_sandbox.objects;
