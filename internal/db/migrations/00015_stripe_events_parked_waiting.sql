-- +goose Up
-- An event parked after waiting a day for its payment's success keeps
-- naming that success (waiting_for): should it come after all, it wakes
-- the parked event too (internal/stripehook), so the wake-up looks among
-- parked events as well as failed ones.
DROP INDEX stripe_events_waiting_idx;
CREATE INDEX stripe_events_waiting_idx ON stripe_events (waiting_for)
    WHERE status IN ('failed', 'parked') AND waiting_for IS NOT NULL;

-- +goose Down
DROP INDEX stripe_events_waiting_idx;
CREATE INDEX stripe_events_waiting_idx ON stripe_events (waiting_for) WHERE status = 'failed' AND waiting_for IS NOT NULL;
