package payments

import (
	"context"
	"fmt"
	"strings"

	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/events"
)

// ChargeRefunded moves the payment to refunded with Stripe's cumulative
// amount_refunded and takes back the credits the increase paid for (see
// takeBack: from the whole balance unless RevokeFrom says purchase_grant,
// what was spent recorded as a shortfall), so a redelivered or older refund
// event takes nothing more. A refund of a payment not succeeded yet is
// *Waiting (it applies once the success arrives). Only a charge of the
// payment's own PaymentIntent, for the amount it paid, may refund it.
// A charge or dispute of a PaymentIntent nothing linked yet is found by
// asking Stripe for it (chargePayment), and for an invoice's PaymentIntent
// (no tally metadata) which invoice it paid: the refund of a
// pay-by-invoice payment links that PaymentIntent to it.
// Errors: ErrNotOurs, *Waiting, *stripeapi.Error (Stripe not answering),
// *Rejection (livemode, currency, no or
// another PaymentIntent, charge amount not what was paid, more refunded
// than charged), errs.Unavailable.
func (s *Service) ChargeRefunded(ctx context.Context, ev EventRef, ch Charge) error {
	id, viaInvoice, err := s.chargePayment(ctx, ch.Metadata, ch.PaymentIntent)
	if err != nil {
		return err
	}
	return s.inEventTx(ctx, ev, id, ch.Livemode, ch.PaymentIntent, func(tx *gorm.DB, p Payment) error {
		if ch.PaymentIntent == "" {
			return reject("charge %s names no PaymentIntent, so it cannot be matched to payment %s", ch.ID, p.ID)
		}
		if !strings.EqualFold(ch.Currency, paidCurrency(p)) {
			return reject("refund currency %q does not match payment %s (%q)", ch.Currency, p.ID, paidCurrency(p))
		}
		// A refund leaves a disputed (or lost) payment in that state: it was
		// made at Stripe before the dispute and is only delivered now.
		to := Refunded
		switch p.Status {
		case Succeeded, Refunded:
		case Disputed, DisputeLost:
			to = p.Status
		default:
			return waitingForSuccess(p, ch.PaymentIntent, "refund")
		}
		if err := s.linkInvoicePaymentIntent(ctx, tx, &p, viaInvoice, ch.PaymentIntent); err != nil {
			return err
		}
		// A succeeded payment knows its PaymentIntent (a plan's never has
		// one), so only a charge of that very PaymentIntent may refund it.
		if ch.PaymentIntent != p.PaymentIntentID {
			return reject("charge %s belongs to PaymentIntent %s, not to payment %s's (%q)", ch.ID, ch.PaymentIntent, p.ID, p.PaymentIntentID)
		}
		if ch.Amount != paid(p) {
			return reject("charge %s amount %d does not match what payment %s paid (%d)", ch.ID, ch.Amount, p.ID, paid(p))
		}
		if ch.AmountRefunded > ch.Amount {
			return reject("charge %s refunds %d of %d", ch.ID, ch.AmountRefunded, ch.Amount)
		}
		delta := ch.AmountRefunded - p.AmountRefunded
		if delta <= 0 {
			return nil // an older or repeated refund event: already applied
		}
		ok, err := transition(ctx, tx, p, to, ev, fmt.Sprintf("refunded %d of %d %s in total", ch.AmountRefunded, paid(p), paidCurrency(p)))
		if err != nil {
			return err
		}
		if !ok {
			return reject("payment %s is %s and cannot be refunded", p.ID, p.Status)
		}
		now := s.now()
		due, err := refundDue(ctx, tx, p, ch.AmountRefunded)
		if err != nil {
			return err
		}
		back, err := s.takeBack(ctx, tx, p, due, "refund", ev)
		if err != nil {
			return err
		}
		// A won dispute returns a payment refunded meanwhile to refunded.
		changed := map[string]any{"status": string(to), "amount_refunded": ch.AmountRefunded, "updated_at": now}
		if p.StatusBeforeDispute != "" {
			changed["status_before_dispute"] = string(Refunded)
		}
		if err := updatePayment(ctx, tx, p.ID, changed); err != nil {
			return err
		}
		if err := tx.WithContext(ctx).Model(&refundRow{}).Create(map[string]any{
			"payment_id": p.ID, "stripe_event_id": db.NullIfEmpty(ev.ID), "amount_refunded_total": ch.AmountRefunded,
			"amount_refunded_delta": delta, "credits_revoked": back.Taken, "credits_shortfall": back.Shortfall,
		}).Error; err != nil {
			return db.Translate(err, nil)
		}
		return events.Append(ctx, tx, p.CustomerID, events.PaymentRefunded{
			PaymentID: p.ID, AmountRefunded: ch.AmountRefunded, AmountRefundedDelta: delta,
			Currency: paidCurrency(p), CreditsRevoked: back.Taken, CreditsShortfall: back.Shortfall, StripeEventID: ev.ID,
		})
	})
}

// paid is what the customer paid: what Stripe reported, else what we expected.
func paid(p Payment) int64 {
	if p.AmountReceived != nil {
		return *p.AmountReceived
	}
	return p.Amount
}

// paidCurrency is the currency of paid(p): the buyer's when Stripe converted
// the price (Adaptive Pricing), which its charges and refunds are in.
func paidCurrency(p Payment) string {
	if p.AmountReceived != nil && p.ReceivedCurrency != "" {
		return p.ReceivedCurrency
	}
	return p.Currency
}
