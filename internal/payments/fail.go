package payments

import (
	"context"
	"strings"

	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/events"
)

// PaymentIntentFailed handles payment_intent.payment_failed and
// payment_intent.canceled: the payment fails (payment.failed event) unless
// it already succeeded, in which case the refused transition is recorded.
// Only the move into failed tells the host app; a payment already failed
// records the event without effect, and an event already recorded (a
// redelivery, a replay) does nothing.
// A failure of another PaymentIntent than the payment's is refused. A
// pay-by-invoice payment's own PaymentIntent (linked by a refund or
// dispute of it) fails nothing: only its invoice does.
// Errors: ErrNotOurs, *Rejection (livemode, another PaymentIntent),
// errs.Unavailable.
func (s *Service) PaymentIntentFailed(ctx context.Context, ev EventRef, pi PaymentIntent) error {
	id, err := s.paymentFor(ctx, pi.Metadata, map[string]string{"payment_intent_id": pi.ID})
	if err != nil {
		return err
	}
	reason := pi.LastError
	if pi.CancellationReason != "" {
		reason = "canceled: " + pi.CancellationReason
	}
	if reason == "" {
		reason = strings.TrimPrefix(ev.Type, "payment_intent.")
	}
	// A PaymentIntent's own event links nothing: only the payment's Checkout
	// Session may tell which PaymentIntent is the payment's.
	return s.fail(ctx, ev, id, pi.Livemode, pi.ID, reason, nil)
}

// CheckoutSessionFailed handles checkout.session.async_payment_failed and
// checkout.session.expired, like PaymentIntentFailed.
func (s *Service) CheckoutSessionFailed(ctx context.Context, ev EventRef, cs CheckoutSession) error {
	id, err := s.sessionPayment(ctx, cs)
	if err != nil {
		return err
	}
	reason := "checkout session expired"
	if ev.Type != "checkout.session.expired" {
		reason = "asynchronous payment failed"
	}
	return s.fail(ctx, ev, id, cs.Livemode, cs.PaymentIntent, reason, &cs)
}

// fail moves the payment to failed for the event ev; session is the
// event's Checkout Session when it is a session event (which must be the
// payment's own, and teaches a payment still in play its ids).
func (s *Service) fail(ctx context.Context, ev EventRef, paymentID string, livemode bool, paymentIntentID, reason string, session *CheckoutSession) error {
	return s.inEventTx(ctx, ev, paymentID, livemode, paymentIntentID, func(tx *gorm.DB, p Payment) error {
		if session == nil && p.Method == MethodInvoice && paymentIntentID != "" && p.PaymentIntentID == paymentIntentID {
			// Only its invoice fails a pay-by-invoice payment (voided,
			// uncollectible): a failed attempt of its PaymentIntent
			// (Stripe's own, linked by a refund or a dispute of it) is not
			// the payment failing.
			return nil
		}
		if session != nil {
			if err := ownSession(p, session.ID); err != nil {
				return err
			}
			// Only a payment still in play learns ids from a failure; a late
			// failure must not rewrite a succeeded payment's links.
			if p.Status == Pending || p.Status == Failed {
				if err := s.recordSession(ctx, tx, &p, *session); err != nil {
					return err
				}
			}
		}
		return s.failLocked(ctx, tx, p, ev, reason)
	})
}

// failLocked moves p (locked by tx) to failed for reason, with
// payment.failed and, for an automatic top-up, its failure count and
// credits.auto_top_up_failed. A payment already failed only records ev.
func (s *Service) failLocked(ctx context.Context, tx *gorm.DB, p Payment, ev EventRef, reason string) error {
	if p.Status == Failed {
		// Another failure of a failed payment (a second decline, then the
		// session expiring) is history, not news: no second payment.failed.
		return record(ctx, tx, p, Failed, false, ev, "already failed: "+reason)
	}
	ok, err := transition(ctx, tx, p, Failed, ev, reason)
	if err != nil || !ok {
		return err // a refused move is recorded and the event is done
	}
	err = updatePayment(ctx, tx, p.ID, map[string]any{"status": string(Failed), "failure_reason": reason, "updated_at": s.now()})
	if err != nil {
		return err
	}
	if err := events.Append(ctx, tx, p.CustomerID, events.PaymentFailed{
		PaymentID: p.ID, Item: p.Item, Reason: reason, StripeEventID: ev.ID,
	}); err != nil {
		return err
	}
	if p.Method == MethodAutoTopUp {
		return s.autoTopUpFailed(ctx, tx, p, reason)
	}
	return nil
}
