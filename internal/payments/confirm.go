package payments

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/config"
	"github.com/tallybilling/tally/internal/credits"
	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/errs"
	"github.com/tallybilling/tally/internal/events"
	"github.com/tallybilling/tally/internal/stripeapi"
)

// confirmation is what a confirming event (or a sync) claims arrived. It is
// keyed by exactly one of paymentIntentID (Checkout, auto top-up) and
// invoiceID (pay by invoice): the key of the guard's row.
type confirmation struct {
	paymentIntentID string
	invoiceID       string
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
	// invoice, for an invoice confirmation, is the invoice as the event or
	// Stripe showed it.
	invoice *StripeInvoice
	// by is what confirms: recorded as the payment's confirmed_by.
	by ConfirmedBy
	// gate, when set, runs first in the transaction, on the locked
	// payment, before anything is written: skip ends the confirmation
	// there as a no-op (the event is still stored, see InlineStore), an
	// error rolls it back.
	gate func(p Payment) (skip bool, err error)
}

// PaymentIntentSucceeded is the only event that credits or fulfils a
// Checkout payment created under confirm_on=payment_intent. Before money
// moves the validation chain runs:
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
// packs and the payment.succeeded event. The PaymentIntent of a
// pay-by-invoice payment (linked by a refund or dispute of it) confirms
// nothing: its invoice does (the event is a no-op); any other naming such
// a payment is refused.
//
// Errors: ErrNotOurs (no tally metadata, no known PaymentIntent),
// *Rejection (the chain refused it), errs.Unavailable, others (retry; also
// when Stripe cannot be asked for the session).
func (s *Service) PaymentIntentSucceeded(ctx context.Context, ev EventRef, pi PaymentIntent) error {
	return s.paymentIntentSucceeded(ctx, ev, pi, ByPaymentIntent)
}

// paymentIntentSucceeded is PaymentIntentSucceeded, the confirmation
// recorded as by (ByPaymentIntent, or BySync when a sync retrieved it).
func (s *Service) paymentIntentSucceeded(ctx context.Context, ev EventRef, pi PaymentIntent, by ConfirmedBy) error {
	id, err := s.paymentFor(ctx, pi.Metadata, map[string]string{"payment_intent_id": pi.ID})
	if err != nil {
		return err
	}
	// First straight into the confirmation's transaction: what the read
	// below decides (the strategy, whether Stripe must be asked for the
	// session, whether a card is to be saved) is decided there from the
	// locked payment, before anything is written, which saves that read
	// whenever Stripe need not be asked (the session's event linked the
	// PaymentIntent first, as it usually does). When it must be, the
	// transaction ends there, with nothing written, and the read, the
	// question to Stripe and the confirmation follow as below: Stripe is
	// never asked under the payment's lock.
	saveCard := false
	c := confirmation{paymentIntentID: pi.ID, amountReceived: pi.AmountReceived, currency: pi.Currency,
		livemode: pi.Livemode, customerID: pi.Metadata[stripeapi.MetadataCustomerID], by: by,
		gate: func(p Payment) (bool, error) {
			if p.Method == MethodInvoice && pi.ID != "" && p.PaymentIntentID == pi.ID {
				// Only the invoice confirms a pay-by-invoice payment: its
				// own PaymentIntent (Stripe's, linked by a refund or a
				// dispute of it) moves nothing. Any other PaymentIntent
				// naming it is refused below.
				ev.completes(true)
				return true, nil
			}
			if s.strategy(p) != config.ConfirmOnPaymentIntent {
				// The legacy strategy, as below: nothing to write.
				ev.completes(true)
				return true, nil
			}
			if !sessionKnown(p, pi.ID) {
				return false, errAskStripe
			}
			saveCard = pi.PaymentMethod != "" && p.SavePaymentMethod && p.Method == MethodCheckout
			ev.completes(!saveCard)
			return false, nil
		}}
	err = s.confirm(ctx, ev, id, c)
	switch {
	case errors.Is(err, errAskStripe):
	case err != nil || !saveCard:
		return err
	default:
		return s.saveCardOfPayment(ctx, ev, id, pi)
	}
	// One read outside the transaction serves the strategy and the
	// question whether Stripe must be asked for the session: neither may
	// wait under the payment's lock, and lockForEvent checks again.
	p, err := load(ctx, s.db, id, false)
	var known *Payment
	switch {
	case err == nil:
		known = &p
	case !errs.Is(err, errs.NotFound):
		return err
	}
	strategy := s.checkout.ConfirmOn // an unknown payment: lockForEvent refuses it
	if known != nil {
		strategy = s.strategy(p)
	}
	if strategy != config.ConfirmOnPaymentIntent {
		// Legacy strategy: the Checkout Session events credit. The
		// PaymentIntent is linked by them, from the session tally created.
		ev.completes(true)
		return s.inEventTx(ctx, ev, id, pi.Livemode, pi.ID, func(*gorm.DB, Payment) error { return nil })
	}
	session, err := s.sessionToVerify(ctx, known, id, pi.ID)
	if err != nil {
		return err
	}
	// Whether a card is to be saved after the confirmation: without a
	// payment method, or for a payment whose buyer did not ask (both never
	// change once the payment exists), saveCardOfPayment has nothing to do,
	// so the confirmation completes the event.
	saveCard = pi.PaymentMethod != "" && (known == nil || (known.SavePaymentMethod && known.Method == MethodCheckout))
	ev.completes(!saveCard)
	c.gate, c.session = nil, session
	err = s.confirm(ctx, ev, id, c)
	if err != nil || !saveCard {
		return err
	}
	// Once credited, the card becomes the default when the buyer asked to
	// save it; a failure here retries the event, whose confirmation is then
	// a no-op.
	return s.saveCardOfPayment(ctx, ev, id, pi)
}

