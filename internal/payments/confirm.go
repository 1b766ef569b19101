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

// The Stripe objects, reduced to the fields tally acts on. stripehook fills
// them from events of any API version.

// PaymentIntent is a Stripe PaymentIntent.
type PaymentIntent struct {
	ID             string
	Amount         int64
	AmountReceived int64
	Currency       string
	Status         string
	Livemode       bool
	Metadata       map[string]string
	// LastError is last_payment_error.message (or its code), for failures.
	LastError          string
	CancellationReason string
}

// CheckoutSession is a Stripe Checkout Session.
type CheckoutSession struct {
	ID                string
	Mode              string
	Status            string
	PaymentStatus     string // paid, unpaid, no_payment_required
	PaymentIntent     string
	Customer          string
	Invoice           string
	Subscription      string
	ClientReferenceID string
	// Currency and the amounts are what the buyer is charged: before
	// discounts and taxes, after them, and the tax Stripe Tax added.
	Currency       string
	AmountSubtotal *int64
	AmountTotal    *int64
	AmountTax      *int64
	// Conversion is currency_conversion, set when Adaptive Pricing converted
	// the session into the buyer's currency (sessions created before
	// 2025-03-31): its amounts are in the currency the session was created in.
	Conversion *CurrencyConversion
	Livemode   bool
	Metadata   map[string]string
}

// CurrencyConversion is a Checkout Session's amounts in the currency it
// was created in, before Adaptive Pricing converted them.
type CurrencyConversion struct {
	SourceCurrency string
	AmountSubtotal int64
	AmountTotal    int64
}

// totals are the session's amounts, when it carries them.
func (cs CheckoutSession) totals() (CheckoutTotals, bool) {
	if cs.Currency == "" || cs.AmountSubtotal == nil || cs.AmountTotal == nil {
		return CheckoutTotals{}, false
	}
	t := CheckoutTotals{Currency: strings.ToLower(cs.Currency), AmountSubtotal: *cs.AmountSubtotal, AmountTotal: *cs.AmountTotal}
	if cs.AmountTax != nil {
		t.AmountTax = *cs.AmountTax
	}
	if c := cs.Conversion; c != nil && c.SourceCurrency != "" {
		t.SourceCurrency, t.SourceAmountSubtotal = strings.ToLower(c.SourceCurrency), c.AmountSubtotal
	}
	return t, true
}

// fromStripe is a retrieved session as the confirmation reads it.
func fromStripe(s stripeapi.CheckoutSession) CheckoutSession {
	cs := CheckoutSession{
		ID: s.ID, Mode: s.Mode, Status: s.Status, PaymentStatus: s.PaymentStatus, PaymentIntent: s.PaymentIntentID,
		Currency: s.Currency, AmountSubtotal: &s.AmountSubtotal, AmountTotal: &s.AmountTotal, AmountTax: &s.AmountTax,
		Livemode: s.Livemode, Metadata: s.Metadata,
	}
	if c := s.Conversion; c != nil {
		cs.Conversion = &CurrencyConversion{SourceCurrency: c.SourceCurrency, AmountSubtotal: c.AmountSubtotal, AmountTotal: c.AmountTotal}
	}
	return cs
}

// Charge is a Stripe Charge (charge.refunded).
type Charge struct {
	ID             string
	PaymentIntent  string
	Amount         int64
	AmountRefunded int64
	Currency       string
	Livemode       bool
	Metadata       map[string]string
}

// Subscription is a Stripe Subscription (customer.subscription.*).
type Subscription struct {
	ID       string
	Customer string
	Status   string
	Livemode bool
	Metadata map[string]string
}

