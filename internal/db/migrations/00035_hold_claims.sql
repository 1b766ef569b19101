-- +goose Up
-- A refund or dispute cannot take credits that active holds keep (a capture
-- may still spend them), so it records them short. It does not forget
-- them: the shortfall claims them from the holds open at that moment, and
-- each hold pays its claims with what it gives back when it ends
-- (released, expired, or the part a capture leaves). Credits granted after
-- the revoke never pay it: only holds open at the revoke carry claims.

-- recovered is what holds paid of the shortfall; it is settled when that
-- reaches amount (or when a won dispute settles it).
ALTER TABLE credit_shortfalls ADD COLUMN recovered bigint NOT NULL DEFAULT 0;
ALTER TABLE credit_shortfalls ADD CONSTRAINT credit_shortfalls_recovered CHECK (recovered >= 0 AND recovered <= amount);

-- claimed is the sum of the hold's open claims, read with the hold's row so
-- that ending a hold without claims costs no query.
ALTER TABLE credit_holds ADD COLUMN claimed bigint NOT NULL DEFAULT 0;
ALTER TABLE credit_holds ADD CONSTRAINT credit_holds_claimed CHECK (claimed >= 0 AND claimed <= amount);

CREATE TABLE credit_hold_claims (
    hold_id           text        NOT NULL REFERENCES credit_holds (id),
    -- The revoke entry whose shortfall this claims part of.
    ledger_entry_id   text        NOT NULL REFERENCES credit_shortfalls (ledger_entry_id),
    customer_id       text        NOT NULL REFERENCES customers (id),
    amount            bigint      NOT NULL,
    created_at        timestamptz NOT NULL,
    -- Set when the claim ends: the hold ended (recovered is what it paid,
    -- recovery_entry_id the revoke entry that took it, when it paid any)
    -- or the shortfall was settled otherwise (recovered 0).
    ended_at          timestamptz,
    recovered         bigint,
    recovery_entry_id text        REFERENCES credit_ledger (id),
    PRIMARY KEY (hold_id, ledger_entry_id),
    CONSTRAINT credit_hold_claims_amount_positive CHECK (amount > 0),
    CONSTRAINT credit_hold_claims_ended CHECK (
        (ended_at IS NULL AND recovered IS NULL AND recovery_entry_id IS NULL)
        OR (ended_at IS NOT NULL AND recovered >= 0 AND recovered <= amount AND (recovered = 0) = (recovery_entry_id IS NULL)))
);
CREATE INDEX credit_hold_claims_entry ON credit_hold_claims (ledger_entry_id);

-- +goose Down
DROP TABLE credit_hold_claims;
ALTER TABLE credit_holds DROP COLUMN claimed;
ALTER TABLE credit_shortfalls DROP COLUMN recovered;