// strategyOf is the confirmation strategy of payment id: the one it was
// created under, or TALLY_CONFIRM_ON for a payment older than that record.
// It never changes once the payment exists, so it is read without a lock.
// An unknown payment answers the global one (lockForEvent refuses it).
func (s *Service) strategyOf(ctx context.Context, id string) (string, error) {
	p, err := load(ctx, s.db, id, false)
	if errs.Is(err, errs.NotFound) {
		return s.checkout.ConfirmOn, nil
	}
	if err != nil {
		return "", err
	}
	return s.strategy(p), nil
}

// strategy is p's confirmation strategy (see strategyOf).
func (s *Service) strategy(p Payment) string {
	if p.Method == MethodAutoTopUp {
		// Charged off-session without a Checkout Session: only its
		// PaymentIntent can confirm it, whatever TALLY_CONFIRM_ON says.
		return config.ConfirmOnPaymentIntent
	}
	if p.ConfirmOn != "" {
		return p.ConfirmOn
	}
	return s.checkout.ConfirmOn
}

// confirm is the one guard every confirmation goes through, whatever
// confirms: a PaymentIntent, a Checkout Session, an invoice, or a sync
// with Stripe. In one transaction on the locked payment it checks what c
// claims against what the payment expects, writes the guard's row (keyed
// by the PaymentIntent or the invoice; payment_id is unique too, so a
// payment is confirmed once whatever the key), moves the payment to
// succeeded, grants a pack's credits and appends payment.succeeded.
// A confirmation by the key already on record is a no-op.
func (s *Service) confirm(ctx context.Context, ev EventRef, paymentID string, c confirmation) error {
	return s.inEventTx(ctx, ev, paymentID, c.livemode, c.paymentIntentID, func(tx *gorm.DB, p Payment) error {
		if c.gate != nil {
			if skip, err := c.gate(p); skip || err != nil {
				return err
			}
		}
		byInvoice := c.invoiceID != ""
		if byInvoice == (c.paymentIntentID != "") {
			return reject("no PaymentIntent or invoice (exactly one) to confirm payment %s by", p.ID)
		}
		if c.customerID != "" && c.customerID != p.CustomerID {
			return reject("metadata names customer %s, but payment %s belongs to %s", c.customerID, p.ID, p.CustomerID)
		}
		if byInvoice != (p.Method == MethodInvoice) {
			what := "PaymentIntent " + c.paymentIntentID
			if byInvoice {
				what = "invoice " + c.invoiceID
			}
			return reject("payment %s is paid by %s and cannot be confirmed by %s", p.ID, p.Method, what)
		}
		// The guard's row is written only here, in the transaction that sets
		// succeeded_at: a payment that never succeeded has none, so it is
		// looked for only when succeeded_at is set (one round trip less for
		// every first confirmation). Should one exist all the same, the
		// insert below finds it.
		if p.SucceededAt != nil {
			if done, err := confirmedBefore(ctx, tx, p, c); done || err != nil {
				return err
			}
		}
		if byInvoice {
			if err := checkInvoice(p, c); err != nil {
				return err
			}
			if err := s.recordInvoice(ctx, tx, &p, *c.invoice); err != nil {
				return err
			}
		} else {
			if c.session != nil {
				if err := s.sessionNames(c.session, p, c.paymentIntentID); err != nil {
					return err
				}
				if err := s.recordSession(ctx, tx, &p, *c.session); err != nil {
					return err
				}
			}
			// An automatic top-up has no Checkout Session: its PaymentIntent
			// is the one tally created off-session, for the payment's amount.
			check := checkAmounts
			if p.Method == MethodAutoTopUp {
				check = checkOffSession
			}
			if err := check(p, c); err != nil {
				return err
			}
		}
		now := s.now()
		received := strings.ToLower(c.currency)
		allowed := Allowed(p.Status, Succeeded) // as transition decides
		// The guard's row, the transition and the payment's new columns in
		// one statement (one round trip instead of three), each write gated
		// on the one before as the statements were: the transition only
		// once the guard's row is in, the payment only once the transition
		// is. The confirmation has no conflict target: a second row for the
		// key or for the payment (any of the unique constraints) inserts
		// nothing; the transition's unique (payment_id, stripe_event_id)
		// keeps an event in the history once (see record), and a move the
		// state machine refuses is recorded as refused (then rolled back
		// with the refusal, as before).
		args := []any{db.NullIfEmpty(c.paymentIntentID), db.NullIfEmpty(c.invoiceID), p.ID, db.NullIfEmpty(ev.ID),
			p.ID, string(p.Status), string(Succeeded), allowed, db.NullIfEmpty(ev.ID), db.NullIfEmpty(ev.Type), "payment received", ev.source(),
			string(Succeeded), c.amountReceived, received, now, now, string(c.by)}
		// A delivery stored by this transaction (ev.Inline) records no
		// outcome after it, whose statement would ask whether an event
		// waits for this success (a refund or dispute that overtook it):
		// this statement asks instead. Asked here, under the payment's
		// lock, rather than in the event's insert (before the lock), it
		// sees a wait recorded by an event that held the lock before this
		// transaction; one recorded later sees this success (WaitOver).
		// Waits are keyed as the confirmation is (Waiting.For).
		wakeFor := ""
		if ev.Inline != nil && !ev.Inline.stored {
			wakeFor = c.paymentIntentID + c.invoiceID // exactly one is set
		}
		args = append(args, p.ID, allowed, wakeFor, wakeFor)
		query := confirmByInvoiceQuery
		if !byInvoice {
			query = confirmByPaymentIntentQuery
			args = append(args, c.paymentIntentID)
		}
		var wrote struct{ Confirmed, Recorded, Updated, Waiting bool }
		_, err := db.ScanDirect(ctx, tx, query, args, &wrote.Confirmed, &wrote.Recorded, &wrote.Updated, &wrote.Waiting)
		if err != nil {
			return db.Translate(err, map[string]errs.Code{"payments_payment_intent_id_key": errs.Conflict})
		}
		if !wrote.Confirmed {
			if p.SucceededAt == nil {
				if done, err := confirmedBefore(ctx, tx, p, c); done || err != nil {
					if err == nil {
						// Found only now: roll back what was written since.
						err = errEventApplied
					}
					return err
				}
			}
			return reject("%s already confirmed another payment than %s", c.key(), p.ID)
		}
		if !wrote.Recorded {
			return errEventApplied // as record: the event is in the history already
		}
		if !allowed {
			return reject("payment %s is %s and cannot become succeeded", p.ID, p.Status)
		}
		if !wrote.Updated {
			return fmt.Errorf("payments: payment %s vanished under its lock", p.ID)
		}
		if wakeFor != "" {
			ev.Inline.waiting = wrote.Waiting
		}
		succeeded := events.PaymentSucceeded{
			PaymentID: p.ID, Item: p.Item, ItemKind: string(p.ItemKind), Quantity: p.Quantity,
			Amount: c.amountReceived, Currency: received, AmountTax: p.Checkout.AmountTax,
			Price: p.Amount, PriceCurrency: p.Currency, Credits: p.Credits,
			PaymentIntentID: c.paymentIntentID, InvoiceID: c.invoiceID, Method: string(p.Method), ConfirmedBy: string(c.by),
			StripeEventID: ev.ID,
		}
		appended := false
		if p.ItemKind == KindCreditPack && p.Credits > 0 {
			expires := p.CreditsExpiry().After(now)
			meta := map[string]string{"payment_id": p.ID, "item": p.Item}
			if byInvoice {
				meta["invoice_id"] = c.invoiceID
			} else {
				meta["payment_intent_id"] = c.paymentIntentID
			}
			// The grant's statement appends payment.succeeded too (one
			// round trip less), unless an automatic top-up's bookkeeping
			// comes between them in the feed.
			var then events.Payload
			if p.Method != MethodAutoTopUp {
				then, appended = succeeded, true
			}
			_, err := credits.GrantThen(ctx, tx, s.now, credits.GrantInput{
				CustomerID: p.CustomerID,
				Amount:     p.Credits,
				Reason:     fmt.Sprintf("purchase of %d × %s", p.Quantity, p.Item),
				Source:     credits.SourcePurchase,
				PaymentID:  p.ID,
				ExpiresAt:  expires,
				Metadata:   meta,
			}, then)
			if err != nil {
				return err
			}
		}
		if p.Method == MethodAutoTopUp {
			if err := s.autoTopUpSucceeded(ctx, tx, p); err != nil {
				return err
			}
		}
		if appended {
			return nil
		}
		return events.Append(ctx, tx, p.CustomerID, succeeded)
	})
}

