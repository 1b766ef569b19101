package payments

import (
	"strings"

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
	// PaymentMethod is the id of the card it charged.
	PaymentMethod string
}

// CheckoutSession is a Stripe Checkout Session.
type CheckoutSession struct {
	ID                string
	Mode              string
	Status            string
	PaymentStatus     string // paid, unpaid, no_payment_required
	PaymentIntent     string
	SetupIntent       string // setup mode
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

// StripeInvoice is a Stripe invoice (invoice.* events, or retrieved by a
// sync). AmountPaid is what the buyer paid, in Currency's minor unit.
type StripeInvoice struct {
	ID               string
	Number           string
	Status           string
	HostedInvoiceURL string
	InvoicePDF       string
	Customer         string
	Currency         string
	AmountDue        int64
	AmountPaid       int64
	Livemode         bool
	Metadata         map[string]string
}

// invoiceFromStripe is a retrieved invoice as the confirmation reads it.
func invoiceFromStripe(in stripeapi.Invoice) StripeInvoice {
	return StripeInvoice{ID: in.ID, Number: in.Number, Status: in.Status, HostedInvoiceURL: in.HostedInvoiceURL,
		InvoicePDF: in.InvoicePDF, Customer: in.Customer, Currency: in.Currency, AmountDue: in.AmountDue,
		AmountPaid: in.AmountPaid, Livemode: in.Livemode, Metadata: in.Metadata}
}

// paymentIntentFromStripe is a retrieved PaymentIntent as the handlers
// read a webhook's.
func paymentIntentFromStripe(in stripeapi.PaymentIntent) PaymentIntent {
	return PaymentIntent{
		ID: in.ID, Amount: in.Amount, AmountReceived: in.AmountReceived, Currency: in.Currency, Status: in.Status,
		Livemode: in.Livemode, Metadata: in.Metadata, LastError: in.LastError, CancellationReason: in.CancellationReason,
		PaymentMethod: in.PaymentMethod,
	}
}
