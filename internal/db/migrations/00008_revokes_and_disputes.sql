-- Refunds and disputes take credits back from the customer's whole balance
-- (internal/credits: Revoke), and what the balance cannot cover is recorded
-- as a shortfall: a receivable, listed by `tally verify`.

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

-- +goose Down
ALTER TABLE payment_refunds DROP COLUMN credits_shortfall;
ALTER TABLE payments DROP CONSTRAINT payments_credits_revoked_check;
ALTER TABLE payments DROP COLUMN credits_revoked;
DROP TABLE credit_shortfalls;
ALTER TABLE credit_ledger DROP CONSTRAINT credit_ledger_shortfall_check;
ALTER TABLE credit_ledger DROP CONSTRAINT credit_ledger_amount_nonzero;
ALTER TABLE credit_ledger ADD CONSTRAINT credit_ledger_amount_nonzero CHECK (amount <> 0);
ALTER TABLE credit_ledger DROP COLUMN shortfall;
