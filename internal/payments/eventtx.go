package payments

import (
	"context"
	"errors"
	"net/http"

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

// chargePayment finds the payment a charge or a dispute names, as
// paymentFor, and when neither its metadata nor a PaymentIntent we linked
// names one, by asking Stripe for its PaymentIntent: a charge.refunded or
// charge.dispute.* can arrive before anything linked the PaymentIntent to
// its payment (Stripe redelivers out of order after a webhook outage), and
// a dispute never carries our metadata, but the PaymentIntent does
// (checkout and the top-up worker put tally_payment_id there). Ignored as
// not ours, the event was lost for good: the success then granted the
// credits and nothing took them back. Found this way, the event applies
// (or waits for the success) exactly like one of a linked PaymentIntent;
// lockForEvent still checks the event's livemode, and the refund or
// dispute that the PaymentIntent is the payment's once it is linked.
//
// A PaymentIntent without tally metadata may be an invoice's: Stripe
// creates it when an invoice is finalized, with no metadata of ours, and a
// pay-by-invoice payment (confirmed by invoice.paid) never learns it.
// Stripe is then asked which invoice it paid (InvoicesPaidBy); when that
// invoice is one of our payments', the event is that payment's, and
// viaInvoice says Stripe proved the PaymentIntent paid its invoice: the
// refund or dispute links it to a pay-by-invoice payment
// (linkInvoicePaymentIntent), so later events of it find the payment
// directly and the checks that the PaymentIntent is the payment's hold.
//
// Called before any transaction, so Stripe is never asked under a
// payment's lock. A PaymentIntent Stripe does not know (404), or without
// tally metadata and paying no invoice of ours (none, another
// integration's invoice), or naming a payment this database does not hold
// (another deployment sharing the Stripe account), stays ErrNotOurs: other
// integrations share Stripe accounts. Stripe not answering (for the
// invoice list, a 404 too) is its *stripeapi.Error, which the intake
// retries.
// Errors: ErrNotOurs, *Rejection (livemode, a PaymentIntent paying
// invoices of two payments), *stripeapi.Error, errs.Unavailable.
func (s *Service) chargePayment(ctx context.Context, metadata map[string]string, paymentIntentID string) (id string, viaInvoice bool, err error) {
	id, err = s.paymentFor(ctx, metadata, map[string]string{"payment_intent_id": paymentIntentID})
	if !errors.Is(err, ErrNotOurs) || paymentIntentID == "" || s.stripe == nil {
		return id, false, err
	}
	pi, err := s.stripe.GetPaymentIntent(ctx, paymentIntentID)
	if notFound(err) {
		return "", false, ErrNotOurs
	}
	if err != nil {
		return "", false, err
	}
	named := pi.Metadata[stripeapi.MetadataPaymentID]
	if named == "" {
		id, err = s.invoicePaidBy(ctx, pi)
		return id, err == nil, err
	}
	if pi.Livemode != s.livemode {
		return "", false, reject("PaymentIntent %s livemode=%t does not match our Stripe key (livemode=%t)", paymentIntentID, pi.Livemode, s.livemode)
	}
	if id, err = findID(ctx, s.db, "id", named); err != nil || id == "" {
		if err == nil {
			err = ErrNotOurs
		}
		return "", false, err
	}
	return id, false, nil
}

// invoicePaidBy is the pay-by-invoice payment whose invoice PaymentIntent
// pi paid, as Stripe's Invoice Payments answer (see chargePayment). An
// invoice payment Stripe shows canceled, or of another PaymentIntent,
// proves nothing; one of our invoices not paid (open) is refused.
// Stripe not answering the list, a 404 included, is its *stripeapi.Error.
// Errors: ErrNotOurs, *Rejection, *stripeapi.Error, errs.Unavailable.
func (s *Service) invoicePaidBy(ctx context.Context, pi stripeapi.PaymentIntent) (string, error) {
	paid, err := s.stripe.InvoicesPaidBy(ctx, pi.ID)
	if err != nil {
		// Even a 404: Stripe just returned the PaymentIntent, so the list
		// not being found says nothing about whose it is. Ignored, the
		// refund was lost for good; failed, it is retried (and parked for
		// an operator after its retry budget).
		return "", err
	}
	found, invoice := "", ""
	for _, ip := range paid {
		if ip.Invoice == "" || ip.Status == "canceled" || (ip.PaymentIntent != "" && ip.PaymentIntent != pi.ID) {
			continue
		}
		id, err := invoicePaymentID(ctx, s.db, ip.Invoice)
		if err != nil {
			return "", err
		}
		if id != "" && ip.Status != "paid" {
			// Open: the PaymentIntent has not paid our invoice (yet), so
			// its refund is no proof to take the credits back on, nor to
			// forget. An operator looks.
			return "", reject("PaymentIntent %s has a %s, not paid, invoice payment %s of invoice %s of payment %s", pi.ID, ip.Status, ip.ID, ip.Invoice, id)
		}
		switch {
		case id == "" || id == found:
		case found != "":
			return "", reject("PaymentIntent %s paid invoice %s of payment %s and invoice %s of payment %s", pi.ID, invoice, found, ip.Invoice, id)
		default:
			if pi.Livemode != s.livemode || ip.Livemode != s.livemode {
				return "", reject("PaymentIntent %s (livemode=%t) paid invoice %s (livemode=%t), but our Stripe key is livemode=%t",
					pi.ID, pi.Livemode, ip.Invoice, ip.Livemode, s.livemode)
			}
			found, invoice = id, ip.Invoice
		}
	}
	if found == "" {
		return "", ErrNotOurs
	}
	return found, nil
}

// invoicePaymentID is the pay-by-invoice payment of invoice, "" when none:
// another payment that learnt an invoice (a plan's first, a Checkout
// Session's) has a PaymentIntent with our metadata or none to act on, and
// its invoice's refund stays ignored. Errors: errs.Unavailable.
func invoicePaymentID(ctx context.Context, gdb *gorm.DB, invoice string) (string, error) {
	var ids []string
	err := gdb.WithContext(ctx).Model(&paymentRow{}).Where("invoice_id = ? AND method = ?", invoice, string(MethodInvoice)).
		Limit(1).Pluck("id", &ids).Error
	if err != nil || len(ids) == 0 {
		return "", db.Translate(err, nil)
	}
	return ids[0], nil
}

// notFound reports whether err is Stripe answering 404.
func notFound(err error) bool {
	e, ok := stripeapi.AsError(err)
	return ok && e.StatusCode == http.StatusNotFound
}

// linkInvoicePaymentIntent links PaymentIntent pi to pay-by-invoice
// payment p (tx holds its lock) when viaInvoice says Stripe proved pi paid
// p's invoice (chargePayment) and p has no PaymentIntent yet: a refund or
// dispute of it then passes the checks that its PaymentIntent is the
// payment's, and later events of pi find p without asking Stripe. Called
// once p succeeded (a refund or dispute that waits rolls back anyway).
// Another payment holding pi already is a *Rejection (the unique link).
// Errors: *Rejection, errs.Unavailable.
func (s *Service) linkInvoicePaymentIntent(ctx context.Context, tx *gorm.DB, p *Payment, viaInvoice bool, pi string) error {
	if !viaInvoice || pi == "" || p.Method != MethodInvoice || p.PaymentIntentID != "" {
		return nil
	}
	if err := s.applyLinks(ctx, tx, *p, map[string]string{"payment_intent_id": pi}); err != nil {
		return err
	}
	p.PaymentIntentID = pi
	return nil
}

// lockForEvent locks the payment an event names (tx must be a transaction)
// and runs the checks every event passes before it may touch a payment: the
// payment exists, the event's livemode is our key's, and the event's
// PaymentIntent (when it names one) is the payment's (when it has one). A
// Stripe object can carry a payment's metadata without being its payment.
// An event already in the payment's history is errEventApplied.
//
// storedHere says tx stored the event itself, first (an InlineStore whose
// insert went in): then no other transaction can be applying it (a copy of
// the delivery waits on that insert, and the retry worker, a replay or a
// catch-up only process stored events), so whatever applied it committed
// before tx began, and the lock's statement may ask the history too, one
// round trip less. Otherwise the history is asked after the lock: see
// below.
// Errors: *Rejection, errEventApplied, errs.Unavailable.
func (s *Service) lockForEvent(ctx context.Context, tx *gorm.DB, ev EventRef, paymentID string, livemode bool, paymentIntentID string, storedHere bool) (Payment, error) {
	var p Payment
	var seen bool
	var err error
	asked := storedHere && ev.ID != ""
	if asked {
		p, seen, err = loadLockedApplied(ctx, tx, paymentID, ev.ID)
	} else {
		p, err = load(ctx, tx, paymentID, true)
	}
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
	// A statement of its own, after the lock: asked in the locking
	// statement, it would read the history as of before that statement
	// waited for the lock (READ COMMITTED takes the snapshot when a
	// statement starts), and miss the event a transaction holding the lock
	// just applied.
	if !asked {
		if seen, err = eventApplied(ctx, tx, p.ID, ev); err != nil {
			return Payment{}, err
		}
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
//
// With ev.Inline (a webhook delivery not stored yet), the first such
// transaction also stores the Stripe event, as its first statement: see
// InlineStore.
func (s *Service) inEventTx(ctx context.Context, ev EventRef, paymentID string, livemode bool, paymentIntentID string, fn func(tx *gorm.DB, p Payment) error) error {
	inline := ev.Inline
	if inline != nil && inline.stored {
		inline = nil // an earlier step of the same event stored it
	}
	var processed bool
	err := db.InTx(ctx, s.db, func(tx *gorm.DB) error {
		if inline != nil {
			// First, before the payment's lock: a copy of the delivery
			// racing this one waits here for this transaction, holding
			// nothing (so no two wait for each other), and then finds the
			// event stored (or, should this transaction roll back, stores
			// and applies it itself); it costs the payment nothing. Stored
			// as processed, unless fn says a step follows (below).
			if err := inline.Store(ctx, tx, true); err != nil {
				return err
			}
		}
		p, err := s.lockForEvent(ctx, tx, ev, paymentID, livemode, paymentIntentID, inline != nil)
		if err != nil {
			return err
		}
		if err := fn(tx, p); err != nil {
			return err
		}
		if inline == nil {
			return nil
		}
		if processed = inline.final; !processed {
			return inline.Pending(ctx, tx)
		}
		return nil
	})
	if err == nil && inline != nil {
		inline.stored, inline.processed = true, processed
	}
	if errors.Is(err, errEventApplied) {
		return nil
	}
	return err
}

// InlineStore lets the webhook intake store a delivered Stripe event in
// the transaction that applies it, rather than in a transaction (and a
// synchronous commit) of its own before it: internal/stripehook sets it on
// the EventRef of the event types whose processing begins with inEventTx,
// and payments calls Store as the first statement of the first inEventTx
// transaction of the event. The delivery is acknowledged only once that
// transaction committed (Stored), so it is acknowledged only once durably
// stored, as before; when the transaction rolls back, the event was not
// stored either, and the intake stores it as it always did and records
// what processing did (a failure is retried, a refusal parked).
//
// The event is stored as processed, so no further statement records its
// outcome, when that transaction completes it: nothing of it remains to be
// done afterwards (see EventRef.completes). Otherwise Pending turns it, in
// the same transaction, into what a delivery stored before processing is
// (received, under a lease, for the retry worker should this instance
// die), and its outcome is recorded after the remaining steps, as before.
type InlineStore struct {
	// Store inserts the event in tx (an error rolls tx back: Store
	// answers one when a copy of the delivery stored the event first).
	Store func(ctx context.Context, tx *gorm.DB, processed bool) error
	// Pending turns the event Store inserted as processed into one still
	// to be processed, in the same transaction tx.
	Pending func(ctx context.Context, tx *gorm.DB) error

	final     bool
	stored    bool
	processed bool
	// waiting: the confirmation in the storing transaction found events
	// waiting for its success (its PaymentIntent's or invoice's: see
	// confirm).
	waiting bool
}

// Waiting reports whether the transaction that stored the event confirmed
// a payment some stored events wait for (a refund or dispute that overtook
// its success): the intake wakes them once that transaction committed.
func (s *InlineStore) Waiting() bool { return s.stored && s.waiting }

// Stored reports whether a transaction that stored the event committed, and
// whether it stored it as processed.
func (s *InlineStore) Stored() (stored, processed bool) { return s.stored, s.processed }

// completes says, inside the transaction that stores the event (before
// its fn returns), whether that transaction applies all of the event
// (final) or a step follows it. Without it the event is stored as not done
// yet, which is always safe: its outcome is then recorded once every step
// ran.
func (ev EventRef) completes(final bool) {
	if ev.Inline != nil && !ev.Inline.stored {
		ev.Inline.final = final
	}
}

// sessionPayment finds the payment a Checkout Session names, as paymentFor.
func (s *Service) sessionPayment(ctx context.Context, cs CheckoutSession) (string, error) {
	return s.paymentFor(ctx, cs.Metadata, map[string]string{"checkout_session_id": cs.ID, "id": cs.ClientReferenceID})
}
