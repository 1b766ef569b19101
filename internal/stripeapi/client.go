// Package stripeapi is the only package that talks to Stripe. It offers a
// narrow, domain-level interface (customers, Checkout Sessions created and
// retrieved, meter events and meter event summaries) over stripe-go's client, so that no stripe-go
// type leaves this folder. Every error it returns is an *Error, which also
// carries a tally error code (see Error.Unwrap).
//
// Two stripe-go clients sit behind one Client: one for customers, Checkout
// and summaries, which lets stripe-go retry network failures; and one for
// meter events (v1 and v2) with retries switched off, because the metering
// outbox retries with its own backoff and must see every 429 and Retry-After.
//
// The test double lives in stripefake (a stateful httptest Stripe) and the
// stripe-mock harness in stripemock.
package stripeapi

import (
	"context"
	"fmt"
	"log/slog"
	"maps"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/stripe/stripe-go/v82"

	"github.com/tallybilling/tally/internal/errs"
)

// Client is what the rest of tally knows of Stripe. Implementations must be
// safe for concurrent use.
type Client interface {
	// CreateCustomer creates the Stripe Customer for one tally customer, with
	// metadata tally_customer_id=<id> and the idempotency key
	// "tally-customer-<id>", so a retry within Stripe's 24 h idempotency
	// window returns the same Stripe Customer instead of a second one.
	// Errors: *Error (payment_provider_error, rate_limited, unavailable);
	// invalid_request when TallyCustomerID is empty.
	CreateCustomer(ctx context.Context, in CustomerInput) (Customer, error)

	// CreateCheckoutSession creates a hosted Checkout Session with the
	// idempotency key "tally-checkout-<payment_id>". Metadata (plus
	// tally_payment_id and tally_customer_id) is set on the session and on
	// the PaymentIntent (payment mode) or the Subscription (subscription
	// mode), so that every webhook object can be traced back to our payment.
	// Errors: *Error (payment_provider_error, rate_limited, unavailable);
	// invalid_request when the input is incomplete.
	CreateCheckoutSession(ctx context.Context, in CheckoutSessionInput) (CheckoutSession, error)

	// GetCheckoutSession retrieves a Checkout Session
	// (GET /v1/checkout/sessions/{id}) with what a confirmation checks: the
	// PaymentIntent it names, its status and its amounts. stripe-go retries
	// network failures. Errors: *Error (payment_provider_error, also for an
	// unknown session; rate_limited; unavailable); invalid_request when id
	// is empty.
	GetCheckoutSession(ctx context.Context, id string) (CheckoutSession, error)

	// CreateMeterEvent sends one meter event through the v1 API
	// (POST /v1/billing/meter_events) with its identifier unchanged. It is
	// never retried here. An identifier Stripe already holds gives an *Error
	// of KindDuplicate, which callers treat as delivered.
	// Errors: *Error (rate_limited for 429, unavailable for network
	// failures, payment_provider_error otherwise); invalid_request when the
	// event name, Stripe customer or identifier is missing.
	CreateMeterEvent(ctx context.Context, ev MeterEvent) error

	// OpenMeterEventSession opens a v2 meter event session
	// (POST /v2/billing/meter_event_session); its token authenticates
	// SendMeterEventStream until ExpiresAt (15 minutes at Stripe). It is
	// never retried here. Errors: *Error, as for CreateMeterEvent.
	OpenMeterEventSession(ctx context.Context) (MeterEventSession, error)

	// SendMeterEventStream sends up to MaxStreamEvents events through the v2
	// meter event stream (POST /v2/billing/meter_event_stream), authenticated
	// by the session's token. It is never retried here. An expired token gives
	// an *Error of KindSessionExpired (see IsSessionExpired): open a new
	// session and send the same events again. Stripe validates and dedupes
	// stream events asynchronously, so duplicates are not reported here.
	// Errors: *Error, as for CreateMeterEvent; invalid_request for more than
	// MaxStreamEvents events or an incomplete event.
	SendMeterEventStream(ctx context.Context, session MeterEventSession, evs []MeterEvent) error

	// MeterEventSummaries returns Stripe's aggregated usage of one customer on
	// one meter over [Start, End), following every page
	// (GET /v1/billing/meters/{id}/event_summaries). Start and End must be
	// minute aligned, as Stripe requires; invalid_request otherwise.
	// Errors: *Error (rate_limited, unavailable, payment_provider_error).
	MeterEventSummaries(ctx context.Context, in SummaryInput) ([]Summary, error)

	// UpdateCustomer keeps a Stripe Customer's billing details in step
	// with tally's (name, email, address). Errors: *Error.
	UpdateCustomer(ctx context.Context, stripeCustomerID string, in CustomerInput) error

	// CreateInvoice creates the draft invoice of a pay-by-invoice payment
	// with its one line; FinalizeAndSendInvoice finalizes and sends it;
	// GetInvoice retrieves one. Idempotency keys derive from the payment
	// id (see invoices.go). Errors: *Error; invalid_request for bad input.
	CreateInvoice(ctx context.Context, in InvoiceInput) (Invoice, error)
	FinalizeAndSendInvoice(ctx context.Context, paymentID, invoiceID string) (Invoice, error)
	GetInvoice(ctx context.Context, id string) (Invoice, error)

	// InvoicesPaidBy answers which invoices a PaymentIntent paid, through
	// the Invoice Payments API (GET /v1/invoice_payments with
	// payment[type]=payment_intent and payment[payment_intent]=id), at most
	// MaxInvoicePayments of them: a refund or dispute of an invoice's
	// PaymentIntent (Stripe's own, without tally's metadata) is traced to
	// the invoice it paid. Errors: *Error; invalid_request when id is empty.
	InvoicesPaidBy(ctx context.Context, paymentIntentID string) ([]InvoicePayment, error)

	// ListEvents lists Stripe's events of up to 20 types created since a
	// time (Stripe keeps 30 days), oldest first, each re-encoded as a
	// webhook body: all of them, or, when there are more than
	// MaxListedEvents, the oldest MaxListedEvents and more=true (list again
	// from the newest returned for the rest). Errors: *Error.
	ListEvents(ctx context.Context, since time.Time, types []string) (events []RawEvent, more bool, err error)

	// CancelMeterEvent cancels one meter event at Stripe with a meter event
	// adjustment of type cancel (POST /v1/billing/meter_event_adjustments),
	// idempotency key "tally-cancel-<identifier>". Stripe cancels events
	// only within 24 hours of receiving them. It is never retried here.
	// Errors: *Error, as for CreateMeterEvent; invalid_request when the
	// event name or identifier is missing.
	CancelMeterEvent(ctx context.Context, eventName, identifier string) error

	// BillingPeriod returns the current billing period of the Stripe
	// customer's active (or trialing) subscription to price
	// (GET /v1/subscriptions?customer=&price=); ok is false when there is
	// none. Errors: *Error (rate_limited, unavailable,
	// payment_provider_error); invalid_request when an argument is empty.
	BillingPeriod(ctx context.Context, stripeCustomerID, price string) (period Period, ok bool, err error)

	// GetMeterErrorReport fetches a meter error report, the thin v2 event
	// eventID (GET /v2/core/events/{id}): the meter events Stripe took and
	// then refused (see metererrors.go). Errors: *Error; invalid_request
	// when eventID is empty.
	GetMeterErrorReport(ctx context.Context, eventID string) (MeterErrorReport, error)

	// ListMeterErrorReports lists one meter's error reports created since
	// a time, oldest first, as the thin events Stripe delivers (see
	// metererrors.go), for a catch-up. Errors: *Error.
	ListMeterErrorReports(ctx context.Context, meterID string, since time.Time) ([]RawEvent, error)
	SavedCardClient
}

