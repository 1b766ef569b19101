package payments

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/tallybilling/tally/internal/db"
)

// Catching up with Stripe: a payment still pending long after it was
// created may have missed its webhooks (an endpoint misconfigured, a
// secret rotated wrongly, Stripe giving up after three days). SyncPending
// looks each one up at Stripe and applies what Stripe shows through the
// same handlers, validation chain and guard as the webhook would have,
// recorded with source sync.

// SyncResult counts what SyncPending did.
type SyncResult struct {
	Checked int
	Changed int
	// Refused are payments whose Stripe state the validation chain refused
	// (they stay pending; the log says why).
	Refused int
}

// maxSyncBatch bounds the payments one SyncPending call looks up.
const maxSyncBatch = 500

// SyncPending looks up at Stripe the payments pending since before
// now-olderThan (oldest first, at most 500): a Checkout payment by its
// session (paid: confirmed, by the session's PaymentIntent, as
// confirmed_by=sync; expired: failed); a pay-by-invoice payment by its
// invoice (paid: confirmed by the invoice; void or uncollectible: failed);
// an automatic top-up by its PaymentIntent (succeeded: confirmed, as
// confirmed_by=sync; canceled or refused: failed).
// A Stripe error stops the run and is returned with what was done.
// Errors: errs.Unavailable (also without a Stripe key), Stripe's *Error.
func (s *Service) SyncPending(ctx context.Context, olderThan time.Duration) (SyncResult, error) {
	var res SyncResult
	if s.stripe == nil {
		return res, nil
	}
	var rows []paymentRow
	err := s.db.WithContext(ctx).Select("id").Where("status = ? AND created_at < ?", string(Pending), s.now().Add(-olderThan)).
		Order("created_at").Limit(maxSyncBatch).Find(&rows).Error
	if err != nil {
		return res, db.Translate(err, nil)
	}
	for _, r := range rows {
		if ctx.Err() != nil {
			return res, ctx.Err()
		}
		changed, err := s.syncPayment(ctx, r.ID)
		res.Checked++
		switch {
		case IsRejection(err):
			res.Refused++
			s.logger.WarnContext(ctx, "sync: Stripe's state of a pending payment was refused", "payment_id", r.ID, "error", err)
		case errors.Is(err, ErrNotOurs):
		case err != nil:
			return res, fmt.Errorf("payments: sync payment %s: %w", r.ID, err)
		case changed:
			res.Changed++
		}
	}
	return res, nil
}

// SyncPayment looks one payment up at Stripe, as SyncPending does, and
// reports whether its status changed. Errors: as SyncPending, and
// *Rejection.
func (s *Service) SyncPayment(ctx context.Context, id string) (bool, error) {
	return s.syncPayment(ctx, id)
}

func (s *Service) syncPayment(ctx context.Context, id string) (bool, error) {
	before, err := load(ctx, s.db, id, false)
	if err != nil {
		return false, err
	}
	if before.Status != Pending {
		return false, nil
	}
	switch {
	case before.Method == MethodInvoice && before.InvoiceID != "":
		got, err := s.stripe.GetInvoice(ctx, before.InvoiceID)
		if err != nil {
			return false, err
		}
		inv := invoiceFromStripe(got)
		typ := map[string]string{"paid": "invoice.paid", "void": "invoice.voided", "uncollectible": "invoice.marked_uncollectible"}[inv.Status]
		if typ == "" {
			return false, nil // still open: nothing to apply
		}
		err = s.InvoiceChanged(ctx, EventRef{Type: typ, Source: SourceSync, Created: s.now().Unix()}, inv)
		if err != nil {
			return false, err
		}
	case before.Method != MethodInvoice && before.CheckoutSessionID != "":
		got, err := s.stripe.GetCheckoutSession(ctx, before.CheckoutSessionID)
		if err != nil {
			return false, err
		}
		cs := fromStripe(got)
		cs.ID = before.CheckoutSessionID
		ev := EventRef{Source: SourceSync, Created: s.now().Unix()}
		switch {
		case cs.Mode == "subscription":
			return false, nil // a plan's subscription: its own events tell
		case cs.PaymentStatus == "paid":
			ev.Type = "checkout.session.completed"
			err = s.confirmSession(ctx, ev, id, cs, BySync)
		case cs.Status == "expired":
			ev.Type = "checkout.session.expired"
			err = s.CheckoutSessionFailed(ctx, ev, cs)
		default:
			return false, nil // open, or paid by a method that has not cleared
		}
		if err != nil {
			return false, err
		}
	case before.Method == MethodAutoTopUp && before.PaymentIntentID != "":
		got, err := s.stripe.GetPaymentIntent(ctx, before.PaymentIntentID)
		if err != nil {
			return false, err
		}
		pi := paymentIntentFromStripe(got)
		ev := EventRef{Source: SourceSync, Created: s.now().Unix()}
		switch pi.Status {
		case "succeeded":
			ev.Type = "payment_intent.succeeded"
			err = s.paymentIntentSucceeded(ctx, ev, pi, BySync)
		case "canceled":
			ev.Type = "payment_intent.canceled"
			err = s.PaymentIntentFailed(ctx, ev, pi)
		case "requires_payment_method":
			// Refused after the worker recorded it (a later decline).
			ev.Type = "payment_intent.payment_failed"
			err = s.PaymentIntentFailed(ctx, ev, pi)
		default:
			return false, nil // processing, or waiting on the customer
		}
		if err != nil {
			return false, err
		}
	default:
		return false, nil // Stripe never created anything for it
	}
	after, err := load(ctx, s.db, id, false)
	if err != nil {
		return false, err
	}
	if after.Status != Pending && after.Status != Failed && s.waitOver != nil {
		// A refund or dispute that overtook this success waits for it (or
		// was parked after its day, still naming it): a webhook's success
		// wakes it, and so must the sync's, or it applies only at its next
		// retry, and once parked never. Not only while succeeded: a
		// waiting refund's own retry may have applied between the
		// confirmation and the reload, and a dispute may still wait.
		if key := successKey(after); key != "" {
			s.waitOver(ctx, key)
		}
	}
	return after.Status != before.Status, nil
}

// OldestPending is the creation time of the oldest pending payment that
// should settle within the hour (a Checkout or a top-up: not a
// pay-by-invoice payment, which waits on its terms), zero when none is
// pending. Errors: errs.Unavailable.
func (s *Service) OldestPending(ctx context.Context) (time.Time, error) {
	var r paymentRow
	err := s.db.WithContext(ctx).Select("created_at").Where("status = ? AND method <> ?", string(Pending), string(MethodInvoice)).
		Order("created_at").Limit(1).Find(&r).Error
	if err != nil {
		return time.Time{}, db.Translate(err, nil)
	}
	return r.CreatedAt, nil
}
