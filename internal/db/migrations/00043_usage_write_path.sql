-- The cost of writing a usage event (internal/metering: intake and import),
-- issues 11 and 13. Measured with the raw-SQL import baseline in
-- BENCHMARKS.md, the database's CPU for a million rows went to the heap,
-- the primary key, about 1.8 s per secondary index and about 3 s to the
-- foreign key to customers. This migration removes the two of those that
-- buy nothing:
--
-- * The worker's due index covered every row (delivered, historical,
--   waiting, shadow, legacy period, cancelled) while the claim only ever
--   reads pending ones. It becomes partial: only pending rows enter it, so
--   an imported or waiting event writes one index entry less and the index
--   stays the size of the backlog, not of the table. The other readers of
--   the old index have their own: waiting_customer rows through
--   usage_events_undelivered_time, dead ones through
--   usage_events_status_created.
--
-- * The foreign key to customers. It checked, for every row, what the
--   insert statement has already checked (it joins customers: a row of an
--   unknown customer is never inserted), and it did so by locking the
--   customer row FOR KEY SHARE: concurrent batches naming the same
--   customers (every intake request does) turned each of those locks into
--   a MultiXact, a WAL record and a dirtied customers page. Customers are
--   never deleted by tally; the trigger below keeps it so for a customer
--   with usage, which is the half of the foreign key that still mattered.
--
-- Indexes are built CONCURRENTLY (a large usage_events keeps taking writes),
-- which cannot run inside a transaction; every statement is safe to run
-- again. Should a build be interrupted, PostgreSQL keeps an invalid index of
-- that name, which IF NOT EXISTS then skips: drop it (DROP INDEX
-- CONCURRENTLY) and migrate again.

-- +goose NO TRANSACTION

-- +goose Up
CREATE INDEX CONCURRENTLY IF NOT EXISTS usage_events_pending_due ON usage_events (next_attempt_at)
    WHERE status = 'pending';
DROP INDEX CONCURRENTLY IF EXISTS usage_events_status_due;

ALTER TABLE usage_events DROP CONSTRAINT IF EXISTS usage_events_customer_fkey;

-- +goose StatementBegin
CREATE OR REPLACE FUNCTION customers_keep_usage() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM usage_events WHERE customer_id = OLD.id) THEN
        RAISE EXCEPTION 'customer % has usage events and cannot be deleted', OLD.id
            USING ERRCODE = 'foreign_key_violation', CONSTRAINT = 'usage_events_customer_fkey';
    END IF;
    RETURN OLD;
END;
$$;
-- +goose StatementEnd
DROP TRIGGER IF EXISTS customers_keep_usage ON customers;
CREATE TRIGGER customers_keep_usage BEFORE DELETE ON customers
    FOR EACH ROW EXECUTE FUNCTION customers_keep_usage();

-- +goose Down
DROP TRIGGER IF EXISTS customers_keep_usage ON customers;
DROP FUNCTION IF EXISTS customers_keep_usage();
ALTER TABLE usage_events ADD CONSTRAINT usage_events_customer_fkey
    FOREIGN KEY (customer_id) REFERENCES customers (id) NOT VALID;
ALTER TABLE usage_events VALIDATE CONSTRAINT usage_events_customer_fkey;
CREATE INDEX CONCURRENTLY IF NOT EXISTS usage_events_status_due ON usage_events (status, next_attempt_at);
DROP INDEX CONCURRENTLY IF EXISTS usage_events_pending_due;