// MaxStreamEvents is the most events Stripe accepts in one v2 meter event
// stream request.
const MaxStreamEvents = 100

// CustomerInput describes the Stripe Customer to create for a tally customer.
type CustomerInput struct {
	TallyCustomerID string
	Email           string // optional
	Name            string // optional
	Address         *Address
	TaxID           *TaxID // sent when the Stripe Customer is created
}

// Customer is a created Stripe Customer.
type Customer struct {
	ID string
}

// Checkout Session modes.
const (
	ModePayment      = "payment"
	ModeSubscription = "subscription"
)

// LineItem is the one item a Checkout Session sells: either an ad-hoc price
// (Name, UnitAmount in the currency's minor unit, Currency) or an existing
// Stripe Price (StripePrice). Quantity 0 omits the quantity, which Stripe
// requires for metered prices.
type LineItem struct {
	Name        string
	UnitAmount  int64
	Currency    string
	StripePrice string
	Quantity    int64
}

// CheckoutSessionInput describes a Checkout Session for one tally payment.
type CheckoutSessionInput struct {
	PaymentID        string // required; names the idempotency key
	TallyCustomerID  string // required; copied into metadata
	StripeCustomerID string // optional; the session's customer
	Mode             string // ModePayment or ModeSubscription
	LineItem         LineItem
	SuccessURL       string
	CancelURL        string
	ExpiresAt        time.Time // zero: Stripe's default (24 h)
	// InvoiceCreation asks for an invoice after a one-time payment. It is
	// ignored in subscription mode, where Stripe always invoices.
	InvoiceCreation bool
	// SaveCard keeps the card for later off-session charges
	// (payment_intent_data[setup_future_usage]=off_session); payment mode only.
	SaveCard          bool
	Metadata          map[string]string
	ClientReferenceID string // optional
}

