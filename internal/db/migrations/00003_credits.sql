-- Credits: the prepaid wallet (see internal/credits).
--
-- credit_grants holds what each grant has left; credit_ledger is the
-- append-only history; credit_balances is one row per customer whose lock
-- serializes every change to that customer's credits, so the no-overdraft
-- check and the ledger's balance_after chain are exact.

-- +goose Up
CREATE TABLE credit_balances (
    customer_id          text        PRIMARY KEY REFERENCES customers (id),
    -- The ledger sum: unspent credits of every grant, including the remainder
    -- of grants that expired but were not swept yet (see next_expiry).
    balance              bigint      NOT NULL DEFAULT 0,
    -- A lower bound of the soonest expiry among grants with credits left
    -- (NULL: none expire). While it lies in the future the whole balance is
    -- spendable; once it passes, the next change first expires what is due.
    next_expiry          timestamptz,
    low_balance_notified boolean     NOT NULL DEFAULT false,
    -- The configured default low-balance threshold as last seen by a tally
    -- instance, for changes made inside other packages' transactions
    -- (a refund's revoke), which have no configuration at hand.
    default_low_balance_threshold bigint NOT NULL DEFAULT 0,
    updated_at           timestamptz NOT NULL,
    CONSTRAINT credit_balances_balance_nonnegative CHECK (balance >= 0)
);

CREATE TABLE credit_grants (
    id                   text        PRIMARY KEY,
    customer_id          text        NOT NULL REFERENCES customers (id),
    amount               bigint      NOT NULL,
    remaining            bigint      NOT NULL,
    -- Credits taken back by refunds so far (RevokeForPayment is cumulative).
    revoked              bigint      NOT NULL DEFAULT 0,
    source               text        NOT NULL,
    payment_id           text,
    reason               text        NOT NULL,
    metadata             jsonb       NOT NULL DEFAULT '{}',
    expires_at           timestamptz,
    expiring_notified_at timestamptz,
    expired_at           timestamptz,
    created_at           timestamptz NOT NULL,
    CONSTRAINT credit_grants_amount_positive CHECK (amount > 0),
    CONSTRAINT credit_grants_remaining_range CHECK (remaining >= 0 AND remaining <= amount),
    CONSTRAINT credit_grants_revoked_range CHECK (revoked >= 0 AND revoked <= amount),
    CONSTRAINT credit_grants_source CHECK (source IN ('purchase', 'service')),
    -- A purchase grant names the payment that bought it; a service grant none.
    CONSTRAINT credit_grants_purchase_payment CHECK ((source = 'purchase') = (payment_id IS NOT NULL)),
    -- Each payment credits at most once: the backstop behind payments' own
    -- idempotency table.
    CONSTRAINT credit_grants_payment_id_key UNIQUE (payment_id)
);

-- Consume's draw order among a customer's grants with credits left.
CREATE INDEX credit_grants_draw_order ON credit_grants (customer_id, expires_at, created_at, id)
    WHERE remaining > 0;
-- The sweeper's scans: grants with credits left that expire.
CREATE INDEX credit_grants_expiring ON credit_grants (expires_at)
    WHERE remaining > 0 AND expires_at IS NOT NULL;

CREATE TABLE credit_ledger (
    -- seq orders a customer's entries; entries are written under the balance
    -- row's lock, so seq order is commit order per customer.
    seq             bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id              text        NOT NULL,
    customer_id     text        NOT NULL REFERENCES customers (id),
    kind            text        NOT NULL,
    amount          bigint      NOT NULL,
    balance_after   bigint      NOT NULL,
    reason          text        NOT NULL,
    metadata        jsonb       NOT NULL DEFAULT '{}',
    grant_id        text        REFERENCES credit_grants (id),
    payment_id      text,
    -- For consume entries: [{grant_id, amount}] in draw order.
    draws           jsonb,
    -- The Idempotency-Key of the request that wrote the entry, for verify.
    idempotency_key text,
    created_at      timestamptz NOT NULL,
    CONSTRAINT credit_ledger_id_key UNIQUE (id),
    CONSTRAINT credit_ledger_kind CHECK (kind IN ('grant', 'consume', 'expire', 'revoke', 'adjust')),
    CONSTRAINT credit_ledger_amount_nonzero CHECK (amount <> 0),
    CONSTRAINT credit_ledger_balance_after_nonnegative CHECK (balance_after >= 0)
);

CREATE INDEX credit_ledger_customer_seq ON credit_ledger (customer_id, seq);
CREATE INDEX credit_ledger_idempotency_key ON credit_ledger (customer_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

-- The ledger is history: rows are appended, never changed or removed.
-- +goose StatementBegin
CREATE FUNCTION credit_ledger_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'credit_ledger is append-only (% refused)', TG_OP
        USING ERRCODE = 'integrity_constraint_violation';
END;
$$;
-- +goose StatementEnd
CREATE TRIGGER credit_ledger_append_only BEFORE UPDATE OR DELETE ON credit_ledger
    FOR EACH ROW EXECUTE FUNCTION credit_ledger_append_only();

-- +goose Down
DROP TABLE credit_ledger;
DROP FUNCTION credit_ledger_append_only();
DROP TABLE credit_grants;
DROP TABLE credit_balances;
