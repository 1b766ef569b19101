-- What is available (balance - held - pending) is what low-balance
-- thresholds and the automatic top-up compare (internal/credits/account.go).
-- The balance row's lock statement reads pending, the credits of grants not
-- effective yet, with a subquery; this partial index keeps it to the few
-- scheduled grants of the customer instead of all of its grants.

-- +goose Up
CREATE INDEX credit_grants_scheduled ON credit_grants (customer_id, effective_at)
    WHERE effective_at IS NOT NULL AND remaining > 0;

-- +goose Down
DROP INDEX credit_grants_scheduled;
