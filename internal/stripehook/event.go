package stripehook

import (
	"bytes"
	"encoding/json"
	"fmt"
	"time"
	"unicode/utf8"

	"github.com/tallybilling/tally/internal/errs"
	"github.com/tallybilling/tally/internal/payments"
)

// Event is a Stripe event reduced to its envelope; Object is data.object,
// decoded later by type. Whatever the event's api_version, these fields
// have kept their names, which is why tally decodes only them rather than
// stripe-go's pinned-version types.
type Event struct {
	ID         string
	Type       string
	APIVersion string
	Livemode   bool
	Created    int64
	Object     json.RawMessage
	// Thin marks a v2 event (see parseThin): Object is its related
	// object, and its details are Stripe's to fetch.
	Thin bool
}

type envelope struct {
	ID         string  `json:"id"`
	Object     string  `json:"object"`
	Type       string  `json:"type"`
	APIVersion *string `json:"api_version"`
	Livemode   bool    `json:"livemode"`
	// Created is Unix seconds, except in a thin event (parseThin).
	Created json.RawMessage `json:"created"`
	Data    *struct {
		Object json.RawMessage `json:"object"`
	} `json:"data"`
}

// maxIDLen bounds the ids we store (Stripe's are far shorter).
const maxIDLen = 255

// ParseEvent decodes a webhook body into its envelope. It needs an id, a
// type and a data.object that is a JSON object; everything else about the
// event is read only when its type is handled.
// Errors: errs.Invalid naming what is wrong.
func ParseEvent(payload []byte) (Event, error) {
	if !utf8.Valid(payload) {
		return Event{}, errs.E(errs.Invalid, "the event is not UTF-8 JSON")
	}
	var env envelope
	if err := json.Unmarshal(payload, &env); err != nil {
		return Event{}, errs.E(errs.Invalid, "the event is not a JSON object: %v", err)
	}
	if env.Object == thinObject {
		return parseThin(payload)
	}
	var created int64
	if len(env.Created) > 0 && json.Unmarshal(env.Created, &created) != nil {
		return Event{}, errs.E(errs.Invalid, "the event's created is not a Unix time")
	}
	switch {
	case env.ID == "" || len(env.ID) > maxIDLen:
		return Event{}, errs.E(errs.Invalid, "the event has no id (or one over %d bytes)", maxIDLen)
	case env.Type == "" || len(env.Type) > maxIDLen:
		return Event{}, errs.E(errs.Invalid, "the event has no type")
	case env.Object != "" && env.Object != "event":
		return Event{}, errs.E(errs.Invalid, "the body is a %q, not an event", env.Object)
	case env.Data == nil || !isObject(env.Data.Object):
		return Event{}, errs.E(errs.Invalid, "the event has no data.object")
	}
	ev := Event{ID: env.ID, Type: env.Type, Livemode: env.Livemode, Created: created, Object: env.Data.Object}
	if env.APIVersion != nil {
		ev.APIVersion = *env.APIVersion
	}
	return ev, nil
}

// thinObject is the object of a v2 event, which Stripe delivers thin: an
// envelope naming the event and its related object, with no data; its
// details are fetched from Stripe (GET /v2/core/events/{id}).
const thinObject = "v2.core.event"

// parseThin decodes a thin event's envelope. Its created is a timestamp
// in RFC 3339, not Unix seconds; Object is its related_object, or {} when
// it names none.
func parseThin(payload []byte) (Event, error) {
	var env struct {
		ID            string          `json:"id"`
		Type          string          `json:"type"`
		Livemode      bool            `json:"livemode"`
		Created       time.Time       `json:"created"`
		RelatedObject json.RawMessage `json:"related_object"`
	}
	if err := json.Unmarshal(payload, &env); err != nil {
		return Event{}, errs.E(errs.Invalid, "the v2 event does not decode: %v", err)
	}
	switch {
	case env.ID == "" || len(env.ID) > maxIDLen:
		return Event{}, errs.E(errs.Invalid, "the event has no id (or one over %d bytes)", maxIDLen)
	case env.Type == "" || len(env.Type) > maxIDLen:
		return Event{}, errs.E(errs.Invalid, "the event has no type")
	}
	ev := Event{ID: env.ID, Type: env.Type, Livemode: env.Livemode, Thin: true, Object: json.RawMessage(`{}`)}
	if !env.Created.IsZero() {
		ev.Created = env.Created.Unix()
	}
	if isObject(env.RelatedObject) {
		ev.Object = env.RelatedObject
	}
	return ev, nil
}

