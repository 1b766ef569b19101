-- Saved payment methods and automatic top-up (internal/payments/autotopup*.go).

-- +goose Up

-- How a payment is collected: a hosted Checkout (the buyer on the page), or
-- an off-session charge of the customer's saved card (auto_top_up).
ALTER TABLE payments ADD COLUMN IF NOT EXISTS method text NOT NULL DEFAULT 'checkout';
-- A credit pack checkout that asked to keep the card for later charges.
ALTER TABLE payments ADD COLUMN save_payment_method boolean NOT NULL DEFAULT false;
-- The backstop of "one automatic top-up in flight per customer": however
-- the trigger is reached, a second pending one is a unique violation.
CREATE UNIQUE INDEX payments_one_auto_top_up_pending ON payments (customer_id)
    WHERE method = 'auto_top_up' AND status = 'pending';
-- The worker's queue: automatic top-ups not yet charged.
CREATE INDEX payments_auto_top_up_due ON payments (created_at)
    WHERE method = 'auto_top_up' AND status = 'pending' AND payment_intent_id IS NULL;

-- The customer's default payment method, as Stripe confirmed it (a setup
-- Checkout, or a pack checkout that saved the card). Only what may be shown
-- is kept besides Stripe's ids: brand, last four digits, expiry.
CREATE TABLE customer_payment_methods (
    customer_id              text PRIMARY KEY REFERENCES customers (id),
    stripe_payment_method_id text NOT NULL,
    stripe_customer_id       text NOT NULL,
    brand                    text NOT NULL,
    last4                    text NOT NULL,
    exp_month                integer NOT NULL,
    exp_year                 integer NOT NULL,
    -- The created time of the Stripe event that saved it: an older event
    -- (a redelivery, a late one) never replaces a newer card.
    stripe_event_created     bigint NOT NULL DEFAULT 0,
    updated_at               timestamptz NOT NULL,
    CONSTRAINT customer_payment_methods_exp CHECK (exp_month BETWEEN 1 AND 12 AND exp_year BETWEEN 2000 AND 9999)
);

-- The setup-mode Checkout Sessions tally created: only those may save a
-- card to a customer (a session another integration created with copied
-- metadata may not).
CREATE TABLE payment_method_setups (
    checkout_session_id text PRIMARY KEY,
    customer_id         text NOT NULL REFERENCES customers (id),
    created_at          timestamptz NOT NULL,
    completed_at        timestamptz
);

-- One row per customer that configured automatic top-up.
CREATE TABLE auto_top_up_settings (
    customer_id          text PRIMARY KEY REFERENCES customers (id),
    enabled              boolean NOT NULL,
    threshold            bigint NOT NULL,
    item                 text NOT NULL,
    quantity             bigint NOT NULL DEFAULT 1,
    -- At most this many automatic top-ups start per calendar month (UTC);
    -- NULL: no limit.
    monthly_limit        integer,
    -- active, or disabled by tally after repeated failures (disabled_reason).
    status               text NOT NULL DEFAULT 'active',
    consecutive_failures integer NOT NULL DEFAULT 0,
    disabled_reason      text,
    -- The pending automatic top-up, NULL when none is in flight. The
    -- balance-lowering transaction that starts one sets it.
    in_flight_payment_id text,
    -- The month (its first day, UTC) month_count counts in.
    month_start          date,
    month_count          integer NOT NULL DEFAULT 0,
    updated_at           timestamptz NOT NULL,
    CONSTRAINT auto_top_up_settings_threshold CHECK (threshold >= 1),
    CONSTRAINT auto_top_up_settings_quantity CHECK (quantity >= 1),
    CONSTRAINT auto_top_up_settings_monthly_limit CHECK (monthly_limit IS NULL OR monthly_limit >= 1),
    CONSTRAINT auto_top_up_settings_status CHECK (status IN ('active', 'disabled')),
    CONSTRAINT auto_top_up_settings_counts CHECK (consecutive_failures >= 0 AND month_count >= 0)
);

-- +goose Down
DROP TABLE auto_top_up_settings;
DROP TABLE payment_method_setups;
DROP TABLE customer_payment_methods;
DROP INDEX payments_auto_top_up_due;
DROP INDEX payments_one_auto_top_up_pending;
ALTER TABLE payments DROP COLUMN save_payment_method;
-- payments.method may predate this migration (IF NOT EXISTS above): kept.
