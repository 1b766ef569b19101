package stripeapi

import (
	"context"
	"encoding/json"
	"maps"
	"strings"
	"time"

	"github.com/stripe/stripe-go/v82"

	"github.com/tallybilling/tally/internal/errs"
)

// InvoiceInput describes the Stripe invoice of one pay-by-invoice payment:
// one line (Description, Amount in minor units of Currency), sent for
// payment on terms (collection_method=send_invoice) DaysUntilDue days out.
type InvoiceInput struct {
	PaymentID        string // required; names the idempotency keys
	TallyCustomerID  string // required; copied into metadata
	StripeCustomerID string // required
	Description      string // the line's description
	Amount           int64
	Currency         string
	DaysUntilDue     int64
	Memo             string // the invoice's description, optional
	PurchaseOrder    string // shown as the custom field "PO number", optional
	Metadata         map[string]string
}

// PurchaseOrderField is the name of the invoice custom field that carries a
// purchase order number.
const PurchaseOrderField = "PO number"

// Invoice is a Stripe invoice as tally reads it.
type Invoice struct {
	ID               string
	Number           string
	Status           string // draft, open, paid, void, uncollectible
	HostedInvoiceURL string
	InvoicePDF       string
	Customer         string
	Currency         string
	AmountDue        int64
	AmountPaid       int64
	Total            int64
	Livemode         bool
	Metadata         map[string]string
}

func (in InvoiceInput) validate() error {
	var problems []string
	if in.PaymentID == "" || in.TallyCustomerID == "" || in.StripeCustomerID == "" {
		problems = append(problems, "a payment id, a tally customer id and a Stripe customer id are required")
	}
	if in.Amount <= 0 || in.Currency == "" || in.Description == "" {
		problems = append(problems, "a line needs a description, a positive amount and a currency")
	}
	if in.DaysUntilDue < 0 {
		problems = append(problems, "days until due must not be negative")
	}
	if len(problems) > 0 {
		return errs.E(errs.Invalid, "stripeapi: invoice: %s", strings.Join(problems, "; "))
	}
	return nil
}

// CreateInvoice creates the draft invoice of a payment and its one line:
// POST /v1/invoices (idempotency key "tally-invoice-<payment id>",
// metadata tally_payment_id and tally_customer_id, the customer's other
// pending invoice items left out) then POST /v1/invoiceitems on it
// ("tally-invoice-item-<payment id>"). A retry within Stripe's idempotency
// window returns the same invoice and line. Errors: *Error;
// invalid_request when the input is incomplete.
func (c *client) CreateInvoice(ctx context.Context, in InvoiceInput) (Invoice, error) {
	if err := in.validate(); err != nil {
		return Invoice{}, err
	}
	metadata := maps.Clone(in.Metadata)
	if metadata == nil {
		metadata = map[string]string{}
	}
	metadata[MetadataPaymentID] = in.PaymentID
	metadata[MetadataCustomerID] = in.TallyCustomerID
	params := &stripe.InvoiceCreateParams{
		Customer:                    stripe.String(in.StripeCustomerID),
		CollectionMethod:            stripe.String(string(stripe.InvoiceCollectionMethodSendInvoice)),
		DaysUntilDue:                stripe.Int64(in.DaysUntilDue),
		Currency:                    stripe.String(strings.ToLower(in.Currency)),
		AutoAdvance:                 stripe.Bool(false),
		PendingInvoiceItemsBehavior: stripe.String("exclude"),
		Metadata:                    metadata,
	}
	if in.Memo != "" {
		params.Description = stripe.String(in.Memo)
	}
	if in.PurchaseOrder != "" {
		params.CustomFields = []*stripe.InvoiceCreateCustomFieldParams{{Name: stripe.String(PurchaseOrderField), Value: stripe.String(in.PurchaseOrder)}}
	}
	params.SetIdempotencyKey("tally-invoice-" + in.PaymentID)
	ctx, capture := withCapture(ctx)
	inv, err := c.api.V1Invoices.Create(ctx, params)
	if err != nil {
		return Invoice{}, classify("create invoice", err, capture, false)
	}
	item := &stripe.InvoiceItemCreateParams{
		Customer:    stripe.String(in.StripeCustomerID),
		Invoice:     stripe.String(inv.ID),
		Amount:      stripe.Int64(in.Amount),
		Currency:    stripe.String(strings.ToLower(in.Currency)),
		Description: stripe.String(in.Description),
		Metadata:    map[string]string{MetadataPaymentID: in.PaymentID},
	}
	item.SetIdempotencyKey("tally-invoice-item-" + in.PaymentID)
	if _, err := c.api.V1InvoiceItems.Create(ctx, item); err != nil {
		return Invoice{}, classify("create invoice item", err, capture, false)
	}
	out := invoice(inv)
	out.AmountDue, out.Total = in.Amount, in.Amount
	return out, nil
}