// CheckoutSession is a Checkout Session as created or retrieved.
type CheckoutSession struct {
	ID              string
	URL             string
	ExpiresAt       time.Time
	PaymentIntentID string // empty until the buyer pays (and at creation)
	Mode            string
	Status          string // open, complete, expired
	PaymentStatus   string // paid, unpaid, no_payment_required
	Livemode        bool
	Metadata        map[string]string
	// Currency is what the buyer is charged in; AmountSubtotal is the total
	// before discounts and taxes, AmountTotal after them (what the
	// PaymentIntent collects), AmountTax the tax Stripe Tax added, all in
	// Currency's minor unit.
	Currency       string
	AmountSubtotal int64
	AmountTotal    int64
	AmountTax      int64
	// Conversion is set when Adaptive Pricing converted the session into the
	// buyer's currency (sessions created before 2025-03-31): Currency and
	// the amounts above are then the buyer's, Conversion's are in the
	// currency the session was created in.
	Conversion *CurrencyConversion
}

// CurrencyConversion is a Checkout Session's currency_conversion: its
// amounts in the currency it was created in (SourceCurrency).
type CurrencyConversion struct {
	SourceCurrency string
	AmountSubtotal int64
	AmountTotal    int64
}

// MeterEvent is one usage event for a Stripe Billing Meter. Value and the
// Stripe customer travel in the payload under Stripe's default keys
// (stripe_customer_id, value), as strings.
type MeterEvent struct {
	EventName        string
	StripeCustomerID string
	Identifier       string
	Value            int64
	Timestamp        time.Time // zero: Stripe uses the time of receipt
}

// MeterEventSession authenticates v2 meter event stream requests.
type MeterEventSession struct {
	Token     string
	ExpiresAt time.Time
}

// SummaryInput selects Stripe's aggregated usage of one customer on one meter.
type SummaryInput struct {
	MeterID          string
	StripeCustomerID string
	Start, End       time.Time // minute aligned; End exclusive
}

// Summary is Stripe's aggregated usage over [Start, End).
type Summary struct {
	Start, End      time.Time
	AggregatedValue float64
}