// paymentFor finds the payment a Stripe object names: by our metadata first,
// then by the Stripe ids we stored. "" means none.
func (s *Service) paymentFor(ctx context.Context, metadata map[string]string, byColumn map[string]string) (string, error) {
	if id := metadata[stripeapi.MetadataPaymentID]; id != "" {
		return id, nil
	}
	for _, col := range []string{"payment_intent_id", "checkout_session_id", "id"} {
		if v, ok := byColumn[col]; ok && v != "" {
			id, err := findID(ctx, s.db, col, v)
			if err != nil || id != "" {
				return id, err
			}
		}
	}
	return "", nil
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
	if id == "" {
		return ErrNotOurs
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
	return s.confirm(ctx, ev, id, confirmation{paymentIntentID: pi.ID, amountReceived: pi.AmountReceived, currency: pi.Currency,
		livemode: pi.Livemode, customerID: pi.Metadata[stripeapi.MetadataCustomerID], session: session})
}

func (s *Service) confirm(ctx context.Context, ev EventRef, paymentID string, c confirmation) error {
	return s.inEventTx(ctx, ev, paymentID, c.livemode, c.paymentIntentID, func(tx *gorm.DB, p Payment) error {
		if c.paymentIntentID == "" {
			return reject("no PaymentIntent to confirm payment %s by", p.ID)
		}
		if c.customerID != "" && c.customerID != p.CustomerID {
			return reject("metadata names customer %s, but payment %s belongs to %s", c.customerID, p.ID, p.CustomerID)
		}
		var confirmedBy []string
		if err := tx.Raw(`SELECT payment_intent_id FROM payment_confirmations WHERE payment_id = ?`, p.ID).Scan(&confirmedBy).Error; err != nil {
			return db.Translate(err, nil)
		}
		if len(confirmedBy) > 0 {
			if confirmedBy[0] == c.paymentIntentID {
				return nil // already confirmed: a redelivery, a replay or the other strategy
			}
			return reject("payment %s was already confirmed by PaymentIntent %s", p.ID, confirmedBy[0])
		}
		if c.session != nil {
			if err := s.sessionNames(c.session, p, c.paymentIntentID); err != nil {
				return err
			}
			if err := s.recordSession(ctx, tx, &p, *c.session); err != nil {
				return err
			}
		}
		if err := checkAmounts(p, c); err != nil {
			return err
		}
		res := tx.Exec(`INSERT INTO payment_confirmations (payment_intent_id, payment_id, stripe_event_id)
			VALUES (?, ?, NULLIF(?, '')) ON CONFLICT (payment_intent_id) DO NOTHING`, c.paymentIntentID, p.ID, ev.ID)
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
		err = tx.Exec(`UPDATE payments SET status = 'succeeded', amount_received = ?, received_currency = ?, payment_intent_id = ?,
				succeeded_at = ?, failure_reason = NULL, updated_at = ? WHERE id = ?`,
			c.amountReceived, received, c.paymentIntentID, now, now, p.ID).Error
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
		return events.Append(ctx, tx, events.Event{Type: events.PaymentSucceeded, CustomerID: p.CustomerID, Data: map[string]any{
			"payment_id": p.ID, "item": p.Item, "item_kind": p.ItemKind, "quantity": p.Quantity,
			"amount": c.amountReceived, "currency": received, "amount_tax": p.Checkout.AmountTax,
			"price": p.Amount, "price_currency": p.Currency, "credits": p.Credits,
			"payment_intent_id": c.paymentIntentID, "stripe_event_id": ev.ID,
		}})
	})
}

// PaymentIntentFailed handles payment_intent.payment_failed and
// payment_intent.canceled: the payment fails (payment.failed event) unless
// it already succeeded, in which case the refused transition is recorded.
// Only the move into failed tells the host app; a payment already failed
// records the event without effect, and an event already recorded (a
// redelivery, a replay) does nothing.
// A failure of another PaymentIntent than the payment's is refused.
// Errors: ErrNotOurs, *Rejection (livemode, another PaymentIntent),
// errs.Unavailable.
func (s *Service) PaymentIntentFailed(ctx context.Context, ev EventRef, pi PaymentIntent) error {
	id, err := s.paymentFor(ctx, pi.Metadata, map[string]string{"payment_intent_id": pi.ID})
	if err != nil {
		return err
	}
	if id == "" {
		return ErrNotOurs
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

func (s *Service) sessionPayment(ctx context.Context, cs CheckoutSession) (string, error) {
	id, err := s.paymentFor(ctx, cs.Metadata, map[string]string{"checkout_session_id": cs.ID, "id": cs.ClientReferenceID})
	if err != nil {
		return "", err
	}
	if id == "" {
		return "", ErrNotOurs
	}
	return id, nil
}

func sessionLinks(cs CheckoutSession) map[string]string {
	return map[string]string{
		"checkout_session_id": cs.ID, "payment_intent_id": cs.PaymentIntent, "stripe_customer_id": cs.Customer,
		"invoice_id": cs.Invoice, "subscription_id": cs.Subscription, "checkout_payment_status": cs.PaymentStatus,
	}
}

// linkColumns are the Stripe ids a payment learns from events, set once.
var linkColumns = []string{"checkout_session_id", "payment_intent_id", "stripe_customer_id", "invoice_id", "subscription_id"}

// applyLinks stores the Stripe ids of links not yet known, and the latest
// Checkout payment_status. A Stripe id already taken by another payment
// is a rejection.
func (s *Service) applyLinks(ctx context.Context, tx *gorm.DB, p Payment, links map[string]string) error {
	for _, col := range linkColumns {
		v := links[col]
		if v == "" {
			continue
		}
		// col is from linkColumns, never input.
		err := db.Translate(tx.Exec(`UPDATE payments SET `+col+` = ?, updated_at = ? WHERE id = ? AND `+col+` IS NULL`, v, s.now(), p.ID).Error,
			map[string]errs.Code{"payments_checkout_session_id_key": errs.Conflict, "payments_payment_intent_id_key": errs.Conflict})
		if errs.Is(err, errs.Conflict) {
			return reject("%s %s already belongs to another payment than %s", col, v, p.ID)
		}
		if err != nil {
			return err
		}
	}
	if v := links["checkout_payment_status"]; v != "" {
		if err := tx.Exec(`UPDATE payments SET checkout_payment_status = ?, updated_at = ? WHERE id = ?`, v, s.now(), p.ID).Error; err != nil {
			return db.Translate(err, nil)
		}
	}
	return nil
}

// fail moves the payment to failed for the event ev; session is the
// event's Checkout Session when it is a session event (which must be the
// payment's own, and teaches a payment still in play its ids).
func (s *Service) fail(ctx context.Context, ev EventRef, paymentID string, livemode bool, paymentIntentID, reason string, session *CheckoutSession) error {
	return s.inEventTx(ctx, ev, paymentID, livemode, paymentIntentID, func(tx *gorm.DB, p Payment) error {
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
		if p.Status == Failed {
			// Another failure of a failed payment (a second decline, then the
			// session expiring) is history, not news: no second payment.failed.
			return record(ctx, tx, p, Failed, false, ev, "already failed: "+reason)
		}
		ok, err := transition(ctx, tx, p, Failed, ev, reason)
		if err != nil || !ok {
			return err // a refused move is recorded and the event is done
		}
		err = tx.Exec(`UPDATE payments SET status = 'failed', failure_reason = ?, updated_at = ? WHERE id = ?`, reason, s.now(), p.ID).Error
		if err != nil {
			return db.Translate(err, nil)
		}
		return events.Append(ctx, tx, events.Event{Type: events.PaymentFailed, CustomerID: p.CustomerID, Data: map[string]any{
			"payment_id": p.ID, "item": p.Item, "reason": reason, "stripe_event_id": ev.ID,
		}})
	})
}

// CheckoutSessionCompleted links the session to its PaymentIntent, Stripe
// customer, invoice and subscription and records its payment_status. It
// moves money only under confirm_on=checkout_session with
// payment_status=paid (through the same confirmation guard as
// PaymentIntentSucceeded). A metered plan's subscription session succeeds
// here (no money, no credits). Errors: as PaymentIntentSucceeded.
func (s *Service) CheckoutSessionCompleted(ctx context.Context, ev EventRef, cs CheckoutSession) error {
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

// subscribed moves a plan's payment to succeeded when its subscription
// session completes; nothing is credited.
func (s *Service) subscribed(ctx context.Context, ev EventRef, paymentID string, cs CheckoutSession) error {
	return s.inEventTx(ctx, ev, paymentID, cs.Livemode, cs.PaymentIntent, func(tx *gorm.DB, p Payment) error {
		if err := ownSession(p, cs.ID); err != nil {
			return err
		}
		if p.Status == Succeeded {
			return nil
		}
		ok, err := transition(ctx, tx, p, Succeeded, ev, "subscription started")
		if err != nil || !ok {
			return err
		}
		now := s.now()
		if err := tx.Exec(`UPDATE payments SET status = 'succeeded', succeeded_at = ?, failure_reason = NULL, updated_at = ? WHERE id = ?`,
			now, now, p.ID).Error; err != nil {
			return db.Translate(err, nil)
		}
		return events.Append(ctx, tx, events.Event{Type: events.PaymentSucceeded, CustomerID: p.CustomerID, Data: map[string]any{
			"payment_id": p.ID, "item": p.Item, "item_kind": p.ItemKind, "amount": 0, "currency": p.Currency,
			"credits": 0, "stripe_event_id": ev.ID,
		}})
	})
}

// ChargeRefunded moves the payment to refunded with Stripe's cumulative
// amount_refunded and takes back the credits the increase paid for (see
// takeBack: from the whole balance unless RevokeFrom says purchase_grant,
// what was spent recorded as a shortfall), so a redelivered or older refund
// event takes nothing more. A refund of a payment not succeeded yet is
// *Waiting (it applies once the success arrives). Only a charge of the
// payment's own PaymentIntent, for the amount it paid, may refund it.
// Errors: ErrNotOurs, *Waiting, *Rejection (livemode, currency, no or
// another PaymentIntent, charge amount not what was paid, more refunded
// than charged), errs.Unavailable.
func (s *Service) ChargeRefunded(ctx context.Context, ev EventRef, ch Charge) error {
	id, err := s.paymentFor(ctx, ch.Metadata, map[string]string{"payment_intent_id": ch.PaymentIntent})
	if err != nil {
		return err
	}
	if id == "" {
		return ErrNotOurs
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
			return waiting(ch.PaymentIntent, "refund of payment %s, which is %s: waiting for the success of PaymentIntent %s", p.ID, p.Status, ch.PaymentIntent)
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
		if err := tx.Exec(`UPDATE payments SET status = ?, amount_refunded = ?,
				status_before_dispute = CASE WHEN status_before_dispute IS NULL THEN NULL ELSE 'refunded' END, updated_at = ? WHERE id = ?`,
			string(to), ch.AmountRefunded, now, p.ID).Error; err != nil {
			return db.Translate(err, nil)
		}
		if err := tx.Exec(`INSERT INTO payment_refunds (payment_id, stripe_event_id, amount_refunded_total, amount_refunded_delta, credits_revoked, credits_shortfall)
			VALUES (?, NULLIF(?, ''), ?, ?, ?, ?)`, p.ID, ev.ID, ch.AmountRefunded, delta, back.Taken, back.Shortfall).Error; err != nil {
			return db.Translate(err, nil)
		}
		return events.Append(ctx, tx, events.Event{Type: events.PaymentRefunded, CustomerID: p.CustomerID, Data: map[string]any{
			"payment_id": p.ID, "amount_refunded": ch.AmountRefunded, "amount_refunded_delta": delta,
			"currency": paidCurrency(p), "credits_revoked": back.Taken, "credits_shortfall": back.Shortfall, "stripe_event_id": ev.ID,
		}})
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

// SubscriptionChanged keeps a customer's subscription status from
// customer.subscription.created, .updated and .deleted. An event older than
// the last one applied changes nothing. The customer comes from our
// metadata on the subscription, else from its Stripe customer.
// Errors: ErrNotOurs, *Rejection (livemode), errs.Unavailable.
func (s *Service) SubscriptionChanged(ctx context.Context, ev EventRef, sub Subscription) error {
	if sub.Livemode != s.livemode {
		return reject("event livemode=%t does not match our Stripe key (livemode=%t)", sub.Livemode, s.livemode)
	}
	customerID := sub.Metadata[stripeapi.MetadataCustomerID]
	if customerID == "" && sub.Customer != "" {
		var ids []string
		if err := s.db.WithContext(ctx).Raw(`SELECT id FROM customers WHERE stripe_customer_id = ?`, sub.Customer).Scan(&ids).Error; err != nil {
			return db.Translate(err, nil)
		}
		if len(ids) > 0 {
			customerID = ids[0]
		}
	}
	if customerID == "" {
		return ErrNotOurs
	}
	return db.InTx(ctx, s.db, func(tx *gorm.DB) error {
		var known []string
		if err := tx.Raw(`SELECT id FROM customers WHERE id = ?`, customerID).Scan(&known).Error; err != nil {
			return db.Translate(err, nil)
		}
		if len(known) == 0 {
			return reject("subscription %s names customer %s, which tally does not know", sub.ID, customerID)
		}
		res := tx.Exec(`INSERT INTO subscriptions (stripe_subscription_id, customer_id, status, plan, stripe_event_created, updated_at)
			VALUES (?, ?, ?, NULLIF(?, ''), ?, ?)
			ON CONFLICT (stripe_subscription_id) DO UPDATE SET status = EXCLUDED.status,
				plan = COALESCE(EXCLUDED.plan, subscriptions.plan),
				stripe_event_created = EXCLUDED.stripe_event_created, updated_at = EXCLUDED.updated_at
			WHERE subscriptions.stripe_event_created <= EXCLUDED.stripe_event_created`,
			sub.ID, customerID, sub.Status, sub.Metadata[stripeapi.MetadataItem], ev.Created, s.now())
		if res.Error != nil {
			return db.Translate(res.Error, nil)
		}
		if res.RowsAffected == 0 {
			return nil // an older event than the status we hold
		}
		return events.Append(ctx, tx, events.Event{Type: events.SubscriptionUpdate, CustomerID: customerID, Data: map[string]any{
			"subscription_id": sub.ID, "status": sub.Status, "plan": sub.Metadata[stripeapi.MetadataItem], "stripe_event_id": ev.ID,
		}})
	})
}
