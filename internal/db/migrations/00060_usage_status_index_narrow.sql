-- The index by status and acceptance time stops at the time (issue 11).
--
-- usage_events_status_created was (status, created_at, identifier). Every
-- event of one intake request has the same status and the same created_at,
-- so the identifier made each entry unique and each insert a search among
-- a thousand neighbours by identifier. Without it, equal entries share one
-- posting list (B-tree deduplication): on the benchmark's usage scenario
-- the index went from 137 MB to 8.4 MB for the same 900,000 events, and
-- PostgreSQL from 27 / 31 / 25 to 25 / 26 / 25 µs an event in alternated
-- runs of a build whose usage names also compared as bytes (not merged);
-- in the full table the gain was inside the machine's noise
-- (BENCHMARKS.md).
--
-- Its readers lose nothing:
-- * the dead-letter list (metering.List) pages by (created_at, identifier):
--   PostgreSQL reads the index from the cursor's created_at and sorts each
--   group of equal times by identifier as it goes (an incremental sort), a
--   group being at most one request's events;
-- * the purge of delivered events orders by (status, created_at) only;
-- * the gauges count by status, from an index now a sixteenth the size.
--
-- Built CONCURRENTLY (usage_events keeps taking writes), so not inside a
-- transaction; every statement is safe to run again. Should a build be
-- interrupted, PostgreSQL keeps an invalid index of that name, which IF NOT
-- EXISTS then skips: drop it (DROP INDEX CONCURRENTLY) and migrate again.

-- +goose NO TRANSACTION

-- +goose Up
CREATE INDEX CONCURRENTLY IF NOT EXISTS usage_events_status_created_at ON usage_events (status, created_at);
DROP INDEX CONCURRENTLY IF EXISTS usage_events_status_created;

-- +goose Down
CREATE INDEX CONCURRENTLY IF NOT EXISTS usage_events_status_created ON usage_events (status, created_at, identifier);
DROP INDEX CONCURRENTLY IF EXISTS usage_events_status_created_at;
