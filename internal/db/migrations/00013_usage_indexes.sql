-- Indexes for usage delivery and retention (internal/metering), built
-- CONCURRENTLY so that a large usage_events table keeps taking intake while
-- they build. That cannot run inside a transaction. Should a build be
-- interrupted, PostgreSQL keeps an invalid index of that name, which IF NOT
-- EXISTS would then skip: drop it (DROP INDEX CONCURRENTLY) and migrate again.

-- +goose NO TRANSACTION

-- +goose Up
-- The undelivered events by timestamp: the worker dead-letters those whose
-- timestamp left Stripe's window (too_old), and the gauge reports the age
-- of the oldest one waiting for a Stripe customer.
CREATE INDEX CONCURRENTLY IF NOT EXISTS usage_events_undelivered_time ON usage_events (status, occurred_at)
    WHERE status IN ('pending', 'waiting_customer');

-- +goose Down
DROP INDEX CONCURRENTLY IF EXISTS usage_events_undelivered_time;
