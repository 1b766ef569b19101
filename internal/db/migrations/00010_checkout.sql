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

-- +goose Down
ALTER TABLE payments
    DROP CONSTRAINT payments_credits_expiry_check,
    DROP COLUMN credits_expire_after_months;
