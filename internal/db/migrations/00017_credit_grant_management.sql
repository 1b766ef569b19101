-- Grants an operator can manage (internal/credits): a draw order the
-- caller chooses (priority, then soonest expiry, then oldest), a category,
-- grants scheduled for later (effective_at), voids, and adjustments.

-- +goose Up
ALTER TABLE credit_grants ADD COLUMN priority smallint NOT NULL DEFAULT 50;
ALTER TABLE credit_grants ADD CONSTRAINT credit_grants_priority_range CHECK (priority BETWEEN 0 AND 100);
ALTER TABLE credit_grants ADD COLUMN category text NOT NULL DEFAULT 'promotional';
UPDATE credit_grants SET category = 'paid' WHERE source IN ('purchase', 'dispute_won');
ALTER TABLE credit_grants ADD CONSTRAINT credit_grants_category CHECK (category IN ('paid', 'promotional'));
-- NULL: spendable from creation. A later time: owned (in the balance and
-- the ledger) but not spendable before it.
ALTER TABLE credit_grants ADD COLUMN effective_at timestamptz;
ALTER TABLE credit_grants ADD CONSTRAINT credit_grants_effective_before_expiry
    CHECK (effective_at IS NULL OR expires_at IS NULL OR effective_at < expires_at);
-- A voided grant is dead: what it had left and was not held went with a
-- void entry, and what holds kept of it goes the same way when released.
ALTER TABLE credit_grants ADD COLUMN voided bigint NOT NULL DEFAULT 0;
ALTER TABLE credit_grants ADD COLUMN voided_at timestamptz;
ALTER TABLE credit_grants ADD CONSTRAINT credit_grants_voided_range
    CHECK (voided >= 0 AND voided <= amount AND (voided = 0 OR voided_at IS NOT NULL));

-- The draw order, everywhere: priority, soonest expiry (never last), oldest.
DROP INDEX credit_grants_draw_order;
CREATE INDEX credit_grants_draw_order ON credit_grants (customer_id, priority, expires_at, created_at, id)
    WHERE remaining > 0;

ALTER TABLE credit_ledger DROP CONSTRAINT credit_ledger_kind;
ALTER TABLE credit_ledger ADD CONSTRAINT credit_ledger_kind
    CHECK (kind IN ('grant', 'consume', 'expire', 'revoke', 'adjust', 'void'));
-- Balance at a past time: the customer's last entry at or before it.
CREATE INDEX credit_ledger_customer_time ON credit_ledger (customer_id, created_at, seq);

-- +goose Down
DROP INDEX credit_ledger_customer_time;
ALTER TABLE credit_ledger DROP CONSTRAINT credit_ledger_kind;
ALTER TABLE credit_ledger ADD CONSTRAINT credit_ledger_kind CHECK (kind IN ('grant', 'consume', 'expire', 'revoke', 'adjust'));
DROP INDEX credit_grants_draw_order;
CREATE INDEX credit_grants_draw_order ON credit_grants (customer_id, expires_at, created_at, id) WHERE remaining > 0;
ALTER TABLE credit_grants DROP CONSTRAINT credit_grants_voided_range;
ALTER TABLE credit_grants DROP COLUMN voided_at;
ALTER TABLE credit_grants DROP COLUMN voided;
ALTER TABLE credit_grants DROP CONSTRAINT credit_grants_effective_before_expiry;
ALTER TABLE credit_grants DROP COLUMN effective_at;
ALTER TABLE credit_grants DROP CONSTRAINT credit_grants_category;
ALTER TABLE credit_grants DROP COLUMN category;
ALTER TABLE credit_grants DROP CONSTRAINT credit_grants_priority_range;
ALTER TABLE credit_grants DROP COLUMN priority;
