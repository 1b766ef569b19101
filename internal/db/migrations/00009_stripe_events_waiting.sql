-- +goose Up
-- A refund or dispute that arrives before the success of its payment waits
-- for it (internal/stripehook): waiting_for names the PaymentIntent whose
-- success wakes it, so it is applied as soon as that success is processed
-- rather than at its next backoff.
ALTER TABLE stripe_events ADD COLUMN waiting_for text;
CREATE INDEX stripe_events_waiting_idx ON stripe_events (waiting_for) WHERE status = 'failed' AND waiting_for IS NOT NULL;

-- +goose Down
DROP INDEX stripe_events_waiting_idx;
ALTER TABLE stripe_events DROP COLUMN waiting_for;
