-- Usage delivery retries by time, not by count (internal/metering): an event
-- is sent again after a 5xx, a timeout or a network failure for as long as
-- Stripe still accepts its timestamp (35 days, less a margin), then it is
-- dead-lettered with dead_code too_old.
--
--   pending | waiting_customer -> dead    Stripe refused it (stripe_refused),
--                                         or its timestamp left Stripe's
--                                         window (too_old)
--   dead -> pending | waiting_customer    an operator requeued it; while its
--                                         timestamp is in the window, and
--                                         with force when maybe_sent_at is
--                                         more than 24 hours old

-- +goose Up
-- Why a dead event is dead; NULL for any other status (and for events
-- dead-lettered before this column existed).
ALTER TABLE usage_events ADD COLUMN dead_code text;
-- The first time a send of the event may have reached Stripe without an
-- answer saying so (a timeout, a network failure or a 5xx). Stripe dedupes
-- identifiers only over about 24 hours, so a resend later than that could be
-- counted twice: requeue then needs force. Kept across requeues.
ALTER TABLE usage_events ADD COLUMN maybe_sent_at timestamptz;

-- NOT VALID: every existing row has dead_code NULL, so there is nothing to
-- check, and the table is not scanned under an exclusive lock. Rows written
-- from now on are checked.
ALTER TABLE usage_events ADD CONSTRAINT usage_events_dead_code_known
    CHECK (dead_code IN ('stripe_refused', 'too_old')) NOT VALID;
ALTER TABLE usage_events ADD CONSTRAINT usage_events_dead_code_only_dead
    CHECK (dead_code IS NULL OR status = 'dead') NOT VALID;

-- Before this migration a failed attempt was not told apart from a refusal:
-- every event attempted and not yet delivered may have reached Stripe since
-- its first claim. Erring that way only ever asks an operator for force.
UPDATE usage_events SET maybe_sent_at = first_attempt_at
WHERE status IN ('pending', 'dead') AND attempts > 0 AND first_attempt_at IS NOT NULL;

-- +goose Down
ALTER TABLE usage_events DROP CONSTRAINT usage_events_dead_code_only_dead;
ALTER TABLE usage_events DROP CONSTRAINT usage_events_dead_code_known;
ALTER TABLE usage_events DROP COLUMN maybe_sent_at;
ALTER TABLE usage_events DROP COLUMN dead_code;