func isObject(raw json.RawMessage) bool {
	raw = bytes.TrimSpace(raw)
	return len(raw) > 0 && raw[0] == '{'
}

// ref is a Stripe field that is an id, or the expanded object carrying it.
type ref string

func (r *ref) UnmarshalJSON(b []byte) error {
	b = bytes.TrimSpace(b)
	switch {
	case len(b) == 0 || bytes.Equal(b, []byte("null")):
		*r = ""
		return nil
	case b[0] == '"':
		var s string
		if err := json.Unmarshal(b, &s); err != nil {
			return err
		}
		*r = ref(s)
		return nil
	case b[0] == '{':
		var obj struct {
			ID string `json:"id"`
		}
		if err := json.Unmarshal(b, &obj); err != nil {
			return err
		}
		*r = ref(obj.ID)
		return nil
	}
	return fmt.Errorf("want an id or an object, got %.20s", b)
}

// metadata tolerates null and non-string values (ignored) rather than
// refusing an event over a field we only read two keys of.
type metadata map[string]string

func (m *metadata) UnmarshalJSON(b []byte) error {
	var raw map[string]json.RawMessage
	if err := json.Unmarshal(b, &raw); err != nil {
		return err
	}
	out := make(map[string]string, len(raw))
	for k, v := range raw {
		var s string
		if json.Unmarshal(v, &s) == nil {
			out[k] = s
		}
	}
	*m = out
	return nil
}

type paymentIntentObject struct {
	ID                 string   `json:"id"`
	Amount             int64    `json:"amount"`
	AmountReceived     int64    `json:"amount_received"`
	Currency           string   `json:"currency"`
	Status             string   `json:"status"`
	Livemode           bool     `json:"livemode"`
	Metadata           metadata `json:"metadata"`
	CancellationReason *string  `json:"cancellation_reason"`
	PaymentMethod      ref      `json:"payment_method"`
	LastPaymentError   *struct {
		Code        string `json:"code"`
		DeclineCode string `json:"decline_code"`
		Message     string `json:"message"`
	} `json:"last_payment_error"`
}

func (o paymentIntentObject) domain() payments.PaymentIntent {
	pi := payments.PaymentIntent{ID: o.ID, Amount: o.Amount, AmountReceived: o.AmountReceived, Currency: o.Currency,
		Status: o.Status, Livemode: o.Livemode, Metadata: o.Metadata, PaymentMethod: string(o.PaymentMethod)}
	if o.CancellationReason != nil {
		pi.CancellationReason = *o.CancellationReason
	}
	if e := o.LastPaymentError; e != nil {
		pi.LastError = e.Message
		if pi.LastError == "" {
			pi.LastError = e.Code
		}
	}
	return pi
}

type checkoutSessionObject struct {
	ID                string  `json:"id"`
	Mode              string  `json:"mode"`
	Status            string  `json:"status"`
	PaymentStatus     string  `json:"payment_status"`
	PaymentIntent     ref     `json:"payment_intent"`
	SetupIntent       ref     `json:"setup_intent"`
	Customer          ref     `json:"customer"`
	Invoice           ref     `json:"invoice"`
	Subscription      ref     `json:"subscription"`
	ClientReferenceID *string `json:"client_reference_id"`
	AmountSubtotal    *int64  `json:"amount_subtotal"`
	AmountTotal       *int64  `json:"amount_total"`
	Currency          string  `json:"currency"`
	TotalDetails      *struct {
		AmountTax *int64 `json:"amount_tax"`
	} `json:"total_details"`
	CurrencyConversion *struct {
		SourceCurrency string `json:"source_currency"`
		AmountSubtotal int64  `json:"amount_subtotal"`
		AmountTotal    int64  `json:"amount_total"`
	} `json:"currency_conversion"`
	Livemode bool     `json:"livemode"`
	Metadata metadata `json:"metadata"`
}

