package payments

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"gorm.io/gorm"
	"gorm.io/gorm/clause"

	"github.com/tallybilling/tally/internal/config"
	"github.com/tallybilling/tally/internal/credits"
	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/errs"
	"github.com/tallybilling/tally/internal/events"
	"github.com/tallybilling/tally/internal/stripeapi"
)

// confirmation is what a confirming event claims arrived.
type confirmation struct {
	paymentIntentID string
	amountReceived  int64
	currency        string
	livemode        bool
	// customerID is our customer id from the object's metadata, if any.
	customerID string
	// session, when set, is the Checkout Session the confirmation is
	// checked against: the event's own (confirm_on=checkout_session) or the
	// one retrieved from Stripe because the payment did not know yet which
	// PaymentIntent its session names or what it charged.
	session *CheckoutSession
}

// PaymentIntentSucceeded is the only event that credits or fulfils under
// confirm_on=payment_intent. Before money moves the validation chain runs:
// the metadata names a payment of ours (and, when it names a customer, that
// payment's customer); the PaymentIntent is the one the Checkout Session
// tally created for the payment names (when the payment does not know yet,
// the session is retrieved from Stripe: a PaymentIntent tally did not
// create, carrying copied metadata and the right amount, is refused); the
// session's amount before tax, in the catalog currency, is the catalog
// price; amount_received and currency are the session's total; livemode
// matches our key (see checkAmounts). Then, in one transaction: the
// confirmation row keyed by the PaymentIntent id (a second delivery finds
// it and does nothing), the transition to succeeded, the credit grant for
// packs and the payment.succeeded event.
//
// Errors: ErrNotOurs (no tally metadata, no known PaymentIntent),
// *Rejection (the chain refused it), errs.Unavailable, others (retry; also
// when Stripe cannot be asked for the session).
func (s *Service) PaymentIntentSucceeded(ctx context.Context, ev EventRef, pi PaymentIntent) error {
	id, err := s.paymentFor(ctx, pi.Metadata, map[string]string{"payment_intent_id": pi.ID})
	if err != nil {
		return err
	}
	if s.checkout.ConfirmOn != config.ConfirmOnPaymentIntent {
		// Legacy strategy: the Checkout Session events credit. The
		// PaymentIntent is linked by them, from the session tally created.
		return s.inEventTx(ctx, ev, id, pi.Livemode, pi.ID, func(*gorm.DB, Payment) error { return nil })
	}
	session, err := s.sessionToVerify(ctx, id, pi.ID)
	if err != nil {
		return err
	}
	err = s.confirm(ctx, ev, id, confirmation{paymentIntentID: pi.ID, amountReceived: pi.AmountReceived, currency: pi.Currency,
		livemode: pi.Livemode, customerID: pi.Metadata[stripeapi.MetadataCustomerID], session: session})
	if err != nil {
		return err
	}
	// Once credited, the card becomes the default when the buyer asked to
	// save it; a failure here retries the event, whose confirmation is then
	// a no-op.
	return s.saveCardOfPayment(ctx, ev, id, pi)
}

func (s *Service) confirm(ctx context.Context, ev EventRef, paymentID string, c confirmation) error {
	return s.inEventTx(ctx, ev, paymentID, c.livemode, c.paymentIntentID, func(tx *gorm.DB, p Payment) error {
		if c.paymentIntentID == "" {
			return reject("no PaymentIntent to confirm payment %s by", p.ID)
		}
		if c.customerID != "" && c.customerID != p.CustomerID {
			return reject("metadata names customer %s, but payment %s belongs to %s", c.customerID, p.ID, p.CustomerID)
		}
		var confirmed confirmationRow
		err := tx.WithContext(ctx).Where("payment_id = ?", p.ID).Take(&confirmed).Error
		switch {
		case errors.Is(err, gorm.ErrRecordNotFound): // not confirmed yet
		case err != nil:
			return db.Translate(err, nil)
		case confirmed.PaymentIntentID == c.paymentIntentID:
			return nil // already confirmed: a redelivery, a replay or the other strategy
		default:
			return reject("payment %s was already confirmed by PaymentIntent %s", p.ID, confirmed.PaymentIntentID)
		}
		if c.session != nil {
			if err := s.sessionNames(c.session, p, c.paymentIntentID); err != nil {
				return err
			}
			if err := s.recordSession(ctx, tx, &p, *c.session); err != nil {
				return err
			}
		}
		check := checkAmounts
		if p.Method == MethodAutoTopUp {
			check = checkOffSession
		}
		if err := check(p, c); err != nil {
			return err
		}
		res := tx.WithContext(ctx).Model(&confirmationRow{}).
			Clauses(clause.OnConflict{Columns: []clause.Column{{Name: "payment_intent_id"}}, DoNothing: true}).
			Create(map[string]any{"payment_intent_id": c.paymentIntentID, "payment_id": p.ID, "stripe_event_id": db.NullIfEmpty(ev.ID)})
		if res.Error != nil {
			return db.Translate(res.Error, nil)
		}
		if res.RowsAffected == 0 {
			return reject("PaymentIntent %s already confirmed another payment", c.paymentIntentID)
		}
		ok, err := transition(ctx, tx, p, Succeeded, ev, "payment received")
		if err != nil {
			return err
		}
		if !ok {
			return reject("payment %s is %s and cannot become succeeded", p.ID, p.Status)
		}
		now := s.now()
		received := strings.ToLower(c.currency)
		err = tx.WithContext(ctx).Model(&paymentRow{}).Where("id = ?", p.ID).Updates(map[string]any{
			"status": string(Succeeded), "amount_received": c.amountReceived, "received_currency": received,
			"payment_intent_id": c.paymentIntentID, "succeeded_at": now, "failure_reason": nil, "updated_at": now,
		}).Error
		if err != nil {
			return db.Translate(err, map[string]errs.Code{"payments_payment_intent_id_key": errs.Conflict})
		}
		if p.ItemKind == KindCreditPack && p.Credits > 0 {
			expires := p.CreditsExpiry().After(now)
			_, err := credits.Grant(ctx, tx, s.now, credits.GrantInput{
				CustomerID: p.CustomerID,
				Amount:     p.Credits,
				Reason:     fmt.Sprintf("purchase of %d × %s", p.Quantity, p.Item),
				Source:     credits.SourcePurchase,
				PaymentID:  p.ID,
				ExpiresAt:  expires,
				Metadata:   map[string]string{"payment_id": p.ID, "item": p.Item, "payment_intent_id": c.paymentIntentID},
			})
			if err != nil {
				return err
			}
		}
		if p.Method == MethodAutoTopUp {
			if err := s.autoTopUpSucceeded(ctx, tx, p); err != nil {
				return err
			}
		}
		return events.Append(ctx, tx, p.CustomerID, events.PaymentSucceeded{
			PaymentID: p.ID, Item: p.Item, ItemKind: string(p.ItemKind), Quantity: p.Quantity,
			Amount: c.amountReceived, Currency: received, AmountTax: p.Checkout.AmountTax,
			Price: p.Amount, PriceCurrency: p.Currency, Credits: p.Credits,
			PaymentIntentID: c.paymentIntentID, StripeEventID: ev.ID,
		})
	})
}

