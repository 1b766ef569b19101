-- How a payment was made and confirmed, and a confirmation guard keyed by
-- an invoice as well as by a PaymentIntent (internal/payments/confirm.go).

-- +goose Up
ALTER TABLE payments
    -- checkout: a hosted Checkout Session; invoice: a Stripe invoice sent
    -- for payment on terms; auto_top_up: charged off-session by tally.
    ADD COLUMN method text NOT NULL DEFAULT 'checkout',
    -- What confirmed it: the PaymentIntent's success, the Checkout
    -- Session's completion, the invoice's payment, or a sync that found
    -- Stripe's word without a webhook.
    ADD COLUMN confirmed_by text,
    -- The confirmation strategy a Checkout payment was created under
    -- (the item's confirm_on, or TALLY_CONFIRM_ON then). NULL for payments
    -- created before it was recorded: they follow TALLY_CONFIRM_ON.
    ADD COLUMN confirm_on text,
    -- The payment's Stripe invoice as invoice.finalized and invoice.paid
    -- last told it (invoice_id already exists).
    ADD COLUMN invoice_number text,
    ADD COLUMN invoice_status text,
    ADD COLUMN invoice_hosted_url text,
    ADD COLUMN invoice_pdf text,
    -- A pay-by-invoice purchase order number, as sent on the invoice.
    ADD COLUMN purchase_order text,
    ADD CONSTRAINT payments_method_check CHECK (method IN ('checkout', 'invoice', 'auto_top_up')),
    ADD CONSTRAINT payments_confirmed_by_check
        CHECK (confirmed_by IS NULL OR confirmed_by IN ('payment_intent', 'checkout_session', 'invoice', 'sync')),
    ADD CONSTRAINT payments_confirm_on_check CHECK (confirm_on IS NULL OR confirm_on IN ('payment_intent', 'checkout_session')),
    ADD CONSTRAINT payments_invoice_id_key UNIQUE (invoice_id);

-- Pending payments, oldest first, for the sync that looks them up at
-- Stripe and for the pending-age gauge.
CREATE INDEX payments_pending_idx ON payments (created_at) WHERE status = 'pending';

-- The money guard, generalized: one row per confirmed payment (the unique
-- payment_id, unchanged), keyed by the PaymentIntent (Checkout) or by the
-- invoice (pay by invoice), never both, each key confirming one payment.
ALTER TABLE payment_confirmations DROP CONSTRAINT payment_confirmations_pkey;
ALTER TABLE payment_confirmations
    ALTER COLUMN payment_intent_id DROP NOT NULL,
    ADD COLUMN invoice_id text,
    ADD CONSTRAINT payment_confirmations_payment_intent_id_key UNIQUE (payment_intent_id),
    ADD CONSTRAINT payment_confirmations_invoice_id_key UNIQUE (invoice_id),
    ADD CONSTRAINT payment_confirmations_one_key CHECK (num_nonnulls(payment_intent_id, invoice_id) = 1);

-- Where a transition came from: the API (a checkout's creation), a
-- webhook, a sync with Stripe, an operator. NULL in rows written before.
ALTER TABLE payment_transitions
    ADD COLUMN source text,
    ADD CONSTRAINT payment_transitions_source_check CHECK (source IS NULL OR source IN ('api', 'webhook', 'sync', 'operator'));

-- +goose Down
ALTER TABLE payment_transitions DROP CONSTRAINT payment_transitions_source_check, DROP COLUMN source;
DELETE FROM payment_confirmations WHERE payment_intent_id IS NULL;
ALTER TABLE payment_confirmations
    DROP CONSTRAINT payment_confirmations_one_key,
    DROP CONSTRAINT payment_confirmations_invoice_id_key,
    DROP CONSTRAINT payment_confirmations_payment_intent_id_key,
    DROP COLUMN invoice_id,
    ALTER COLUMN payment_intent_id SET NOT NULL,
    ADD PRIMARY KEY (payment_intent_id);
DROP INDEX payments_pending_idx;
ALTER TABLE payments
    DROP CONSTRAINT payments_invoice_id_key,
    DROP CONSTRAINT payments_confirm_on_check,
    DROP CONSTRAINT payments_confirmed_by_check,
    DROP CONSTRAINT payments_method_check,
    DROP COLUMN purchase_order,
    DROP COLUMN invoice_pdf,
    DROP COLUMN invoice_hosted_url,
    DROP COLUMN invoice_status,
    DROP COLUMN invoice_number,
    DROP COLUMN confirm_on,
    DROP COLUMN confirmed_by,
    DROP COLUMN method;