// Config configures New.
type Config struct {
	// SecretKey is the Stripe secret or restricted key. Required.
	SecretKey string
	// APIURL overrides Stripe's API base URL (stripe-mock, a fake).
	APIURL string
	// MeterEventsURL overrides the base URL of the v2 meter event stream
	// host; empty means APIURL when that is set, else Stripe's default.
	MeterEventsURL string
	// HTTPClient is the client to use; its transport is wrapped, not changed.
	HTTPClient *http.Client
	// Timeout bounds one HTTP attempt; default 20s.
	Timeout time.Duration
	// MaxNetworkRetries is how often stripe-go retries customer, Checkout and
	// summary requests after a network failure; 0 means the default 2 and a
	// negative value means none. Meter event requests are never retried.
	MaxNetworkRetries int64
	// Logger receives stripe-go's request log at debug level. Nil discards it.
	Logger *slog.Logger
}

// Defaults of Config.
const (
	DefaultTimeout           = 20 * time.Second
	DefaultMaxNetworkRetries = 2
)

type client struct {
	api         *stripe.Client // retries network failures
	meter       *stripe.Client // never retries
	meterStream stripe.Backend // v2 stream host, never retries
}

// New builds a Client from cfg. It fails with invalid_request when the key
// is missing.
func New(cfg Config) (Client, error) {
	if strings.TrimSpace(cfg.SecretKey) == "" {
		return nil, errs.E(errs.Invalid, "stripeapi: a Stripe secret key is required")
	}
	timeout := cfg.Timeout
	if timeout == 0 {
		timeout = DefaultTimeout
	}
	retries := cfg.MaxNetworkRetries
	switch {
	case retries == 0:
		retries = DefaultMaxNetworkRetries
	case retries < 0:
		retries = 0
	}
	logger := cfg.Logger
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}

	httpClient := &http.Client{}
	if cfg.HTTPClient != nil {
		*httpClient = *cfg.HTTPClient // a copy: the caller's client stays untouched
	}
	if cfg.Timeout != 0 || httpClient.Timeout == 0 {
		httpClient.Timeout = timeout
	}
	base := httpClient.Transport
	if base == nil {
		base = http.DefaultTransport
	}
	httpClient.Transport = &capturingTransport{base: base}

	meterURL := cfg.MeterEventsURL
	if meterURL == "" {
		meterURL = cfg.APIURL
	}
	backend := func(typ stripe.SupportedBackend, url string, retries int64) stripe.Backend {
		bc := &stripe.BackendConfig{
			EnableTelemetry:   stripe.Bool(false),
			HTTPClient:        httpClient,
			LeveledLogger:     leveledLogger{logger},
			MaxNetworkRetries: stripe.Int64(retries),
		}
		if url != "" {
			bc.URL = stripe.String(url)
		}
		return stripe.GetBackendWithConfig(typ, bc)
	}
	apiBackends := &stripe.Backends{
		API:         backend(stripe.APIBackend, cfg.APIURL, retries),
		Connect:     backend(stripe.ConnectBackend, "", retries),
		Uploads:     backend(stripe.UploadsBackend, "", retries),
		MeterEvents: backend(stripe.MeterEventsBackend, meterURL, 0),
	}
	meterBackends := &stripe.Backends{
		API:         backend(stripe.APIBackend, cfg.APIURL, 0),
		Connect:     apiBackends.Connect,
		Uploads:     apiBackends.Uploads,
		MeterEvents: apiBackends.MeterEvents,
	}
	return &client{
		api:         stripe.NewClient(cfg.SecretKey, stripe.WithBackends(apiBackends)),
		meter:       stripe.NewClient(cfg.SecretKey, stripe.WithBackends(meterBackends)),
		meterStream: meterBackends.MeterEvents,
	}, nil
}

func (c *client) CreateCustomer(ctx context.Context, in CustomerInput) (Customer, error) {
	if in.TallyCustomerID == "" {
		return Customer{}, errs.E(errs.Invalid, "stripeapi: a tally customer id is required")
	}
	params := &stripe.CustomerCreateParams{
		Metadata: map[string]string{MetadataCustomerID: in.TallyCustomerID},
	}
	if in.Email != "" {
		params.Email = stripe.String(in.Email)
	}
	if in.Name != "" {
		params.Name = stripe.String(in.Name)
	}
	params.Address = in.Address.params()
	if t := in.TaxID; t != nil && t.Type != "" && t.Value != "" {
		params.TaxIDData = []*stripe.CustomerCreateTaxIDDataParams{{Type: stripe.String(t.Type), Value: stripe.String(t.Value)}}
	}
	params.SetIdempotencyKey("tally-customer-" + in.TallyCustomerID)

	ctx, capture := withCapture(ctx)
	cus, err := c.api.V1Customers.Create(ctx, params)
	if err != nil {
		return Customer{}, classify("create customer", err, capture, false)
	}
	return Customer{ID: cus.ID}, nil
}

