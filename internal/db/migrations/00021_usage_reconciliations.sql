-- Stored reconciliation runs (internal/metering): the scheduled ones, every
-- TALLY_RECONCILE_INTERVAL per meter over the last settled window, and the
-- ones an operator asks for. Totals are numeric: a sum of bigint values can
-- pass the bigint range.

-- +goose Up
CREATE TABLE usage_reconciliations (
    id          text        PRIMARY KEY,
    meter       text        NOT NULL,
    from_t      timestamptz NOT NULL,
    to_t        timestamptz NOT NULL,
    -- scheduled (the background run), manual (POST with a window) or
    -- period (one customer's billing period).
    kind        text        NOT NULL,
    customer_id text,
    checked     integer     NOT NULL,
    -- [{customer_id, local_total, stripe_total, difference}], totals as
    -- JSON strings of whole numbers.
    mismatches  jsonb       NOT NULL,
    -- The summed absolute difference of the mismatches.
    drift       numeric     NOT NULL,
    created_at  timestamptz NOT NULL,
    CONSTRAINT usage_reconciliations_kind_known CHECK (kind IN ('scheduled', 'manual', 'period')),
    CONSTRAINT usage_reconciliations_window CHECK (from_t < to_t),
    CONSTRAINT usage_reconciliations_drift_nonnegative CHECK (drift >= 0)
);
CREATE INDEX usage_reconciliations_meter_created ON usage_reconciliations (meter, created_at DESC, id DESC);
CREATE INDEX usage_reconciliations_created ON usage_reconciliations (created_at DESC, id DESC);
-- One scheduled run per meter and window, whichever replica gets there.
CREATE UNIQUE INDEX usage_reconciliations_scheduled_window ON usage_reconciliations (meter, from_t) WHERE kind = 'scheduled';

-- +goose Down
DROP TABLE usage_reconciliations;