// FinalizeAndSendInvoice moves a draft invoice to open (it gets its number and
// hosted page), then sends it to the customer. Both carry idempotency keys
// derived from the payment id. Errors: *Error.
func (c *client) FinalizeAndSendInvoice(ctx context.Context, paymentID, id string) (Invoice, error) {
	if id == "" || paymentID == "" {
		return Invoice{}, errs.E(errs.Invalid, "stripeapi: an invoice id and a payment id are required")
	}
	ctx, capture := withCapture(ctx)
	fp := &stripe.InvoiceFinalizeInvoiceParams{AutoAdvance: stripe.Bool(false)}
	fp.SetIdempotencyKey("tally-invoice-finalize-" + paymentID)
	if _, err := c.api.V1Invoices.FinalizeInvoice(ctx, id, fp); err != nil {
		return Invoice{}, classify("finalize invoice", err, capture, false)
	}
	sp := &stripe.InvoiceSendInvoiceParams{}
	sp.SetIdempotencyKey("tally-invoice-send-" + paymentID)
	inv, err := c.api.V1Invoices.SendInvoice(ctx, id, sp)
	if err != nil {
		return Invoice{}, classify("send invoice", err, capture, false)
	}
	return invoice(inv), nil
}

// GetInvoice retrieves an invoice (GET /v1/invoices/{id}). Errors: *Error;
// invalid_request when id is empty.
func (c *client) GetInvoice(ctx context.Context, id string) (Invoice, error) {
	if strings.TrimSpace(id) == "" {
		return Invoice{}, errs.E(errs.Invalid, "stripeapi: an invoice id is required")
	}
	ctx, capture := withCapture(ctx)
	inv, err := c.api.V1Invoices.Retrieve(ctx, id, &stripe.InvoiceRetrieveParams{})
	if err != nil {
		return Invoice{}, classify("retrieve invoice", err, capture, false)
	}
	return invoice(inv), nil
}

// InvoicePayment is Stripe's record that a payment paid (or is meant to
// pay) an invoice: what tally reads of an Invoice Payment.
type InvoicePayment struct {
	ID            string
	Invoice       string
	PaymentIntent string
	Status        string // open, paid, canceled
	AmountPaid    int64
	Currency      string
	Livemode      bool
}

// MaxInvoicePayments bounds what InvoicesPaidBy reads: a PaymentIntent
// pays one invoice, or a few at most.
const MaxInvoicePayments = 20

// InvoicesPaidBy lists the Invoice Payments of a PaymentIntent, following
// pages up to MaxInvoicePayments. Errors: *Error; invalid_request when id
// is empty.
func (c *client) InvoicesPaidBy(ctx context.Context, paymentIntentID string) ([]InvoicePayment, error) {
	if strings.TrimSpace(paymentIntentID) == "" {
		return nil, errs.E(errs.Invalid, "stripeapi: a PaymentIntent id is required")
	}
	params := &stripe.InvoicePaymentListParams{Payment: &stripe.InvoicePaymentListPaymentParams{
		Type: stripe.String(string(stripe.InvoicePaymentPaymentTypePaymentIntent)), PaymentIntent: stripe.String(paymentIntentID),
	}}
	params.Limit = stripe.Int64(MaxInvoicePayments)
	ctx, capture := withCapture(ctx)
	var out []InvoicePayment
	for ip, err := range c.api.V1InvoicePayments.List(ctx, params) {
		if err != nil {
			return nil, classify("list invoice payments", err, capture, false)
		}
		p := InvoicePayment{ID: ip.ID, Status: ip.Status, AmountPaid: ip.AmountPaid, Currency: string(ip.Currency), Livemode: ip.Livemode}
		if ip.Invoice != nil {
			p.Invoice = ip.Invoice.ID
		}
		if ip.Payment != nil && ip.Payment.PaymentIntent != nil {
			p.PaymentIntent = ip.Payment.PaymentIntent.ID
		}
		out = append(out, p)
		if len(out) == MaxInvoicePayments {
			break
		}
	}
	return out, nil
}

func invoice(inv *stripe.Invoice) Invoice {
	out := Invoice{ID: inv.ID, Number: inv.Number, Status: string(inv.Status), HostedInvoiceURL: inv.HostedInvoiceURL,
		InvoicePDF: inv.InvoicePDF, Currency: string(inv.Currency), AmountDue: inv.AmountDue, AmountPaid: inv.AmountPaid,
		Total: inv.Total, Livemode: inv.Livemode, Metadata: inv.Metadata}
	if inv.Customer != nil {
		out.Customer = inv.Customer.ID
	}
	return out
}