func (in CheckoutSessionInput) validate() error {
	var problems []string
	if in.PaymentID == "" {
		problems = append(problems, "a payment id is required")
	}
	if in.TallyCustomerID == "" {
		problems = append(problems, "a tally customer id is required")
	}
	if in.Mode != ModePayment && in.Mode != ModeSubscription {
		problems = append(problems, fmt.Sprintf("mode must be %q or %q, not %q", ModePayment, ModeSubscription, in.Mode))
	}
	li := in.LineItem
	switch {
	case li.StripePrice != "" && (li.Name != "" || li.UnitAmount != 0 || li.Currency != ""):
		problems = append(problems, "a line item has either a Stripe price or name, amount and currency, not both")
	case li.StripePrice == "" && (li.Name == "" || li.UnitAmount <= 0 || li.Currency == ""):
		problems = append(problems, "a line item needs a Stripe price, or a name, a positive unit amount and a currency")
	}
	if li.Quantity < 0 {
		problems = append(problems, "quantity must not be negative")
	}
	if in.SuccessURL == "" {
		problems = append(problems, "a success URL is required")
	}
	if len(problems) > 0 {
		return errs.E(errs.Invalid, "stripeapi: checkout session: %s", strings.Join(problems, "; "))
	}
	return nil
}

func (c *client) CreateCheckoutSession(ctx context.Context, in CheckoutSessionInput) (CheckoutSession, error) {
	if err := in.validate(); err != nil {
		return CheckoutSession{}, err
	}
	metadata := maps.Clone(in.Metadata)
	if metadata == nil {
		metadata = map[string]string{}
	}
	metadata[MetadataPaymentID] = in.PaymentID
	metadata[MetadataCustomerID] = in.TallyCustomerID

	item := &stripe.CheckoutSessionCreateLineItemParams{}
	if in.LineItem.StripePrice != "" {
		item.Price = stripe.String(in.LineItem.StripePrice)
	} else {
		item.PriceData = &stripe.CheckoutSessionCreateLineItemPriceDataParams{
			Currency:    stripe.String(strings.ToLower(in.LineItem.Currency)),
			UnitAmount:  stripe.Int64(in.LineItem.UnitAmount),
			ProductData: &stripe.CheckoutSessionCreateLineItemPriceDataProductDataParams{Name: stripe.String(in.LineItem.Name)},
		}
	}
	if in.LineItem.Quantity > 0 {
		item.Quantity = stripe.Int64(in.LineItem.Quantity)
	}

	params := &stripe.CheckoutSessionCreateParams{
		Mode:       stripe.String(in.Mode),
		LineItems:  []*stripe.CheckoutSessionCreateLineItemParams{item},
		SuccessURL: stripe.String(in.SuccessURL),
		Metadata:   metadata,
	}
	if in.CancelURL != "" {
		params.CancelURL = stripe.String(in.CancelURL)
	}
	if in.StripeCustomerID != "" {
		params.Customer = stripe.String(in.StripeCustomerID)
	}
	if in.ClientReferenceID != "" {
		params.ClientReferenceID = stripe.String(in.ClientReferenceID)
	}
	if !in.ExpiresAt.IsZero() {
		params.ExpiresAt = stripe.Int64(in.ExpiresAt.Unix())
	}
	switch in.Mode {
	case ModePayment:
		params.PaymentIntentData = &stripe.CheckoutSessionCreatePaymentIntentDataParams{Metadata: maps.Clone(metadata)}
		if in.SaveCard {
			params.PaymentIntentData.SetupFutureUsage = stripe.String("off_session")
		}
		if in.InvoiceCreation {
			// The invoice carries our ids too, so invoice.finalized and
			// invoice.paid can show it on the payment.
			params.InvoiceCreation = &stripe.CheckoutSessionCreateInvoiceCreationParams{Enabled: stripe.Bool(true),
				InvoiceData: &stripe.CheckoutSessionCreateInvoiceCreationInvoiceDataParams{Metadata: maps.Clone(metadata)}}
		}
	case ModeSubscription:
		params.SubscriptionData = &stripe.CheckoutSessionCreateSubscriptionDataParams{Metadata: maps.Clone(metadata)}
	}
	params.SetIdempotencyKey("tally-checkout-" + in.PaymentID)

	ctx, capture := withCapture(ctx)
	s, err := c.api.V1CheckoutSessions.Create(ctx, params)
	if err != nil {
		return CheckoutSession{}, classify("create checkout session", err, capture, false)
	}
	return checkoutSession(s), nil
}

