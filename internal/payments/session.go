package payments

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/jackc/pgx/v5/pgconn"
	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/errs"
)

// A payment trusts one Checkout Session: the one tally created for it,
// whose id it recorded when Stripe answered the creation. Only that session
// may link a PaymentIntent to the payment or tell what it charges, whether
// it speaks through a signed checkout.session.* event or through a
// retrieval from Stripe. A Stripe object that merely carries the payment's
// metadata (another integration on the account, a forged object) is
// refused.

// ownSession refuses a session event whose session is not the one tally
// created for p.
func ownSession(p Payment, sessionID string) error {
	if p.CheckoutSessionID == "" {
		return reject("Checkout Session %s names payment %s, which has no Checkout Session on record", sessionID, p.ID)
	}
	if sessionID != p.CheckoutSessionID {
		return reject("Checkout Session %s names payment %s, but tally created %s for it", sessionID, p.ID, p.CheckoutSessionID)
	}
	return nil
}

// recordSession stores what the payment learns from its own session cs
// (tx holds p's row lock): the Stripe ids not yet known, the latest
// Checkout payment_status, and the amounts cs charges. p is updated to match.
// Errors: *Rejection (not p's session, an id of another payment),
// errs.Unavailable.
func (s *Service) recordSession(ctx context.Context, tx *gorm.DB, p *Payment, cs CheckoutSession) error {
	if err := ownSession(*p, cs.ID); err != nil {
		return err
	}
	// The links and the amounts in one statement.
	t, ok := cs.totals()
	var amounts map[string]any
	if ok {
		amounts = map[string]any{
			"checkout_currency": t.Currency, "checkout_amount_subtotal": t.AmountSubtotal, "checkout_amount_total": t.AmountTotal,
			"checkout_amount_tax": t.AmountTax, "checkout_source_currency": db.NullIfEmpty(t.SourceCurrency),
			"checkout_source_amount_subtotal": sourceAmount(t),
		}
	}
	if err := s.updateLinks(ctx, tx, *p, sessionLinks(cs), amounts); err != nil {
		return err
	}
	if p.PaymentIntentID == "" {
		p.PaymentIntentID = cs.PaymentIntent
	}
	if ok {
		p.Checkout = t
	}
	return nil
}

// sourceAmount is the amount to store beside SourceCurrency: none without one.
func sourceAmount(t CheckoutTotals) *int64 {
	if t.SourceCurrency == "" {
		return nil
	}
	return &t.SourceAmountSubtotal
}

// sessionToVerify returns the Checkout Session a success of PaymentIntent
// piID must be checked against when the payment does not know it yet: a
// PaymentIntent not linked to the payment, or a payment that does not know
// what its session charged. It is retrieved from Stripe, outside any
// transaction; nil means the payment already knows (or the confirmation
// will refuse the event for another reason). A Stripe error is returned
// as is, so the event is retried rather than parked.
// p is the payment as read outside the transaction, nil when it does not
// exist (lockForEvent refuses that).
func (s *Service) sessionToVerify(ctx context.Context, p *Payment, paymentID, piID string) (*CheckoutSession, error) {
	switch {
	case p == nil:
		return nil, nil // lockForEvent refuses it
	case sessionKnown(*p, piID):
		return nil, nil
	case s.stripe == nil:
		return nil, errs.E(errs.Unavailable, "PaymentIntent %s of payment %s cannot be checked against its Checkout Session: no Stripe key is configured", piID, paymentID)
	}
	got, err := s.stripe.GetCheckoutSession(ctx, p.CheckoutSessionID)
	if err != nil {
		return nil, fmt.Errorf("payments: retrieve Checkout Session %s of payment %s: %w", p.CheckoutSessionID, paymentID, err)
	}
	cs := fromStripe(got)
	return &cs, nil
}

// sessionKnown reports whether a success of PaymentIntent piID needs no
// Checkout Session from Stripe to be checked against (sessionToVerify).
func sessionKnown(p Payment, piID string) bool {
	switch {
	case p.PaymentIntentID != "" && p.PaymentIntentID != piID:
		return true // lockForEvent refuses it
	case p.PaymentIntentID == piID && (p.Checkout.Known() || p.Status == Succeeded || p.Status == Refunded):
		return true // linked by the session, or confirmed already
	case p.CheckoutSessionID == "":
		return true // nothing to ask Stripe about: checkAmounts refuses it
	}
	return false
}

