-- A hot customer's run probes its tables by key, as the consume set, holds
-- and captures do (migrations 00053 and 00057) (issue 11).
--
-- credits_consume_run ends by writing its keys' answers with an UPDATE of
-- idempotency_keys joined to the run's arrays. A plpgsql statement keeps
-- the plan it made first in its session; made on a young database, where
-- idempotency_keys was small, that plan read the whole table and hashed it,
-- and kept doing so as the table grew: on a fresh bench database,
-- consume-hot at 64 workers alone, 1,012 runs read 29 million key rows in
-- 20 s, and the scan and its hashing took about a third of PostgreSQL's
-- CPU. A connection lives up to half an hour, so a new deployment's hot
-- customers paid that until their connections were replaced. Every
-- statement of the function names its rows by key (customer id, grant id,
-- idempotency scope and key), so an index serves each. A later CREATE OR
-- REPLACE of the function must repeat the setting, as
-- internal/db/function_settings_test.go checks.

-- +goose Up
ALTER FUNCTION credits_consume_run(jsonb, timestamptz, bigint, boolean, double precision, double precision) SET enable_seqscan = off;

-- +goose Down
ALTER FUNCTION credits_consume_run(jsonb, timestamptz, bigint, boolean, double precision, double precision) RESET enable_seqscan;
