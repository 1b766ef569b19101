-- Checkout hardening (internal/payments, internal/db).

-- +goose Up

-- Credits of a pack expire after a number of calendar months by default
-- (12), which a duration in seconds cannot say. A payment stores one of the
-- two, or neither for credits that never expire.
ALTER TABLE payments
    ADD COLUMN credits_expire_after_months integer,
    ADD CONSTRAINT payments_credits_expiry_check CHECK (
        (credits_expire_after_months IS NULL OR credits_expire_after_months > 0)
        AND (credits_expire_after_seconds IS NULL OR credits_expire_after_seconds > 0)
        AND (credits_expire_after_months IS NULL OR credits_expire_after_seconds IS NULL));

-- A reservation of an idempotency key (a checkout waiting on Stripe) is
-- held by one request (holder) until lease_expires_at, which the holder
-- renews while it works; only then may another request take the key over.
-- Rows of one-transaction operations have neither.
ALTER TABLE idempotency_keys
    ADD COLUMN holder text,
    ADD COLUMN lease_expires_at timestamptz;

-- Each customer's checkout pacing for TALLY_CHECKOUT_RATE_LIMIT: the
-- generic cell rate algorithm's "theoretical arrival time". One row per
-- customer, shared by every replica (internal/payments/ratelimit.go).
CREATE TABLE checkout_rate_limits (
    customer_id text PRIMARY KEY,
    tat         timestamptz NOT NULL
);

-- +goose Down
DROP TABLE checkout_rate_limits;
ALTER TABLE idempotency_keys
    DROP COLUMN lease_expires_at,
    DROP COLUMN holder;
ALTER TABLE payments
    DROP CONSTRAINT payments_credits_expiry_check,
    DROP COLUMN credits_expire_after_months;
