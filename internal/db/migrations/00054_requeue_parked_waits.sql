-- Refunds and disputes parked while waiting for a payment's success that
-- has since been recorded, by a sync, before this version.
--
-- A charge.refunded or charge.dispute.* that overtakes its payment's
-- success waits for it (stripe_events.waiting_for names the PaymentIntent,
-- or a pay-by-invoice payment's invoice), and after a day it is parked.
-- Whatever records the success wakes both: a webhook always did, and now a
-- sync and the top-up worker do too (payments' OnWaitOver). Before that, a
-- success that only a sync found woke nothing, so an event parked then is
-- still parked with its success long recorded: nothing retries a parked
-- event, and the buyer kept both the credits and the money.
--
-- This hands each such event back to the retry worker, due now, which is
-- what a wake does (internal/stripehook: wakeWaiting claims the failed and
-- parked events of the key and processes them): it applies once, and an
-- event that still cannot apply is failed or parked again by the worker,
-- as any retry. A payment that failed, or is still pending, wakes nothing,
-- as the sync does not. The partial index stripe_events_waiting_idx holds
-- exactly the waiting events, so this reads only those.

-- +goose Up
UPDATE stripe_events e
SET status = 'failed', next_attempt_at = now()
WHERE e.status = 'parked' AND e.waiting_for IS NOT NULL
  AND EXISTS (
    SELECT 1 FROM payments p
    WHERE p.status NOT IN ('pending', 'failed')
      AND (p.payment_intent_id = e.waiting_for
           OR (p.method = 'invoice' AND p.invoice_id = e.waiting_for)));

-- +goose Down
-- Nothing to undo: a requeued event was applied or parked again.
SELECT 1;
