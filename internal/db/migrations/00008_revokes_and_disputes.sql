-- Refunds and disputes take credits back from the customer's whole balance
-- (internal/credits: Revoke), and what the balance cannot cover is recorded
-- as a shortfall: a receivable, listed by `tally verify`. Disputes
-- (chargebacks) move payments through two new states and, when won, give
-- the credits back as dispute_won grants (internal/payments: disputes.go).

-- +goose Up

-- A revoke entry names the grants it drew from (draws, as a consume does)
-- and the credits it could not recover (shortfall). A revoke that found
-- nothing left to take still records its shortfall, so its amount may be 0.
ALTER TABLE credit_ledger ADD COLUMN shortfall bigint;
ALTER TABLE credit_ledger DROP CONSTRAINT credit_ledger_amount_nonzero;
ALTER TABLE credit_ledger ADD CONSTRAINT credit_ledger_amount_nonzero
    CHECK (amount <> 0 OR (kind = 'revoke' AND shortfall > 0));
ALTER TABLE credit_ledger ADD CONSTRAINT credit_ledger_shortfall_check
    CHECK (shortfall IS NULL OR (kind = 'revoke' AND shortfall > 0));

-- Open shortfalls are receivables: credits a customer was refunded (or
-- charged back) for but had already spent. One row per revoke entry with a
-- shortfall; the ledger keeps the history, this table whether it is still
-- open. Later grants and purchases never pay a shortfall off by themselves.
CREATE TABLE credit_shortfalls (
    ledger_entry_id text        PRIMARY KEY REFERENCES credit_ledger (id),
    customer_id     text        NOT NULL REFERENCES customers (id),
    payment_id      text,
    amount          bigint      NOT NULL,
    created_at      timestamptz NOT NULL,
    settled_at      timestamptz,
    settled_reason  text,
    CONSTRAINT credit_shortfalls_amount_positive CHECK (amount > 0),
    CONSTRAINT credit_shortfalls_settled_reason CHECK ((settled_at IS NULL) = (settled_reason IS NULL))
);
CREATE INDEX credit_shortfalls_open ON credit_shortfalls (customer_id) WHERE settled_at IS NULL;

-- credit_grants.revoked now counts what revokes took from each grant, any
-- grant; the share of a payment's credits already taken back (or recorded
-- short) is the payment's own: credits_revoked.
ALTER TABLE payments ADD COLUMN credits_revoked bigint NOT NULL DEFAULT 0;
UPDATE payments p SET credits_revoked = g.revoked
    FROM credit_grants g WHERE g.payment_id = p.id AND g.source = 'purchase';
ALTER TABLE payments ADD CONSTRAINT payments_credits_revoked_check
    CHECK (credits_revoked >= 0 AND credits_revoked <= credits);
ALTER TABLE payment_refunds ADD COLUMN credits_shortfall bigint NOT NULL DEFAULT 0;

-- A won dispute returns what it took as new grants that name the payment
-- (a payment still has at most one purchase grant).
ALTER TABLE credit_grants DROP CONSTRAINT credit_grants_source;
ALTER TABLE credit_grants ADD CONSTRAINT credit_grants_source CHECK (source IN ('purchase', 'service', 'dispute_won'));
ALTER TABLE credit_grants DROP CONSTRAINT credit_grants_purchase_payment;
ALTER TABLE credit_grants ADD CONSTRAINT credit_grants_purchase_payment
    CHECK ((source IN ('purchase', 'dispute_won')) = (payment_id IS NOT NULL));
ALTER TABLE credit_grants DROP CONSTRAINT credit_grants_payment_id_key;
CREATE UNIQUE INDEX credit_grants_payment_id_key ON credit_grants (payment_id) WHERE source = 'purchase';
CREATE INDEX credit_grants_payment_idx ON credit_grants (payment_id) WHERE payment_id IS NOT NULL;

-- disputed: a chargeback withdrew the funds; dispute_lost: it was decided
-- for the cardholder. amount_disputed is what open or lost disputes
-- withdrew; status_before_dispute what a won dispute returns the payment to.
ALTER TABLE payments DROP CONSTRAINT payments_status_check;
ALTER TABLE payments ADD CONSTRAINT payments_status_check
    CHECK (status IN ('pending', 'succeeded', 'failed', 'refunded', 'disputed', 'dispute_lost'));
