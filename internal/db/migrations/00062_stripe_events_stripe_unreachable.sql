-- Events that failed because Stripe could not be asked (internal/stripehook).
--
-- An event whose processing needs Stripe (a refund of a payment paid by
-- invoice: which invoice did its PaymentIntent pay?) and meets Stripe down
-- is retried at its backoff, doubling up to an hour over a long outage.
-- Once Stripe answered again, such a refund still waited up to that hour,
-- and the credits it takes back stayed spendable meanwhile. Marked here,
-- these events are brought forward as soon as tally sees Stripe answer: a
-- catch-up that listed Stripe's events, or the retry of another marked
-- event that went through.
--
-- A new column with a constant default: no rewrite, and servers still
-- running the previous version neither read nor write it.

-- +goose Up
ALTER TABLE stripe_events ADD COLUMN stripe_unreachable boolean NOT NULL DEFAULT false;

-- +goose Down
ALTER TABLE stripe_events DROP COLUMN stripe_unreachable;
