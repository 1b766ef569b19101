-- What a payment's Checkout Session charged, as Stripe reports it, so a
-- confirmation can compare the catalog price with the session's amount
-- before tax (in the catalog currency) and the PaymentIntent with the
-- session's total (internal/payments/confirm.go).

-- +goose Up
ALTER TABLE payments
    -- The session's currency and amounts: what the buyer was charged in,
    -- before discounts and taxes, after them, and the tax Stripe Tax added.
    ADD COLUMN checkout_currency               text,
    ADD COLUMN checkout_amount_subtotal        bigint,
    ADD COLUMN checkout_amount_total           bigint,
    ADD COLUMN checkout_amount_tax             bigint,
    -- Adaptive Pricing (sessions created before 2025-03-31): the currency
    -- the session was created in and its amount before tax in it.
    ADD COLUMN checkout_source_currency        text,
    ADD COLUMN checkout_source_amount_subtotal bigint,
    -- The currency of amount_received: the session's, which differs from
    -- the catalog's currency when Stripe converted the price.
    ADD COLUMN received_currency               text,
    ADD CONSTRAINT payments_checkout_totals_check CHECK (
        (checkout_currency IS NULL) = (checkout_amount_subtotal IS NULL)
        AND (checkout_currency IS NULL) = (checkout_amount_total IS NULL)
        AND (checkout_source_currency IS NULL) = (checkout_source_amount_subtotal IS NULL)
        AND (checkout_amount_subtotal IS NULL OR checkout_amount_subtotal >= 0)
        AND (checkout_amount_total IS NULL OR checkout_amount_total >= 0)
        AND (checkout_amount_tax IS NULL OR checkout_amount_tax >= 0));

-- +goose Down
ALTER TABLE payments
    DROP CONSTRAINT payments_checkout_totals_check,
    DROP COLUMN received_currency,
    DROP COLUMN checkout_source_amount_subtotal,
    DROP COLUMN checkout_source_currency,
    DROP COLUMN checkout_amount_tax,
    DROP COLUMN checkout_amount_total,
    DROP COLUMN checkout_amount_subtotal,
    DROP COLUMN checkout_currency;