func (o checkoutSessionObject) domain() payments.CheckoutSession {
	cs := payments.CheckoutSession{ID: o.ID, Mode: o.Mode, Status: o.Status, PaymentStatus: o.PaymentStatus,
		PaymentIntent: string(o.PaymentIntent), SetupIntent: string(o.SetupIntent), Customer: string(o.Customer), Invoice: string(o.Invoice),
		Subscription: string(o.Subscription), AmountSubtotal: o.AmountSubtotal, AmountTotal: o.AmountTotal,
		Currency: o.Currency, Livemode: o.Livemode, Metadata: o.Metadata}
	if o.ClientReferenceID != nil {
		cs.ClientReferenceID = *o.ClientReferenceID
	}
	if o.TotalDetails != nil {
		cs.AmountTax = o.TotalDetails.AmountTax
	}
	if c := o.CurrencyConversion; c != nil && c.SourceCurrency != "" {
		cs.Conversion = &payments.CurrencyConversion{SourceCurrency: c.SourceCurrency, AmountSubtotal: c.AmountSubtotal, AmountTotal: c.AmountTotal}
	}
	return cs
}

type chargeObject struct {
	ID             string   `json:"id"`
	PaymentIntent  ref      `json:"payment_intent"`
	Amount         int64    `json:"amount"`
	AmountRefunded int64    `json:"amount_refunded"`
	Currency       string   `json:"currency"`
	Livemode       bool     `json:"livemode"`
	Metadata       metadata `json:"metadata"`
}

func (o chargeObject) domain() payments.Charge {
	return payments.Charge{ID: o.ID, PaymentIntent: string(o.PaymentIntent), Amount: o.Amount,
		AmountRefunded: o.AmountRefunded, Currency: o.Currency, Livemode: o.Livemode, Metadata: o.Metadata}
}

type disputeObject struct {
	ID            string   `json:"id"`
	Charge        ref      `json:"charge"`
	PaymentIntent ref      `json:"payment_intent"`
	Amount        int64    `json:"amount"`
	Currency      string   `json:"currency"`
	Status        string   `json:"status"`
	Reason        string   `json:"reason"`
	Livemode      bool     `json:"livemode"`
	Metadata      metadata `json:"metadata"`
}

func (o disputeObject) domain() payments.Dispute {
	return payments.Dispute{ID: o.ID, Charge: string(o.Charge), PaymentIntent: string(o.PaymentIntent), Amount: o.Amount,
		Currency: o.Currency, Status: o.Status, Reason: o.Reason, Livemode: o.Livemode, Metadata: o.Metadata}
}

type invoiceObject struct {
	ID               string   `json:"id"`
	Number           *string  `json:"number"`
	Status           string   `json:"status"`
	HostedInvoiceURL *string  `json:"hosted_invoice_url"`
	InvoicePDF       *string  `json:"invoice_pdf"`
	Customer         ref      `json:"customer"`
	Currency         string   `json:"currency"`
	AmountDue        int64    `json:"amount_due"`
	AmountPaid       int64    `json:"amount_paid"`
	Livemode         bool     `json:"livemode"`
	Metadata         metadata `json:"metadata"`
}

func (o invoiceObject) domain() payments.StripeInvoice {
	deref := func(s *string) string {
		if s == nil {
			return ""
		}
		return *s
	}
	return payments.StripeInvoice{ID: o.ID, Number: deref(o.Number), Status: o.Status, HostedInvoiceURL: deref(o.HostedInvoiceURL),
		InvoicePDF: deref(o.InvoicePDF), Customer: string(o.Customer), Currency: o.Currency, AmountDue: o.AmountDue,
		AmountPaid: o.AmountPaid, Livemode: o.Livemode, Metadata: o.Metadata}
}

type subscriptionObject struct {
	ID       string   `json:"id"`
	Customer ref      `json:"customer"`
	Status   string   `json:"status"`
	Livemode bool     `json:"livemode"`
	Metadata metadata `json:"metadata"`
}

func (o subscriptionObject) domain() payments.Subscription {
	return payments.Subscription{ID: o.ID, Customer: string(o.Customer), Status: o.Status, Livemode: o.Livemode, Metadata: o.Metadata}
}

// decodeObject reads data.object into dst and insists on its id: an event
// of a handled type whose object cannot be read is malformed, not ignorable.
func decodeObject(ev Event, dst any, id func() string) error {
	if err := json.Unmarshal(ev.Object, dst); err != nil {
		return errs.E(errs.Invalid, "%s: data.object does not decode: %v", ev.Type, err)
	}
	if id() == "" {
		return errs.E(errs.Invalid, "%s: data.object has no id", ev.Type)
	}
	return nil
}
