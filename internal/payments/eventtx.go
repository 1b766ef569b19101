package payments

import (
	"context"
	"errors"

	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/errs"
	"github.com/tallybilling/tally/internal/stripeapi"
)

// paymentFor finds the payment a Stripe object names: by our metadata first,
// then by the Stripe ids we stored. Errors: ErrNotOurs when it names none,
// errs.Unavailable.
func (s *Service) paymentFor(ctx context.Context, metadata map[string]string, byColumn map[string]string) (string, error) {
	if id := metadata[stripeapi.MetadataPaymentID]; id != "" {
		return id, nil
	}
	for _, col := range []string{"payment_intent_id", "checkout_session_id", "invoice_id", "id"} {
		if v, ok := byColumn[col]; ok && v != "" {
			id, err := findID(ctx, s.db, col, v)
			if err != nil || id != "" {
				return id, err
			}
		}
	}
	return "", ErrNotOurs
}

// lockForEvent locks the payment an event names (tx must be a transaction)
// and runs the checks every event passes before it may touch a payment: the
// payment exists, the event's livemode is our key's, and the event's
// PaymentIntent (when it names one) is the payment's (when it has one). A
// Stripe object can carry a payment's metadata without being its payment.
// An event already in the payment's history is errEventApplied.
// Errors: *Rejection, errEventApplied, errs.Unavailable.
func (s *Service) lockForEvent(ctx context.Context, tx *gorm.DB, ev EventRef, paymentID string, livemode bool, paymentIntentID string) (Payment, error) {
	p, err := load(ctx, tx, paymentID, true)
	if errs.Is(err, errs.NotFound) {
		return Payment{}, reject("metadata names payment %s, which tally does not know", paymentID)
	}
	if err != nil {
		return Payment{}, err
	}
	if livemode != s.livemode {
		return Payment{}, reject("event livemode=%t does not match our Stripe key (livemode=%t)", livemode, s.livemode)
	}
	if paymentIntentID != "" && p.PaymentIntentID != "" && paymentIntentID != p.PaymentIntentID {
		return Payment{}, reject("payment %s belongs to PaymentIntent %s, not %s", p.ID, p.PaymentIntentID, paymentIntentID)
	}
	seen, err := eventApplied(ctx, tx, p.ID, ev)
	if err != nil {
		return Payment{}, err
	}
	if seen {
		return Payment{}, errEventApplied
	}
	return p, nil
}

// inEventTx runs fn in a transaction on the payment ev names, once
// lockForEvent let it through. An event already applied to the payment
// (found then, or by fn's transition) rolls back to a no-op: redeliveries
// and operator replays change nothing.
func (s *Service) inEventTx(ctx context.Context, ev EventRef, paymentID string, livemode bool, paymentIntentID string, fn func(tx *gorm.DB, p Payment) error) error {
	err := db.InTx(ctx, s.db, func(tx *gorm.DB) error {
		p, err := s.lockForEvent(ctx, tx, ev, paymentID, livemode, paymentIntentID)
		if err != nil {
			return err
		}
		return fn(tx, p)
	})
	if errors.Is(err, errEventApplied) {
		return nil
	}
	return err
}

// sessionPayment finds the payment a Checkout Session names, as paymentFor.
func (s *Service) sessionPayment(ctx context.Context, cs CheckoutSession) (string, error) {
	return s.paymentFor(ctx, cs.Metadata, map[string]string{"checkout_session_id": cs.ID, "id": cs.ClientReferenceID})
}