func (c *client) GetCheckoutSession(ctx context.Context, id string) (CheckoutSession, error) {
	if strings.TrimSpace(id) == "" {
		return CheckoutSession{}, errs.E(errs.Invalid, "stripeapi: a Checkout Session id is required")
	}
	ctx, capture := withCapture(ctx)
	s, err := c.api.V1CheckoutSessions.Retrieve(ctx, id, &stripe.CheckoutSessionRetrieveParams{})
	if err != nil {
		return CheckoutSession{}, classify("retrieve checkout session", err, capture, false)
	}
	return checkoutSession(s), nil
}

// checkoutSession keeps what tally reads of a stripe-go Checkout Session.
func checkoutSession(s *stripe.CheckoutSession) CheckoutSession {
	out := CheckoutSession{
		ID: s.ID, URL: s.URL, Mode: string(s.Mode), Status: string(s.Status), PaymentStatus: string(s.PaymentStatus),
		Livemode: s.Livemode, Metadata: s.Metadata, Currency: string(s.Currency),
		AmountSubtotal: s.AmountSubtotal, AmountTotal: s.AmountTotal,
	}
	if s.ExpiresAt != 0 {
		out.ExpiresAt = time.Unix(s.ExpiresAt, 0).UTC()
	}
	if s.PaymentIntent != nil {
		out.PaymentIntentID = s.PaymentIntent.ID
	}
	if s.TotalDetails != nil {
		out.AmountTax = s.TotalDetails.AmountTax
	}
	if cc := s.CurrencyConversion; cc != nil && cc.SourceCurrency != "" {
		out.Conversion = &CurrencyConversion{SourceCurrency: string(cc.SourceCurrency), AmountSubtotal: cc.AmountSubtotal, AmountTotal: cc.AmountTotal}
	}
	return out
}

func (ev MeterEvent) validate() error {
	var problems []string
	if ev.EventName == "" {
		problems = append(problems, "an event name is required")
	}
	if ev.StripeCustomerID == "" {
		problems = append(problems, "a Stripe customer id is required")
	}
	if ev.Identifier == "" {
		problems = append(problems, "an identifier is required")
	}
	if len(problems) > 0 {
		return errs.E(errs.Invalid, "stripeapi: meter event %q: %s", ev.Identifier, strings.Join(problems, "; "))
	}
	return nil
}

func (ev MeterEvent) payload() map[string]string {
	return map[string]string{
		"stripe_customer_id": ev.StripeCustomerID,
		"value":              strconv.FormatInt(ev.Value, 10),
	}
}

func (c *client) CreateMeterEvent(ctx context.Context, ev MeterEvent) error {
	if err := ev.validate(); err != nil {
		return err
	}
	params := &stripe.BillingMeterEventCreateParams{
		EventName:  stripe.String(ev.EventName),
		Identifier: stripe.String(ev.Identifier),
		Payload:    ev.payload(),
	}
	if !ev.Timestamp.IsZero() {
		params.Timestamp = stripe.Int64(ev.Timestamp.Unix())
	}
	ctx, capture := withCapture(ctx)
	if _, err := c.meter.V1BillingMeterEvents.Create(ctx, params); err != nil {
		return classify("create meter event", err, capture, true)
	}
	return nil
}