ALTER TABLE payments ADD COLUMN amount_disputed bigint NOT NULL DEFAULT 0;
ALTER TABLE payments ADD CONSTRAINT payments_amount_disputed_check CHECK (amount_disputed >= 0);
ALTER TABLE payments ADD COLUMN status_before_dispute text;
ALTER TABLE payments ADD CONSTRAINT payments_status_before_dispute_check
    CHECK (status_before_dispute IS NULL OR status_before_dispute IN ('succeeded', 'refunded'));

-- Every Stripe dispute on a tally payment, in the furthest stage seen:
-- events may come in any order, and a stage already reached is history.
CREATE TABLE payment_disputes (
    stripe_dispute_id     text PRIMARY KEY,
    payment_id            text NOT NULL REFERENCES payments (id),
    charge_id             text,
    amount                bigint NOT NULL,
    currency              text NOT NULL,
    reason                text,
    status                text NOT NULL,
    -- When the withdrawal of the funds was applied (credits taken back):
    -- NULL for inquiries, and for a dispute first seen already won.
    withdrawn_at          timestamptz,
    closed_at             timestamptz,
    credits_revoked       bigint NOT NULL DEFAULT 0,
    credits_shortfall     bigint NOT NULL DEFAULT 0,
    revoke_transaction_id text REFERENCES credit_ledger (id),
    -- A won dispute's return: credits granted back, and credits not given
    -- back because the grant they came from expired meanwhile.
    credits_restored      bigint NOT NULL DEFAULT 0,
    credits_expired       bigint NOT NULL DEFAULT 0,
    created_at            timestamptz NOT NULL,
    updated_at            timestamptz NOT NULL,
    CONSTRAINT payment_disputes_status_check CHECK (status IN ('warning_needs_response', 'warning_under_review',
        'warning_closed', 'prevented', 'needs_response', 'under_review', 'won', 'lost')),
    CONSTRAINT payment_disputes_amount_check CHECK (amount > 0),
    CONSTRAINT payment_disputes_credits_check CHECK (credits_revoked >= 0 AND credits_shortfall >= 0
        AND credits_restored >= 0 AND credits_expired >= 0 AND credits_restored + credits_expired <= credits_revoked),
    CONSTRAINT payment_disputes_revoke_key UNIQUE (revoke_transaction_id)
);
CREATE INDEX payment_disputes_payment_idx ON payment_disputes (payment_id);

-- +goose Down
DROP TABLE payment_disputes;
ALTER TABLE payments DROP CONSTRAINT payments_status_before_dispute_check;
ALTER TABLE payments DROP COLUMN status_before_dispute;
ALTER TABLE payments DROP CONSTRAINT payments_amount_disputed_check;
ALTER TABLE payments DROP COLUMN amount_disputed;
ALTER TABLE payments DROP CONSTRAINT payments_status_check;
ALTER TABLE payments ADD CONSTRAINT payments_status_check CHECK (status IN ('pending', 'succeeded', 'failed', 'refunded'));
DROP INDEX credit_grants_payment_idx;
DROP INDEX credit_grants_payment_id_key;
ALTER TABLE credit_grants ADD CONSTRAINT credit_grants_payment_id_key UNIQUE (payment_id);
ALTER TABLE credit_grants DROP CONSTRAINT credit_grants_purchase_payment;
ALTER TABLE credit_grants ADD CONSTRAINT credit_grants_purchase_payment CHECK ((source = 'purchase') = (payment_id IS NOT NULL));
ALTER TABLE credit_grants DROP CONSTRAINT credit_grants_source;
ALTER TABLE credit_grants ADD CONSTRAINT credit_grants_source CHECK (source IN ('purchase', 'service'));
ALTER TABLE payment_refunds DROP COLUMN credits_shortfall;
ALTER TABLE payments DROP CONSTRAINT payments_credits_revoked_check;
ALTER TABLE payments DROP COLUMN credits_revoked;
DROP TABLE credit_shortfalls;
ALTER TABLE credit_ledger DROP CONSTRAINT credit_ledger_shortfall_check;
ALTER TABLE credit_ledger DROP CONSTRAINT credit_ledger_amount_nonzero;
ALTER TABLE credit_ledger ADD CONSTRAINT credit_ledger_amount_nonzero CHECK (amount <> 0);
ALTER TABLE credit_ledger DROP COLUMN shortfall;