// Address is a postal address as Stripe stores it on a customer.
type Address struct {
	Line1, Line2, City, State, PostalCode, Country string
}

// TaxID is a customer's tax id (type as Stripe names it, e.g. eu_vat).
type TaxID struct {
	Type, Value string
}

func (a *Address) params() *stripe.AddressParams {
	if a == nil {
		return nil
	}
	return &stripe.AddressParams{Line1: stripe.String(a.Line1), Line2: stripe.String(a.Line2), City: stripe.String(a.City),
		State: stripe.String(a.State), PostalCode: stripe.String(a.PostalCode), Country: stripe.String(a.Country)}
}

// UpdateCustomer writes a Stripe Customer's billing name, email and
// address (POST /v1/customers/{id}); empty fields are left as they are.
// Errors: *Error; invalid_request when id is empty.
func (c *client) UpdateCustomer(ctx context.Context, id string, in CustomerInput) error {
	if strings.TrimSpace(id) == "" {
		return errs.E(errs.Invalid, "stripeapi: a Stripe customer id is required")
	}
	params := &stripe.CustomerUpdateParams{Address: in.Address.params()}
	if in.Email != "" {
		params.Email = stripe.String(in.Email)
	}
	if in.Name != "" {
		params.Name = stripe.String(in.Name)
	}
	ctx, capture := withCapture(ctx)
	if _, err := c.api.V1Customers.Update(ctx, id, params); err != nil {
		return classify("update customer", err, capture, false)
	}
	return nil
}

// RawEvent is an event as Stripe's event list returns it, re-encoded as a
// webhook body (the envelope and data.object as Stripe sent them).
type RawEvent struct {
	ID      string
	Type    string
	Created time.Time
	Payload []byte
}

// MaxListedEvents bounds what one ListEvents call returns (Stripe keeps
// 30 days).
const MaxListedEvents = 10_000

// ListEvents returns Stripe's events of the given types (at most 20, as
// Stripe allows) created at or after since, oldest first, following every
// page: all of them, or the oldest MaxListedEvents and more=true. Stripe
// lists newest first, so the oldest end of a backlog is reached only by
// paging through it all; it is the end Stripe stops retrying first.
// Errors: *Error; invalid_request for more than 20 types.
func (c *client) ListEvents(ctx context.Context, since time.Time, types []string) ([]RawEvent, bool, error) {
	if len(types) == 0 || len(types) > 20 {
		return nil, false, errs.E(errs.Invalid, "stripeapi: list events: between 1 and 20 types, got %d", len(types))
	}
	params := &stripe.EventListParams{CreatedRange: &stripe.RangeQueryParams{GreaterThanOrEqual: since.Unix()}}
	params.Limit = stripe.Int64(100)
	for _, t := range types {
		params.Types = append(params.Types, stripe.String(t))
	}
	ctx, capture := withCapture(ctx)
	var out []RawEvent // newest first, as listed
	more := false
	for ev, err := range c.api.V1Events.List(ctx, params) {
		if err != nil {
			return nil, false, classify("list events", err, capture, false)
		}
		if ev.Data == nil || len(ev.Data.Raw) == 0 {
			continue // nothing tally could apply
		}
		payload, err := json.Marshal(map[string]any{
			"id": ev.ID, "object": "event", "type": string(ev.Type), "created": ev.Created, "livemode": ev.Livemode,
			"api_version": ev.APIVersion, "data": map[string]json.RawMessage{"object": ev.Data.Raw},
		})
		if err != nil {
			return nil, false, errs.E(errs.Invalid, "stripeapi: event %s does not re-encode: %v", ev.ID, err)
		}
		out = append(out, RawEvent{ID: ev.ID, Type: string(ev.Type), Created: time.Unix(ev.Created, 0).UTC(), Payload: payload})
		if len(out) >= 2*MaxListedEvents {
			// Only the oldest MaxListedEvents are kept: drop the newer.
			out = append([]RawEvent(nil), out[len(out)-MaxListedEvents:]...)
			more = true
		}
	}
	if len(out) > MaxListedEvents {
		out = out[len(out)-MaxListedEvents:]
		more = true
	}
	// Stripe lists newest first; they are applied in the order they happened.
	for i, j := 0, len(out)-1; i < j; i, j = i+1, j-1 {
		out[i], out[j] = out[j], out[i]
	}
	return out, more, nil
}
