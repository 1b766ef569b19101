-- Billing details of customers, for invoices and the Stripe Customer
-- (internal/customers).

-- +goose Up
ALTER TABLE customers
    -- {name, email, address: {...}, tax_id: {type, value}}, all optional;
    -- NULL when never given.
    ADD COLUMN billing jsonb,
    -- Every Checkout of the customer asks Stripe for an invoice.
    ADD COLUMN invoice_always boolean NOT NULL DEFAULT false;

-- +goose Down
ALTER TABLE customers DROP COLUMN invoice_always, DROP COLUMN billing;
