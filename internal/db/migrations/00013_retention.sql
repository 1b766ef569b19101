-- Retention (internal/app's janitor) and the indexes it and usage delivery
-- need. Indexes on existing tables are built CONCURRENTLY, so that a large
-- usage_events or events table keeps taking writes while they build; that
-- cannot run inside a transaction. Every statement is safe to run again.
-- Should a build be interrupted, PostgreSQL keeps an invalid index of that
-- name, which IF NOT EXISTS then skips: drop it (DROP INDEX CONCURRENTLY)
-- and migrate again.

-- +goose NO TRANSACTION

-- +goose Up
-- The undelivered events by timestamp: the worker dead-letters those whose
-- timestamp left Stripe's window (too_old), and the gauge reports the age
-- of the oldest one waiting for a Stripe customer.
CREATE INDEX CONCURRENTLY IF NOT EXISTS usage_events_undelivered_time ON usage_events (status, occurred_at)
    WHERE status IN ('pending', 'waiting_customer');

-- Delivered usage events older than TALLY_RETENTION_USAGE_EVENTS are
-- deleted; their values are added here first, in the same statement, per
-- customer, meter and UTC day (day is that day's midnight, UTC). Usage
-- totals and reconciliation read these together with the rows left, so
-- their answers do not change when rows go.
CREATE TABLE IF NOT EXISTS usage_daily_totals (
    customer_id text        NOT NULL,
    meter       text        NOT NULL,
    day         timestamptz NOT NULL,
    total       bigint      NOT NULL,
    events      bigint      NOT NULL,
    CONSTRAINT usage_daily_totals_pkey PRIMARY KEY (customer_id, meter, day),
    CONSTRAINT usage_daily_totals_customer_fkey FOREIGN KEY (customer_id) REFERENCES customers (id),
    CONSTRAINT usage_daily_totals_day_is_utc_midnight CHECK (extract(epoch FROM day) = floor(extract(epoch FROM day) / 86400) * 86400),
    CONSTRAINT usage_daily_totals_counts CHECK (total >= 0 AND events >= 1)
);
-- Reconciliation: one meter's days in a window, per customer.
CREATE INDEX IF NOT EXISTS usage_daily_totals_meter_day ON usage_daily_totals (meter, day);

-- The feed's events older than TALLY_RETENTION_EVENTS are deleted by age.
CREATE INDEX CONCURRENTLY IF NOT EXISTS events_created_at ON events (created_at);

-- +goose Down
DROP INDEX CONCURRENTLY IF EXISTS events_created_at;
DROP TABLE IF EXISTS usage_daily_totals;
DROP INDEX CONCURRENTLY IF EXISTS usage_events_undelivered_time;
