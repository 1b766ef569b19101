-- Usage events: the outbox between intake and Stripe Billing Meters
-- (internal/metering). A row is committed before the intake answers 202, so
-- accepted usage survives any crash; the delivery worker moves it on.
--
--   waiting_customer -> pending           the customer got a Stripe customer
--   pending -> delivered                  Stripe accepted it (or already had it)
--   pending -> dead                       Stripe refused it, or attempts ran out
--   dead -> pending | waiting_customer    an operator requeued it (only
--                                         within 24h of first_attempt_at)
--
-- A pending row is due when next_attempt_at has passed. Claiming it sets a
-- lease: claimed_by names the claim and lease_until = next_attempt_at ends
-- it, so a row whose worker died becomes due again by itself.

-- +goose Up
CREATE TABLE usage_events (
    -- The caller's identifier, sent to Stripe unchanged; Stripe dedupes on it
    -- across the whole account, so it is unique here across all customers.
    identifier        text        NOT NULL,
    customer_id       text        NOT NULL,
    meter             text        NOT NULL,
    stripe_event_name text        NOT NULL,
    value             bigint      NOT NULL,
    occurred_at       timestamptz NOT NULL,
    status            text        NOT NULL,
    attempts          integer     NOT NULL DEFAULT 0,
    next_attempt_at   timestamptz NOT NULL,
    lease_until       timestamptz,
    claimed_by        text,
    last_error        text,
    -- When the event was first claimed for sending to a linked customer:
    -- from then on Stripe may hold it. Stripe dedupes identifiers only over
    -- about 24 hours, so a dead event first sent longer ago than that is
    -- not requeued (a resend could be counted twice). Kept across requeues.
    first_attempt_at  timestamptz,
    delivered_at      timestamptz,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT usage_events_pkey PRIMARY KEY (identifier),
    CONSTRAINT usage_events_customer_fkey FOREIGN KEY (customer_id) REFERENCES customers (id),
    CONSTRAINT usage_events_identifier_length CHECK (char_length(identifier) BETWEEN 1 AND 100),
    CONSTRAINT usage_events_value_nonnegative CHECK (value >= 0),
    CONSTRAINT usage_events_attempts_nonnegative CHECK (attempts >= 0),
    CONSTRAINT usage_events_status_known CHECK (status IN ('pending', 'waiting_customer', 'delivered', 'dead')),
    CONSTRAINT usage_events_delivered_at CHECK ((status = 'delivered') = (delivered_at IS NOT NULL))
);

-- The worker's claim: due pending rows, oldest due first. Also finds the
-- waiting_customer rows to release and counts the backlog for the gauges.
CREATE INDEX usage_events_status_due ON usage_events (status, next_attempt_at);

-- The admin listing by status (dead letters), in a stable keyset order.
CREATE INDEX usage_events_status_created ON usage_events (status, created_at, identifier);

-- A customer's totals per meter and time range.
CREATE INDEX usage_events_customer_meter_time ON usage_events (customer_id, meter, occurred_at);

-- Reconciliation: one meter's usage (any status) in a window, per customer.
CREATE INDEX usage_events_meter_time ON usage_events (meter, occurred_at);

-- +goose Down
DROP TABLE usage_events;