// confirm's statement: the guard's row, the transition and the payment's
// new columns, each write gated on the one before (see confirm), and
// whether events wait for this success. A direct statement
// (db.ScanDirect): it runs for every confirmed payment, and gorm wrote
// its text out again at each call. By PaymentIntent it links the
// payment to it too ($23).
const (
	confirmQueryHead = `WITH guard AS (
				INSERT INTO payment_confirmations (payment_intent_id, invoice_id, payment_id, stripe_event_id)
				VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING RETURNING 1
			), history AS (
				INSERT INTO payment_transitions (payment_id, from_status, to_status, applied, stripe_event_id, stripe_event_type, reason, source)
				SELECT $5, $6, $7, $8::boolean, $9, $10, $11, $12 WHERE EXISTS (SELECT 1 FROM guard)
				ON CONFLICT (payment_id, stripe_event_id) WHERE stripe_event_id IS NOT NULL DO NOTHING RETURNING 1
			), moved AS (
				UPDATE payments SET status = $13, amount_received = $14, received_currency = $15, succeeded_at = $16, failure_reason = NULL,
					updated_at = $17, confirmed_by = $18`
	confirmQueryTail = `
				WHERE id = $19 AND $20::boolean AND EXISTS (SELECT 1 FROM history) RETURNING 1
			)
			SELECT EXISTS (SELECT 1 FROM guard) AS confirmed, EXISTS (SELECT 1 FROM history) AS recorded,
				EXISTS (SELECT 1 FROM moved) AS updated,
				$21::text <> '' AND EXISTS (SELECT 1 FROM stripe_events w
					WHERE w.status IN ('failed', 'parked') AND w.waiting_for IS NOT NULL AND w.waiting_for = $22::text) AS waiting`
	confirmByInvoiceQuery       = confirmQueryHead + confirmQueryTail
	confirmByPaymentIntentQuery = confirmQueryHead + `, payment_intent_id = $23` + confirmQueryTail
)

