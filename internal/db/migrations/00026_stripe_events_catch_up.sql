-- Catching up with Stripe and operator decisions on parked events
-- (internal/stripehook).

-- +goose Up
ALTER TABLE stripe_events
    -- Stripe's creation time of the event: where the next listing of
    -- missed events starts, and the start of the processing lag.
    ADD COLUMN stripe_created timestamptz,
    -- How the event reached tally: a webhook delivery, or Stripe's event
    -- list (a catch-up found it missed).
    ADD COLUMN source text NOT NULL DEFAULT 'webhook',
    -- An operator's decision that a parked or failed event needs nothing
    -- more: who (the admin key's name or hash prefix), why, when.
    ADD COLUMN dismissed_by text,
    ADD COLUMN dismissed_reason text,
    ADD COLUMN dismissed_at timestamptz,
    ADD CONSTRAINT stripe_events_source_check CHECK (source IN ('webhook', 'sync')),
    ADD CONSTRAINT stripe_events_dismissed_check CHECK (status <> 'dismissed' OR dismissed_at IS NOT NULL),
    DROP CONSTRAINT stripe_events_status_check,
    ADD CONSTRAINT stripe_events_status_check CHECK (status IN ('received', 'processed', 'ignored', 'failed', 'parked', 'dismissed'));
CREATE INDEX stripe_events_created_idx ON stripe_events (stripe_created DESC) WHERE stripe_created IS NOT NULL;

-- +goose Down
DROP INDEX stripe_events_created_idx;
ALTER TABLE stripe_events DROP CONSTRAINT stripe_events_dismissed_check, DROP CONSTRAINT stripe_events_status_check;
UPDATE stripe_events SET status = 'parked' WHERE status = 'dismissed';
ALTER TABLE stripe_events
    ADD CONSTRAINT stripe_events_status_check CHECK (status IN ('received', 'processed', 'ignored', 'failed', 'parked')),
    DROP CONSTRAINT stripe_events_source_check,
    DROP COLUMN dismissed_at,
    DROP COLUMN dismissed_reason,
    DROP COLUMN dismissed_by,
    DROP COLUMN source,
    DROP COLUMN stripe_created;
