-- +goose Up
CREATE TABLE customers (
    id                    text PRIMARY KEY,
    email                 text,
    name                  text,
    low_balance_threshold bigint,
    metadata              jsonb NOT NULL DEFAULT '{}',
    stripe_customer_id    text,
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT customers_id_format CHECK (id ~ '^[A-Za-z0-9_.:@-]{1,255}$'),
    CONSTRAINT customers_low_balance_threshold_nonnegative CHECK (low_balance_threshold >= 0),
    CONSTRAINT customers_stripe_customer_id_key UNIQUE (stripe_customer_id)
);

-- The outbound business event log. txid is the writing transaction's id: the
-- feed orders by (txid, id) and only shows rows whose transaction is older
-- than every transaction still running, so a poller never skips an event
-- whose transaction commits after a later-numbered one.
CREATE TABLE events (
    id          bigserial PRIMARY KEY,
    txid        xid8 NOT NULL DEFAULT pg_current_xact_id(),
    type        text NOT NULL,
    customer_id text,
    data        jsonb NOT NULL DEFAULT '{}',
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX events_feed_order ON events (txid, id);

-- +goose Down
DROP TABLE events;
DROP TABLE customers;