// errAskStripe ends a confirmation's transaction whose gate found that the
// Checkout Session must be retrieved from Stripe first (paymentIntentSucceeded).
var errAskStripe = errors.New("payments: the Checkout Session must be asked for first")

// confirmedBefore looks for payment p's confirmation: by c's key already
// (done: a redelivery, a replay, a sync or the other strategy; nothing to
// do), by another key (a *Rejection), or none (not done).
func confirmedBefore(ctx context.Context, tx *gorm.DB, p Payment, c confirmation) (done bool, err error) {
	var confirmed confirmationRow
	err = tx.WithContext(ctx).Where("payment_id = ?", p.ID).Take(&confirmed).Error
	switch {
	case errors.Is(err, gorm.ErrRecordNotFound): // not confirmed yet
		return false, nil
	case err != nil:
		return false, db.Translate(err, nil)
	case c.invoiceID != "" && confirmed.InvoiceID != nil && *confirmed.InvoiceID == c.invoiceID,
		c.invoiceID == "" && confirmed.PaymentIntentID != nil && *confirmed.PaymentIntentID == c.paymentIntentID:
		return true, nil
	}
	return false, reject("payment %s was already confirmed by %s", p.ID, confirmed.key())
}

// key names what confirmed a payment, for messages.
func (r confirmationRow) key() string {
	if r.InvoiceID != nil {
		return "invoice " + *r.InvoiceID
	}
	if r.PaymentIntentID != nil {
		return "PaymentIntent " + *r.PaymentIntentID
	}
	return "nothing on record"
}