func (c *client) OpenMeterEventSession(ctx context.Context) (MeterEventSession, error) {
	ctx, capture := withCapture(ctx)
	s, err := c.meter.V2BillingMeterEventSessions.Create(ctx, &stripe.V2BillingMeterEventSessionCreateParams{})
	if err != nil {
		return MeterEventSession{}, classify("open meter event session", err, capture, false)
	}
	if s.AuthenticationToken == "" {
		return MeterEventSession{}, newError(KindServer, "open meter event session", capture.snapshot(), "", "Stripe answered without an authentication token", nil)
	}
	return MeterEventSession{Token: s.AuthenticationToken, ExpiresAt: s.ExpiresAt}, nil
}

func (c *client) SendMeterEventStream(ctx context.Context, session MeterEventSession, evs []MeterEvent) error {
	if len(evs) == 0 {
		return nil
	}
	if len(evs) > MaxStreamEvents {
		return errs.E(errs.Invalid, "stripeapi: at most %d events per stream request, got %d", MaxStreamEvents, len(evs))
	}
	if session.Token == "" {
		return errs.E(errs.Invalid, "stripeapi: a meter event session token is required")
	}
	params := &stripe.V2BillingMeterEventStreamCreateParams{
		Events: make([]*stripe.V2BillingMeterEventStreamCreateEventParams, 0, len(evs)),
	}
	for _, ev := range evs {
		if err := ev.validate(); err != nil {
			return err
		}
		p := &stripe.V2BillingMeterEventStreamCreateEventParams{
			EventName:  stripe.String(ev.EventName),
			Identifier: stripe.String(ev.Identifier),
			Payload:    ev.payload(),
		}
		if !ev.Timestamp.IsZero() {
			p.Timestamp = stripe.Time(ev.Timestamp.UTC())
		}
		params.Events = append(params.Events, p)
	}
	ctx, capture := withCapture(ctx)
	params.Context = ctx
	// The stream authenticates with the session token instead of the secret
	// key, so it is called on the backend directly rather than through
	// stripe.Client, whose services are bound to the secret key.
	err := c.meterStream.Call(http.MethodPost, "/v2/billing/meter_event_stream", session.Token, params, &stripe.APIResource{})
	if err != nil {
		return classify("send meter event stream", err, capture, true)
	}
	return nil
}

func (c *client) MeterEventSummaries(ctx context.Context, in SummaryInput) ([]Summary, error) {
	var problems []string
	if in.MeterID == "" {
		problems = append(problems, "a meter id is required")
	}
	if in.StripeCustomerID == "" {
		problems = append(problems, "a Stripe customer id is required")
	}
	if !in.Start.Equal(in.Start.Truncate(time.Minute)) || !in.End.Equal(in.End.Truncate(time.Minute)) {
		problems = append(problems, "start and end must be minute aligned")
	}
	if !in.End.After(in.Start) {
		problems = append(problems, "end must be after start")
	}
	if len(problems) > 0 {
		return nil, errs.E(errs.Invalid, "stripeapi: meter event summaries: %s", strings.Join(problems, "; "))
	}
	params := &stripe.BillingMeterEventSummaryListParams{
		ID:        stripe.String(in.MeterID),
		Customer:  stripe.String(in.StripeCustomerID),
		StartTime: stripe.Int64(in.Start.Unix()),
		EndTime:   stripe.Int64(in.End.Unix()),
	}
	ctx, capture := withCapture(ctx)
	var out []Summary
	for s, err := range c.api.V1BillingMeterEventSummaries.List(ctx, params) {
		if err != nil {
			return nil, classify("list meter event summaries", err, capture, false)
		}
		out = append(out, Summary{
			Start:           time.Unix(s.StartTime, 0).UTC(),
			End:             time.Unix(s.EndTime, 0).UTC(),
			AggregatedValue: s.AggregatedValue,
		})
	}
	return out, nil
}