// sessionNames refuses a confirmation by PaymentIntent piID when the
// payment's own Checkout Session cs names another one. A session that names
// none yet is an error to retry (Stripe shows the PaymentIntent once the
// buyer paid), not a refusal.
func (s *Service) sessionNames(cs *CheckoutSession, p Payment, piID string) error {
	if err := ownSession(p, cs.ID); err != nil {
		return err
	}
	switch cs.PaymentIntent {
	case piID:
		return nil
	case "":
		return fmt.Errorf("payments: Checkout Session %s of payment %s names no PaymentIntent yet, so %s cannot be confirmed yet", cs.ID, p.ID, piID)
	}
	return reject("PaymentIntent %s is not the one Checkout Session %s of payment %s names (%s): tally did not create it",
		piID, cs.ID, p.ID, cs.PaymentIntent)
}

// checkAmounts is the amount part of the validation chain, on p as its own
// Checkout Session described it: the PaymentIntent must be the one the
// session names; the session's amount before discounts and taxes, in the
// currency it was created in, must be the catalog price of the payment
// (which allows Stripe Tax on top and Adaptive Pricing's conversion); and
// amount_received and its currency must be the session's total, what the
// buyer was charged.
func checkAmounts(p Payment, c confirmation) error {
	if p.PaymentIntentID != c.paymentIntentID {
		if p.CheckoutSessionID == "" {
			return reject("payment %s has no Checkout Session on record, so PaymentIntent %s cannot be checked against it", p.ID, c.paymentIntentID)
		}
		return reject("PaymentIntent %s is not linked to payment %s by its Checkout Session %s", c.paymentIntentID, p.ID, p.CheckoutSessionID)
	}
	t := p.Checkout
	if !t.Known() {
		return reject("Checkout Session %s of payment %s reported no amounts to check PaymentIntent %s against", p.CheckoutSessionID, p.ID, c.paymentIntentID)
	}
	price, currency := t.Price()
	if !strings.EqualFold(currency, p.Currency) {
		return reject("Checkout Session %s was created in %q, but payment %s is priced in %q", p.CheckoutSessionID, currency, p.ID, p.Currency)
	}
	if price != p.Amount {
		return reject("Checkout Session %s charges %d %s before tax, but payment %s costs %d", p.CheckoutSessionID, price, currency, p.ID, p.Amount)
	}
	if !strings.EqualFold(c.currency, t.Currency) {
		return reject("currency %q does not match Checkout Session %s of payment %s (%q)", c.currency, p.CheckoutSessionID, p.ID, t.Currency)
	}
	if c.amountReceived != t.AmountTotal {
		return reject("amount_received %d does not match the amount_total %d of Checkout Session %s of payment %s",
			c.amountReceived, t.AmountTotal, p.CheckoutSessionID, p.ID)
	}
	return nil
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
// Checkout payment_status, in one statement (a session event brings
// several). A Stripe id already taken by another payment is a rejection.
func (s *Service) applyLinks(ctx context.Context, tx *gorm.DB, p Payment, links map[string]string) error {
	return s.updateLinks(ctx, tx, p, links, nil)
}

// updateLinks is applyLinks writing the columns of also (with updated_at)
// in the same statement.
func (s *Service) updateLinks(ctx context.Context, tx *gorm.DB, p Payment, links map[string]string, also map[string]any) error {
	set := map[string]any{}
	for col, v := range also {
		set[col] = v
	}
	var unknown []string // "col IS NULL" of each link offered: it is set only then
	for _, col := range linkColumns {
		v := links[col]
		if v == "" {
			continue
		}
		// col is from linkColumns, never input.
		set[col] = gorm.Expr("COALESCE("+col+", ?)", v)
		unknown = append(unknown, col+" IS NULL")
	}
	now := s.now()
	if v := links["checkout_payment_status"]; v != "" {
		set["checkout_payment_status"] = v
	}
	switch {
	case len(set) > len(unknown):
		set["updated_at"] = now
	case len(unknown) > 0:
		// Touched only when a link is new, as a statement per link did.
		set["updated_at"] = gorm.Expr("CASE WHEN "+strings.Join(unknown, " OR ")+" THEN ?::timestamptz ELSE updated_at END", now)
	default:
		return nil
	}
	err := tx.WithContext(ctx).Model(&paymentRow{}).Where("id = ?", p.ID).Updates(set).Error
	if err == nil {
		return nil
	}
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		// The unique constraint on the id names the link.
		for _, col := range linkColumns {
			if pgErr.ConstraintName == "payments_"+col+"_key" {
				return reject("%s %s already belongs to another payment than %s", col, links[col], p.ID)
			}
		}
	}
	return db.Translate(err, nil)
}
