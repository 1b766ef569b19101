-- Meter error reports tally has applied (internal/metering/refused.go).
--
-- A stored Stripe event may be processed again: an operator's replay, or
-- the retry worker after an attempt whose outcome was not recorded. A meter
-- error report applied again dead-lettered, a second time, an event it had
-- named that was requeued since and that Stripe counted, with a second
-- usage.dead event, and counted its refusals again. A report is applied
-- once: its id is recorded in the transaction that dead-letters its events.

-- +goose Up
CREATE TABLE usage_refusal_reports (
    -- The Stripe event id of the report (v1.billing.meter.error_report_triggered
    -- or v1.billing.meter.no_meter_found).
    stripe_event_id text        PRIMARY KEY,
    applied_at      timestamptz NOT NULL DEFAULT now()
);

-- +goose Down
DROP TABLE usage_refusal_reports;
