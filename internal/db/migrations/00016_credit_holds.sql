-- Credit holds (internal/credits: holds.go): a long job reserves credits,
-- then captures what it really cost and releases the rest.
--
-- A hold takes its credits from grants at once, in draw order, and keeps
-- them: credit_grants.held is the part of a grant's remaining credits that
-- active holds keep, so remaining - held is what a consume, another hold, a
-- void or an expiry may take. The balance (the ledger sum) does not change
-- when credits are held or released: the customer still owns them. Only a
-- capture spends, with a consume ledger entry that names the hold.

-- +goose Up
ALTER TABLE credit_grants ADD COLUMN held bigint NOT NULL DEFAULT 0;
ALTER TABLE credit_grants ADD CONSTRAINT credit_grants_held_range CHECK (held >= 0 AND held <= remaining);

-- held is the sum of the customer's active holds; next_hold_expiry a lower
-- bound of their soonest expires_at (NULL: no active hold), read under the
-- balance row's lock so that the next write to the customer releases an
-- overdue hold without an extra query while none is due.
ALTER TABLE credit_balances ADD COLUMN held bigint NOT NULL DEFAULT 0;
ALTER TABLE credit_balances ADD COLUMN next_hold_expiry timestamptz;
ALTER TABLE credit_balances ADD CONSTRAINT credit_balances_held_range CHECK (held >= 0 AND held <= balance);

CREATE TABLE credit_holds (
    id              text        PRIMARY KEY,
    customer_id     text        NOT NULL REFERENCES customers (id),
    amount          bigint      NOT NULL,
    status          text        NOT NULL,
    reason          text        NOT NULL,
    metadata        jsonb       NOT NULL DEFAULT '{}',
    -- [{grant_id, amount}] in draw order: what the hold keeps of each grant.
    draws           jsonb       NOT NULL,
    captured        bigint      NOT NULL DEFAULT 0,
    released        bigint      NOT NULL DEFAULT 0,
    -- The consume entry of a capture of at least one credit.
    transaction_id  text        UNIQUE,
    idempotency_key text,
    expires_at      timestamptz NOT NULL,
    created_at      timestamptz NOT NULL,
    -- When the hold stopped being active (captured, released or expired).
    ended_at        timestamptz,
    CONSTRAINT credit_holds_amount_positive CHECK (amount > 0),
    CONSTRAINT credit_holds_status CHECK (status IN ('active', 'captured', 'released', 'expired')),
    -- An active hold has neither captured nor released anything; an ended
    -- one accounts for every credit it held, once.
    CONSTRAINT credit_holds_settled CHECK (
        (status = 'active' AND captured = 0 AND released = 0 AND ended_at IS NULL)
        OR (status <> 'active' AND captured >= 0 AND released >= 0 AND captured + released = amount AND ended_at IS NOT NULL)),
    CONSTRAINT credit_holds_captured_only_by_capture CHECK (status = 'captured' OR captured = 0),
    CONSTRAINT credit_holds_expires_after_creation CHECK (expires_at > created_at)
);
CREATE INDEX credit_holds_customer ON credit_holds (customer_id, created_at DESC, id DESC);
-- The sweeper's scan for overdue holds, and each customer's next_hold_expiry.
CREATE INDEX credit_holds_active_expiry ON credit_holds (expires_at) WHERE status = 'active';
CREATE INDEX credit_holds_active_customer ON credit_holds (customer_id, expires_at) WHERE status = 'active';

ALTER TABLE credit_ledger ADD COLUMN hold_id text REFERENCES credit_holds (id);
ALTER TABLE credit_ledger ADD CONSTRAINT credit_ledger_hold_consume CHECK (hold_id IS NULL OR kind = 'consume');
CREATE INDEX credit_ledger_hold ON credit_ledger (hold_id) WHERE hold_id IS NOT NULL;

-- +goose Down
DROP INDEX credit_ledger_hold;
ALTER TABLE credit_ledger DROP CONSTRAINT credit_ledger_hold_consume;
ALTER TABLE credit_ledger DROP COLUMN hold_id;
DROP TABLE credit_holds;
ALTER TABLE credit_balances DROP CONSTRAINT credit_balances_held_range;
ALTER TABLE credit_balances DROP COLUMN next_hold_expiry;
ALTER TABLE credit_balances DROP COLUMN held;
ALTER TABLE credit_grants DROP CONSTRAINT credit_grants_held_range;
ALTER TABLE credit_grants DROP COLUMN held;
