-- The customers with events waiting for a Stripe customer, for the
-- delivery worker's release: it walks this index customer by customer
-- (a loose index scan) and asks which of them are linked now, so a round
-- costs the number of waiting customers, not of waiting events. It used
-- to join every waiting event with customers on every round: a backlog of
-- a million events for customers without a Stripe customer cost a second
-- of database time per round, found nothing, and slowed everything else.
--
-- Built CONCURRENTLY (usage_events keeps taking writes), outside a
-- transaction; safe to run again. An interrupted build leaves an invalid
-- index that IF NOT EXISTS skips: DROP INDEX CONCURRENTLY it and migrate
-- again.

-- +goose NO TRANSACTION

-- +goose Up
CREATE INDEX CONCURRENTLY IF NOT EXISTS usage_events_waiting_customer ON usage_events (customer_id)
    WHERE status = 'waiting_customer';

-- +goose Down
DROP INDEX CONCURRENTLY IF EXISTS usage_events_waiting_customer;
