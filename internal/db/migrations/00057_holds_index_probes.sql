-- Holds and captures probe the tables by key, as consumes do (issue 11).
--
-- credits_hold_one and credits_capture_one (migration 00036) join a hold's
-- draws, a jsonb array, to credit_grants by grant id. A plpgsql statement
-- keeps a generic plan, made with the array's size unknown (a hundred rows
-- for the planner); where credit_grants is small, or grew dead rows
-- between vacuums, reading it whole looked cheaper than a hundred index
-- probes, so every hold and every capture read every grant of every
-- customer: on the bench's thousand customers, with autovacuum off, the
-- grants' UPDATE of a hold took 0.37 ms and a capture's 0.29 ms, against
-- 0.11 and 0.17 ms with index probes, and hold-capture ran at 300 a
-- second where it ran at 560 with them, PostgreSQL spending 5.2 against
-- 2.4 ms per hold and capture (BENCHMARKS.md, 2026-12-01, the seventh
-- machine). credits_consume_set has run with enable_seqscan off for the
-- same reason since migration 00053; the consume loop's statements were
-- measured and do not need it.
--
-- Every statement of the two functions names its rows by key (grant id,
-- hold id, customer id, idempotency scope and key), so an index serves
-- each. A later CREATE OR REPLACE of either function must repeat the
-- setting (it replaces the function's SET clauses), as
-- internal/db/function_settings_test.go checks.

-- +goose Up
ALTER FUNCTION credits_hold_one(jsonb, timestamptz, bigint, boolean) SET enable_seqscan = off;
ALTER FUNCTION credits_capture_one(jsonb, timestamptz, bigint, boolean) SET enable_seqscan = off;

-- +goose Down
ALTER FUNCTION credits_hold_one(jsonb, timestamptz, bigint, boolean) RESET enable_seqscan;
ALTER FUNCTION credits_capture_one(jsonb, timestamptz, bigint, boolean) RESET enable_seqscan;
