-- Payments: Checkout, the payment state machine, the confirmation guard,
-- refunds, subscriptions and the stored Stripe events
-- (internal/payments, internal/stripehook).

-- +goose Up
CREATE TABLE payments (
    id                   text PRIMARY KEY,
    customer_id          text NOT NULL REFERENCES customers (id),
    item                 text NOT NULL,
    item_kind            text NOT NULL,
    quantity             bigint NOT NULL,
    status               text NOT NULL DEFAULT 'pending',
    unit_amount          bigint NOT NULL,
    -- The total we expect Stripe to collect (unit_amount × quantity); the
    -- validation chain compares amount_received against it.
    amount               bigint NOT NULL,
    currency             text NOT NULL,
    amount_received      bigint,
    -- Cumulative, as Stripe's charge.amount_refunded; only its increase is revoked.
    amount_refunded      bigint NOT NULL DEFAULT 0,
    credits              bigint NOT NULL DEFAULT 0,
    credits_expire_after_seconds bigint,
    livemode             boolean NOT NULL,
    checkout_session_id  text,
    payment_intent_id    text,
    invoice_id           text,
    subscription_id      text,
    stripe_customer_id   text,
    -- Stripe's Checkout payment_status last seen (paid, unpaid, no_payment_required).
    checkout_payment_status text,
    failure_reason       text,
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now(),
    succeeded_at         timestamptz,
    CONSTRAINT payments_item_kind_check CHECK (item_kind IN ('credit_pack', 'product', 'plan')),
    CONSTRAINT payments_status_check CHECK (status IN ('pending', 'succeeded', 'failed', 'refunded')),
    CONSTRAINT payments_quantity_check CHECK (quantity >= 1),
    CONSTRAINT payments_amounts_check CHECK (unit_amount >= 0 AND amount >= 0 AND amount_refunded >= 0
        AND (amount_received IS NULL OR amount_received >= 0)),
    CONSTRAINT payments_credits_check CHECK (credits >= 0),
    CONSTRAINT payments_checkout_session_id_key UNIQUE (checkout_session_id),
    CONSTRAINT payments_payment_intent_id_key UNIQUE (payment_intent_id)
);
CREATE INDEX payments_customer_idx ON payments (customer_id, id DESC);

-- Every transition the state machine applied or refused, with its cause.
CREATE TABLE payment_transitions (
    id                bigserial PRIMARY KEY,
    payment_id        text NOT NULL REFERENCES payments (id),
    from_status       text,
    to_status         text NOT NULL,
    applied           boolean NOT NULL,
    stripe_event_id   text,
    stripe_event_type text,
    reason            text,
    created_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX payment_transitions_payment_idx ON payment_transitions (payment_id, id);
-- A Stripe event enters a payment's history once: a redelivery or an
-- operator's replay of it is a no-op, not a second payment.failed.
CREATE UNIQUE INDEX payment_transitions_event_key ON payment_transitions (payment_id, stripe_event_id)
    WHERE stripe_event_id IS NOT NULL;

-- The money guard: one row per confirmed PaymentIntent, written in the same
-- transaction as the grant, the transition and the payment.succeeded event.
-- Both confirmation strategies key it by the PaymentIntent id, so switching
-- TALLY_CONFIRM_ON can never credit a payment twice.
CREATE TABLE payment_confirmations (
    payment_intent_id text PRIMARY KEY,
    payment_id        text NOT NULL REFERENCES payments (id),
    stripe_event_id   text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT payment_confirmations_payment_id_key UNIQUE (payment_id)
);

-- Each refund increase applied, so the history shows what was revoked when.
CREATE TABLE payment_refunds (
    id                    bigserial PRIMARY KEY,
    payment_id            text NOT NULL REFERENCES payments (id),
    stripe_event_id       text,
    amount_refunded_total bigint NOT NULL,
    amount_refunded_delta bigint NOT NULL,
    credits_revoked       bigint NOT NULL,
    created_at            timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT payment_refunds_delta_positive CHECK (amount_refunded_delta > 0)
);
CREATE INDEX payment_refunds_payment_idx ON payment_refunds (payment_id);

-- The customer's metered-plan subscriptions as customer.subscription.* tell them.
CREATE TABLE subscriptions (
    stripe_subscription_id text PRIMARY KEY,
    customer_id            text NOT NULL REFERENCES customers (id),
    status                 text NOT NULL,
    plan                   text,
    -- Stripe's event created time of the last applied event: an older event
    -- never overwrites a newer status.
    stripe_event_created   bigint NOT NULL DEFAULT 0,
    updated_at             timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX subscriptions_customer_idx ON subscriptions (customer_id);

-- Every Stripe event acknowledged, deduplicated by its id.
CREATE TABLE stripe_events (
    id              text PRIMARY KEY,
    type            text NOT NULL,
    api_version     text,
    livemode        boolean NOT NULL,
    -- The signed body exactly as received. Not jsonb: jsonb refuses the
    -- escape \u0000, which Stripe may send inside any string, and it would
    -- not keep the bytes the signature covered.
    payload         text NOT NULL,
    status          text NOT NULL DEFAULT 'received',
    attempts        integer NOT NULL DEFAULT 0,
    last_error      text,
    next_attempt_at timestamptz,
    received_at     timestamptz NOT NULL DEFAULT now(),
    processed_at    timestamptz,
    CONSTRAINT stripe_events_status_check CHECK (status IN ('received', 'processed', 'ignored', 'failed', 'parked'))
);
-- The retry worker's queue: only events still to be (re)processed.
CREATE INDEX stripe_events_due_idx ON stripe_events (next_attempt_at) WHERE status IN ('received', 'failed');
CREATE INDEX stripe_events_list_idx ON stripe_events (status, received_at DESC, id DESC);
CREATE INDEX stripe_events_received_idx ON stripe_events (received_at DESC, id DESC);

-- +goose Down
DROP TABLE stripe_events;
DROP TABLE subscriptions;
DROP TABLE payment_refunds;
DROP TABLE payment_confirmations;
DROP TABLE payment_transitions;
DROP TABLE payments;