// key names what c confirms by, for messages.
func (c confirmation) key() string {
	if c.invoiceID != "" {
		return "invoice " + c.invoiceID
	}
	return "PaymentIntent " + c.paymentIntentID
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
	id, strategy, err := s.linkSession(ctx, ev, cs, func(strategy string) bool {
		// Whether linking completes the event: nothing below moves money
		// or subscribes (the conditions of the steps that follow).
		switch {
		case cs.Mode == "subscription":
			return cs.PaymentStatus != "paid" && cs.PaymentStatus != "no_payment_required"
		case strategy == config.ConfirmOnCheckoutSession:
			return cs.PaymentStatus != "paid"
		}
		return true
	})
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
	if strategy == config.ConfirmOnCheckoutSession && cs.PaymentStatus == "paid" {
		return s.confirmSession(ctx, ev, id, cs, ByCheckoutSession)
	}
	return nil
}

// CheckoutSessionAsyncSucceeded credits under confirm_on=checkout_session
// (a delayed payment method cleared); otherwise it only links ids, since
// payment_intent.succeeded does the crediting.
func (s *Service) CheckoutSessionAsyncSucceeded(ctx context.Context, ev EventRef, cs CheckoutSession) error {
	id, strategy, err := s.linkSession(ctx, ev, cs, func(strategy string) bool {
		return strategy != config.ConfirmOnCheckoutSession || cs.Mode == "subscription"
	})
	if err != nil {
		return err
	}
	if strategy == config.ConfirmOnCheckoutSession && cs.Mode != "subscription" {
		return s.confirmSession(ctx, ev, id, cs, ByCheckoutSession)
	}
	return nil
}

// linkSession finds the payment a session event names and records the
// session's Stripe ids and amounts on it, as every successful session event
// does first; the session must be the one tally created for the payment.
// It answers the payment and its confirmation strategy (strategyOf).
// last says, given the strategy, whether linking completes the event (no
// step of the caller follows it: see EventRef.completes).
// Errors: ErrNotOurs, *Rejection, errs.Unavailable.
func (s *Service) linkSession(ctx context.Context, ev EventRef, cs CheckoutSession, last func(strategy string) bool) (id, strategy string, err error) {
	id, err = s.sessionPayment(ctx, cs)
	if err != nil {
		return "", "", err
	}
	err = s.inEventTx(ctx, ev, id, cs.Livemode, cs.PaymentIntent, func(tx *gorm.DB, p Payment) error {
		// The strategy never changes once the payment exists: read here,
		// under the lock the link takes anyway, it costs no extra query.
		strategy = s.strategy(p)
		ev.completes(last(strategy))
		return s.recordSession(ctx, tx, &p, cs)
	})
	if err != nil {
		return "", "", err
	}
	if strategy == "" {
		// A redelivery: the link was made already and fn did not run.
		if strategy, err = s.strategyOf(ctx, id); err != nil {
			return "", "", err
		}
	}
	return id, strategy, nil
}

// confirmSession confirms the payment by its own paid Checkout Session cs
// (its PaymentIntent is the guard's key), as a session event or a sync saw it.
func (s *Service) confirmSession(ctx context.Context, ev EventRef, paymentID string, cs CheckoutSession, by ConfirmedBy) error {
	if cs.AmountTotal == nil {
		return reject("checkout session %s has no amount_total", cs.ID)
	}
	if cs.PaymentIntent == "" {
		return reject("checkout session %s names no PaymentIntent to confirm payment %s by", cs.ID, paymentID)
	}
	return s.confirm(ctx, ev, paymentID, confirmation{paymentIntentID: cs.PaymentIntent, amountReceived: *cs.AmountTotal, currency: cs.Currency,
		livemode: cs.Livemode, customerID: cs.Metadata[stripeapi.MetadataCustomerID], session: &cs, by: by})
}
