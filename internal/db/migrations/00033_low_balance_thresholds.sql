-- Several low-balance thresholds per customer (internal/credits): each
-- fires credits.low_balance once when the available balance falls below it
-- and re-arms when the balance is back at or above it.

-- +goose Up
ALTER TABLE customers ADD COLUMN low_balance_thresholds bigint[],
    ADD CONSTRAINT customers_low_balance_thresholds_range CHECK (
        cardinality(low_balance_thresholds) <= 10 AND 0 < ALL (low_balance_thresholds));

-- +goose Down
ALTER TABLE customers DROP CONSTRAINT customers_low_balance_thresholds_range, DROP COLUMN low_balance_thresholds;