// CheckoutSessionCompleted links the session to its PaymentIntent, Stripe
// customer, invoice and subscription and records its payment_status. It
// moves money only under confirm_on=checkout_session with
// payment_status=paid (through the same confirmation guard as
// PaymentIntentSucceeded). A metered plan's subscription session succeeds
// here (no money, no credits). Errors: as PaymentIntentSucceeded.
func (s *Service) CheckoutSessionCompleted(ctx context.Context, ev EventRef, cs CheckoutSession) error {
	if cs.Mode == "setup" {
		return s.SetupSessionCompleted(ctx, ev, cs)
	}
	id, err := s.linkSession(ctx, ev, cs)
	if err != nil {
		return err
	}
	s.logger.InfoContext(ctx, "checkout session completed", "payment_id", id, "checkout_session_id", cs.ID, "payment_status", cs.PaymentStatus)
	if cs.Mode == "subscription" {
		if cs.PaymentStatus == "paid" || cs.PaymentStatus == "no_payment_required" {
			return s.subscribed(ctx, ev, id, cs)
		}
		return nil
	}
	if s.checkout.ConfirmOn == config.ConfirmOnCheckoutSession && cs.PaymentStatus == "paid" {
		return s.confirmSession(ctx, ev, id, cs)
	}
	return nil
}

// CheckoutSessionAsyncSucceeded credits under confirm_on=checkout_session
// (a delayed payment method cleared); otherwise it only links ids, since
// payment_intent.succeeded does the crediting.
func (s *Service) CheckoutSessionAsyncSucceeded(ctx context.Context, ev EventRef, cs CheckoutSession) error {
	id, err := s.linkSession(ctx, ev, cs)
	if err != nil {
		return err
	}
	if s.checkout.ConfirmOn == config.ConfirmOnCheckoutSession && cs.Mode != "subscription" {
		return s.confirmSession(ctx, ev, id, cs)
	}
	return nil
}

// linkSession finds the payment a session event names and records the
// session's Stripe ids and amounts on it, as every successful session event
// does first; the session must be the one tally created for the payment.
// Errors: ErrNotOurs, *Rejection, errs.Unavailable.
func (s *Service) linkSession(ctx context.Context, ev EventRef, cs CheckoutSession) (string, error) {
	id, err := s.sessionPayment(ctx, cs)
	if err != nil {
		return "", err
	}
	return id, s.inEventTx(ctx, ev, id, cs.Livemode, cs.PaymentIntent, func(tx *gorm.DB, p Payment) error {
		return s.recordSession(ctx, tx, &p, cs)
	})
}

func (s *Service) confirmSession(ctx context.Context, ev EventRef, paymentID string, cs CheckoutSession) error {
	if cs.AmountTotal == nil {
		return reject("checkout session %s has no amount_total", cs.ID)
	}
	return s.confirm(ctx, ev, paymentID, confirmation{paymentIntentID: cs.PaymentIntent, amountReceived: *cs.AmountTotal, currency: cs.Currency,
		livemode: cs.Livemode, customerID: cs.Metadata[stripeapi.MetadataCustomerID], session: &cs})
}
