-- Moving usage from a legacy system to Stripe's meters (internal/metering):
-- imported history, shadow meters, a cut-over at a billing period boundary
-- and cancellation of events. New statuses of usage_events:
--
--   historical      imported with a timestamp older than Stripe accepts; it
--                   counts in tally's totals and is never sent
--   shadow          its plan says delivery: shadow; stored and counted,
--                   never sent
--   legacy_period   timestamped before its plan's live_from (for this
--                   customer); the legacy system bills it, tally never sends it
--   cancel_pending  cancelled after it may have reached Stripe; a meter event
--                   adjustment (type cancel) is on its way through the outbox
--   cancelled       cancelled: never sent, or cancelled at Stripe; left out
--                   of totals and reconciliation
--
--   pending | waiting_customer | shadow | historical | legacy_period | dead
--       -> cancelled                  cancelled before it could reach Stripe
--   pending | delivered | dead -> cancel_pending -> cancelled
--                                     it may be at Stripe: adjusted there first

-- +goose Up
ALTER TABLE usage_events DROP CONSTRAINT usage_events_status_known;
ALTER TABLE usage_events ADD CONSTRAINT usage_events_status_known CHECK (status IN
    ('pending', 'waiting_customer', 'delivered', 'dead', 'historical', 'shadow', 'legacy_period', 'cancel_pending', 'cancelled')) NOT VALID;
ALTER TABLE usage_events VALIDATE CONSTRAINT usage_events_status_known;

-- A cancelled event keeps the time it was delivered, if it was.
ALTER TABLE usage_events DROP CONSTRAINT usage_events_delivered_at;
ALTER TABLE usage_events ADD CONSTRAINT usage_events_delivered_at CHECK (
    CASE status WHEN 'delivered' THEN delivered_at IS NOT NULL
                WHEN 'cancel_pending' THEN true
                WHEN 'cancelled' THEN true
                ELSE delivered_at IS NULL END) NOT VALID;
ALTER TABLE usage_events VALIDATE CONSTRAINT usage_events_delivered_at;

-- When a cancel was asked for (cancel_pending and cancelled only).
ALTER TABLE usage_events ADD COLUMN cancelled_at timestamptz;

-- Each customer's cut-over on a plan with live_from: next_period: the start
-- of their next Stripe billing period, decided once (when the customer's
-- first event on the meter is about to be sent) and never moved, so no
-- period is billed by both systems or by neither.
CREATE TABLE usage_cutovers (
    customer_id text        NOT NULL,
    meter       text        NOT NULL,
    live_from   timestamptz NOT NULL,
    -- How live_from was found: subscription (the end of the current period
    -- of the customer's subscription to the plan's price) or
    -- no_subscription (none: live from the time of the decision).
    source      text        NOT NULL,
    decided_at  timestamptz NOT NULL,
    CONSTRAINT usage_cutovers_pkey PRIMARY KEY (customer_id, meter),
    CONSTRAINT usage_cutovers_customer_fkey FOREIGN KEY (customer_id) REFERENCES customers (id),
    CONSTRAINT usage_cutovers_source_known CHECK (source IN ('subscription', 'no_subscription'))
);

-- The cancel_pending events for the worker to adjust at Stripe, due first.
CREATE INDEX usage_events_cancel_due ON usage_events (next_attempt_at) WHERE status = 'cancel_pending';

-- +goose Down
DROP INDEX usage_events_cancel_due;
DROP TABLE usage_cutovers;
ALTER TABLE usage_events DROP COLUMN cancelled_at;
ALTER TABLE usage_events DROP CONSTRAINT usage_events_delivered_at;
ALTER TABLE usage_events ADD CONSTRAINT usage_events_delivered_at CHECK ((status = 'delivered') = (delivered_at IS NOT NULL));
ALTER TABLE usage_events DROP CONSTRAINT usage_events_status_known;
ALTER TABLE usage_events ADD CONSTRAINT usage_events_status_known CHECK (status IN ('pending', 'waiting_customer', 'delivered', 'dead'));
