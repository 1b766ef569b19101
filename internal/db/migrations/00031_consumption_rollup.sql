-- The daily consumption rollup the forecast learns from, and the state of
-- the depletion warning (internal/credits/forecast.go).

-- +goose Up
-- What each customer consumed per UTC day: consume adds to it in the
-- statement that spends (one upsert, no round trip of its own), so a
-- forecast reads at most a few hundred rows rather than the ledger.
CREATE TABLE credit_consumption_daily (
    customer_id text   NOT NULL REFERENCES customers (id),
    day         date   NOT NULL,
    consumed    bigint NOT NULL,
    CONSTRAINT credit_consumption_daily_pkey PRIMARY KEY (customer_id, day),
    CONSTRAINT credit_consumption_daily_consumed_nonnegative CHECK (consumed >= 0)
);
-- The consumes recorded before the rollup existed.
INSERT INTO credit_consumption_daily (customer_id, day, consumed)
SELECT customer_id, (created_at AT TIME ZONE 'UTC')::date, -sum(amount)
FROM credit_ledger WHERE kind = 'consume'
GROUP BY 1, 2;

-- Whether credits.depletion_forecast was sent for the customer's current
-- fall under TALLY_FORECAST_WARN_DAYS (re-armed once the runway is back
-- above), and when the forecast watcher last looked.
CREATE TABLE credit_forecast_state (
    customer_id text PRIMARY KEY REFERENCES customers (id),
    warned      boolean NOT NULL DEFAULT false,
    checked_at  timestamptz NOT NULL
);

-- +goose Down
DROP TABLE credit_forecast_state;
DROP TABLE credit_consumption_daily;
