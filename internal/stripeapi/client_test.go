package stripeapi_test

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tallybilling/tally/internal/errs"
	"github.com/tallybilling/tally/internal/stripeapi"
	"github.com/tallybilling/tally/internal/stripeapi/stripefake"
)

func newFakeClient(t *testing.T, f *stripefake.Fake, mod ...func(*stripeapi.Config)) stripeapi.Client {
	t.Helper()
	cfg := stripeapi.Config{SecretKey: "sk_test_fake", APIURL: f.URL(), Timeout: 5 * time.Second}
	for _, m := range mod {
		m(&cfg)
	}
	c, err := stripeapi.New(cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	return c
}

func requireStripeError(t *testing.T, err error, kind stripeapi.Kind, code errs.Code) *stripeapi.Error {
	t.Helper()
	if err == nil {
		t.Fatalf("err = nil, want a %s error", kind)
	}
	se, ok := stripeapi.AsError(err)
	if !ok {
		t.Fatalf("err = %v (%T), want *stripeapi.Error", err, err)
	}
	if se.Kind != kind {
		t.Fatalf("kind = %s, want %s (err: %v)", se.Kind, kind, err)
	}
	if got := errs.CodeOf(err); got != code {
		t.Fatalf("errs.CodeOf = %s, want %s (err: %v)", got, code, err)
	}
	return se
}

func requestsTo(f *stripefake.Fake, path string) []stripefake.RecordedRequest {
	var out []stripefake.RecordedRequest
	for _, r := range f.Requests() {
		if r.Path == path {
			out = append(out, r)
		}
	}
	return out
}

// meterEventAt is the timestamp of meterEvent's events: an hour ago, inside
// the window Stripe (and the fake) accepts, to the second as Stripe keeps it.
var meterEventAt = time.Now().Add(-time.Hour).Truncate(time.Second)

func meterEvent(id string) stripeapi.MeterEvent {
	return stripeapi.MeterEvent{
		EventName: "api_calls", StripeCustomerID: "cus_a", Identifier: id, Value: 2,
		Timestamp: meterEventAt,
	}
}

func TestNewNeedsAKey(t *testing.T) {
	t.Parallel()
	if _, err := stripeapi.New(stripeapi.Config{}); errs.CodeOf(err) != errs.Invalid {
		t.Fatalf("New without key: err = %v, want invalid_request", err)
	}
	for _, key := range []string{"sk_live_abc", "rk_live_abc", "sk_test_abc", "rk_test_abc"} {
		if _, err := stripeapi.New(stripeapi.Config{SecretKey: key}); err != nil {
			t.Fatalf("New(%s): %v", key, err)
		}
	}
}

func TestCreateCustomerSendsIdempotencyKeyAndMetadata(t *testing.T) {
	t.Parallel()
	f := stripefake.New(t)
	c := newFakeClient(t, f)
	ctx := context.Background()
	in := stripeapi.CustomerInput{TallyCustomerID: "c-42", Email: "ada@example.com", Name: "Ada"}

	first, err := c.CreateCustomer(ctx, in)
	if err != nil {
		t.Fatalf("CreateCustomer: %v", err)
	}
	second, err := c.CreateCustomer(ctx, in)
	if err != nil {
		t.Fatalf("CreateCustomer again: %v", err)
	}
	if !strings.HasPrefix(first.ID, "cus_") || first.ID != second.ID {
		t.Fatalf("ids = %q, %q; want one cus_ id twice (idempotent replay)", first.ID, second.ID)
	}
	reqs := requestsTo(f, "/v1/customers")
	if len(reqs) != 2 {
		t.Fatalf("fake saw %d customer requests, want 2", len(reqs))
	}
	for _, r := range reqs {
		if r.IdempotencyKey != "tally-customer-c-42" {
			t.Errorf("Idempotency-Key = %q, want tally-customer-c-42", r.IdempotencyKey)
		}
	}
	created := f.Customers()
	if len(created) != 1 {
		t.Fatalf("fake created %d customers, want 1", len(created))
	}
	form := created[0]
	for k, want := range map[string]string{
		"metadata[tally_customer_id]": "c-42", "email": "ada@example.com", "name": "Ada",
	} {
		if got := form.Get(k); got != want {
			t.Errorf("%s = %q, want %q", k, got, want)
		}
	}
}

func TestCreateCheckoutSessionPaymentMode(t *testing.T) {
	t.Parallel()
	f := stripefake.New(t)
	c := newFakeClient(t, f)
	expires := time.Now().Add(time.Hour).Truncate(time.Second)
	s, err := c.CreateCheckoutSession(context.Background(), stripeapi.CheckoutSessionInput{
		PaymentID: "p-7", TallyCustomerID: "c-1", StripeCustomerID: "cus_x",
		Mode:       stripeapi.ModePayment,
		LineItem:   stripeapi.LineItem{Name: "100 credits", UnitAmount: 500, Currency: "USD", Quantity: 1},
		SuccessURL: "https://app.example.com/ok", CancelURL: "https://app.example.com/cancel",
		ExpiresAt: expires, InvoiceCreation: true, ClientReferenceID: "ref-7",
		Metadata: map[string]string{"catalog_item": "pack_100"},
	})
	if err != nil {
		t.Fatalf("CreateCheckoutSession: %v", err)
	}
	if !strings.HasPrefix(s.ID, "cs_test_") || s.URL == "" || !s.ExpiresAt.Equal(expires) || s.PaymentIntentID != "" {
		t.Fatalf("session = %+v, want cs_test_ id, a URL, expires_at %v, no payment intent", s, expires)
	}
	reqs := requestsTo(f, "/v1/checkout/sessions")
	if len(reqs) != 1 || reqs[0].IdempotencyKey != "tally-checkout-p-7" {
		t.Fatalf("checkout requests = %+v, want one with Idempotency-Key tally-checkout-p-7", reqs)
	}
	form := f.CheckoutSessions()[0]
	want := map[string]string{
		"mode":                                   "payment",
		"customer":                               "cus_x",
		"client_reference_id":                    "ref-7",
		"success_url":                            "https://app.example.com/ok",
		"cancel_url":                             "https://app.example.com/cancel",
		"expires_at":                             strconv.FormatInt(expires.Unix(), 10),
		"invoice_creation[enabled]":              "true",
		"line_items[0][price_data][currency]":    "usd",
		"line_items[0][price_data][unit_amount]": "500",
		"line_items[0][price_data][product_data][name]":    "100 credits",
		"line_items[0][quantity]":                          "1",
		"metadata[tally_payment_id]":                       "p-7",
		"metadata[tally_customer_id]":                      "c-1",
		"metadata[catalog_item]":                           "pack_100",
		"payment_intent_data[metadata][tally_payment_id]":  "p-7",
		"payment_intent_data[metadata][tally_customer_id]": "c-1",
		"payment_intent_data[metadata][catalog_item]":      "pack_100",
	}
	for k, v := range want {
		if got := form.Get(k); got != v {
			t.Errorf("%s = %q, want %q", k, got, v)
		}
	}
	for k := range form {
		if strings.HasPrefix(k, "subscription_data") {
			t.Errorf("payment mode sent %s", k)
		}
	}
}

// A retrieved session says which PaymentIntent paid it and what it
// charged: before tax and after, in the buyer's currency, with Adaptive
// Pricing's amounts in the currency it was created in.
func TestGetCheckoutSession(t *testing.T) {
	t.Parallel()
	f := stripefake.New(t)
	c := newFakeClient(t, f)
	ctx := context.Background()
	created, err := c.CreateCheckoutSession(ctx, stripeapi.CheckoutSessionInput{
		PaymentID: "p-9", TallyCustomerID: "c-9", Mode: stripeapi.ModePayment,
		LineItem:   stripeapi.LineItem{Name: "credits", UnitAmount: 1000, Currency: "usd", Quantity: 2},
		SuccessURL: "https://app.example.com/ok",
	})
	if err != nil {
		t.Fatal(err)
	}
	open, err := c.GetCheckoutSession(ctx, created.ID)
	if err != nil {
		t.Fatalf("GetCheckoutSession: %v", err)
	}
	if open.ID != created.ID || open.Status != "open" || open.PaymentIntentID != "" || open.Currency != "usd" ||
		open.AmountSubtotal != 2000 || open.AmountTotal != 2000 || open.Conversion != nil || open.Metadata["tally_payment_id"] != "p-9" {
		t.Fatalf("open session = %+v", open)
	}

	f.PayCheckoutSession(created.ID, "pi_paid")
	f.UpdateCheckoutSession(created.ID, map[string]any{
		"currency": "eur", "amount_subtotal": 1840, "amount_total": 2190,
		"total_details":       map[string]any{"amount_discount": 0, "amount_shipping": 0, "amount_tax": 350},
		"currency_conversion": map[string]any{"source_currency": "usd", "amount_subtotal": 2000, "amount_total": 2380, "fx_rate": "0.92"},
	})
	paid, err := c.GetCheckoutSession(ctx, created.ID)
	if err != nil {
		t.Fatal(err)
	}
	want := stripeapi.CurrencyConversion{SourceCurrency: "usd", AmountSubtotal: 2000, AmountTotal: 2380}
	if paid.PaymentIntentID != "pi_paid" || paid.Status != "complete" || paid.PaymentStatus != "paid" || paid.Currency != "eur" ||
		paid.AmountSubtotal != 1840 || paid.AmountTotal != 2190 || paid.AmountTax != 350 || paid.Conversion == nil || *paid.Conversion != want {
		t.Fatalf("paid session = %+v (conversion %+v)", paid, paid.Conversion)
	}

	_, err = c.GetCheckoutSession(ctx, "cs_unknown")
	if !errs.Is(err, errs.PaymentProviderError) {
		t.Fatalf("unknown session: %v, want payment_provider_error", err)
	}
	if _, err := c.GetCheckoutSession(ctx, " "); !errs.Is(err, errs.Invalid) {
		t.Fatalf("empty id: %v, want invalid_request", err)
	}
}

func TestCreateCheckoutSessionSubscriptionMode(t *testing.T) {
	t.Parallel()
	f := stripefake.New(t)
	c := newFakeClient(t, f)
	_, err := c.CreateCheckoutSession(context.Background(), stripeapi.CheckoutSessionInput{
		PaymentID: "p-8", TallyCustomerID: "c-1", StripeCustomerID: "cus_x",
		Mode:       stripeapi.ModeSubscription,
		LineItem:   stripeapi.LineItem{StripePrice: "price_metered"},
		SuccessURL: "https://app.example.com/ok",
		// Ignored in subscription mode, where Stripe always invoices.
		InvoiceCreation: true,
	})
	if err != nil {
		t.Fatalf("CreateCheckoutSession: %v", err)
	}
	form := f.CheckoutSessions()[0]
	for k, v := range map[string]string{
		"mode":                       "subscription",
		"line_items[0][price]":       "price_metered",
		"metadata[tally_payment_id]": "p-8",
		"subscription_data[metadata][tally_payment_id]":  "p-8",
		"subscription_data[metadata][tally_customer_id]": "c-1",
	} {
		if got := form.Get(k); got != v {
			t.Errorf("%s = %q, want %q", k, got, v)
		}
	}
	for k := range form {
		if strings.HasPrefix(k, "payment_intent_data") || strings.HasPrefix(k, "invoice_creation") ||
			k == "line_items[0][quantity]" || strings.HasPrefix(k, "line_items[0][price_data]") {
			t.Errorf("subscription mode sent %s", k)
		}
	}
}

func TestCreateCheckoutSessionRejectsIncompleteInputWithoutCallingStripe(t *testing.T) {
	t.Parallel()
	f := stripefake.New(t)
	c := newFakeClient(t, f)
	bad := []stripeapi.CheckoutSessionInput{
		{TallyCustomerID: "c", Mode: "payment", LineItem: stripeapi.LineItem{StripePrice: "price_1"}, SuccessURL: "https://x"},
		{PaymentID: "p", TallyCustomerID: "c", Mode: "setup", LineItem: stripeapi.LineItem{StripePrice: "price_1"}, SuccessURL: "https://x"},
		{PaymentID: "p", TallyCustomerID: "c", Mode: "payment", LineItem: stripeapi.LineItem{Name: "x", Currency: "usd"}, SuccessURL: "https://x"},
		{PaymentID: "p", TallyCustomerID: "c", Mode: "payment", LineItem: stripeapi.LineItem{StripePrice: "price_1", UnitAmount: 5}, SuccessURL: "https://x"},
	}
	for i, in := range bad {
		if _, err := c.CreateCheckoutSession(context.Background(), in); errs.CodeOf(err) != errs.Invalid {
			t.Errorf("case %d: err = %v, want invalid_request", i, err)
		}
	}
	if n := len(f.Requests()); n != 0 {
		t.Fatalf("fake saw %d requests, want none", n)
	}
}

func TestCreateMeterEventSendsIdentifierAndPayload(t *testing.T) {
	t.Parallel()
	f := stripefake.New(t)
	c := newFakeClient(t, f)
	if err := c.CreateMeterEvent(context.Background(), meterEvent("usage-1")); err != nil {
		t.Fatalf("CreateMeterEvent: %v", err)
	}
	evs := f.MeterEvents()
	if len(evs) != 1 {
		t.Fatalf("fake holds %d events, want 1", len(evs))
	}
	ev := evs[0]
	if ev.Identifier != "usage-1" || ev.EventName != "api_calls" || ev.Via != "v1" ||
		ev.Payload["stripe_customer_id"] != "cus_a" || ev.Payload["value"] != "2" ||
		!ev.Timestamp.Equal(meterEventAt) {
		t.Fatalf("recorded event = %+v", ev)
	}
	if f.Count("usage-1") != 1 {
		t.Fatalf("Count = %d, want 1", f.Count("usage-1"))
	}
}

func TestMeterEventRateLimitedCarriesRetryAfter(t *testing.T) {
	t.Parallel()
	f := stripefake.New(t)
	c := newFakeClient(t, f)
	f.FailNext(1, http.StatusTooManyRequests, "7")

	err := c.CreateMeterEvent(context.Background(), meterEvent("usage-1"))
	se := requireStripeError(t, err, stripeapi.KindRateLimited, errs.RateLimited)
	if se.RetryAfter != 7*time.Second || se.StatusCode != 429 || se.Code != "rate_limit" || !se.Retryable() {
		t.Fatalf("error = %+v, want status 429, code rate_limit, RetryAfter 7s, retryable", se)
	}
	if n := len(requestsTo(f, "/v1/billing/meter_events")); n != 1 {
		t.Fatalf("fake saw %d meter event requests, want exactly 1 (no retry)", n)
	}
	if f.Count("usage-1") != 0 {
		t.Fatalf("a refused event was counted")
	}
}

func TestMeterEventServerErrorIsNotRetried(t *testing.T) {
	t.Parallel()
	f := stripefake.New(t)
	c := newFakeClient(t, f)
	ctx := context.Background()

	f.FailNext(1, http.StatusInternalServerError, "")
	err := c.CreateMeterEvent(ctx, meterEvent("usage-1"))
	se := requireStripeError(t, err, stripeapi.KindServer, errs.PaymentProviderError)
	if !se.Retryable() || se.StatusCode != 500 {
		t.Fatalf("error = %+v, want retryable 500", se)
	}
	if n := len(requestsTo(f, "/v1/billing/meter_events")); n != 1 {
		t.Fatalf("fake saw %d meter event requests after a 500, want exactly 1", n)
	}

	// stripe-go retries answers without Stripe's JSON error body; meter
	// events must still see exactly one request.
	f.SetFault(func(r *http.Request) (int, string, bool) {
		return http.StatusBadGateway, "<html>bad gateway</html>", true
	})
	err = c.CreateMeterEvent(ctx, meterEvent("usage-2"))
	requireStripeError(t, err, stripeapi.KindServer, errs.PaymentProviderError)
	if n := len(requestsTo(f, "/v1/billing/meter_events")); n != 2 {
		t.Fatalf("fake saw %d meter event requests after a non-JSON 502, want 2 in all", n)
	}
	f.SetFault(nil)

	if err := c.CreateMeterEvent(ctx, meterEvent("usage-1")); err != nil {
		t.Fatalf("CreateMeterEvent after the outage: %v", err)
	}
	if f.Count("usage-1") != 1 || f.Count("usage-2") != 0 {
		t.Fatalf("counts = %d, %d; want 1, 0", f.Count("usage-1"), f.Count("usage-2"))
	}
}

func TestCustomerRequestsAreRetriedButMeterEventsAreNot(t *testing.T) {
	t.Parallel()
	f := stripefake.New(t)
	f.SetFault(func(r *http.Request) (int, string, bool) {
		return http.StatusServiceUnavailable, "upstream unavailable", true
	})
	c := newFakeClient(t, f)
	_, err := c.CreateCustomer(context.Background(), stripeapi.CustomerInput{TallyCustomerID: "c-1"})
	requireStripeError(t, err, stripeapi.KindServer, errs.PaymentProviderError)
	if n := len(requestsTo(f, "/v1/customers")); n != 1+stripeapi.DefaultMaxNetworkRetries {
		t.Fatalf("fake saw %d customer requests, want %d (stripe-go retries)", n, 1+stripeapi.DefaultMaxNetworkRetries)
	}

	noRetry := newFakeClient(t, f, func(c *stripeapi.Config) { c.MaxNetworkRetries = -1 })
	_, err = noRetry.CreateCustomer(context.Background(), stripeapi.CustomerInput{TallyCustomerID: "c-2"})
	requireStripeError(t, err, stripeapi.KindServer, errs.PaymentProviderError)
	if n := len(requestsTo(f, "/v1/customers")); n != 1+stripeapi.DefaultMaxNetworkRetries+1 {
		t.Fatalf("MaxNetworkRetries -1 still retried: %d requests in all", n)
	}
}

func TestMeterEventTimeoutIsANetworkErrorAndNotRetried(t *testing.T) {
	t.Parallel()
	f := stripefake.New(t)
	release := f.HangUntilReleased()

	// Config.Timeout bounds the one attempt. Whether the request reaches the
	// fake before it runs out is up to the machine's load (on a loaded one it
	// may not even be written), so the attempts are counted where they leave
	// the client: stripe-go must not retry a meter event.
	attempts := &countingTransport{base: http.DefaultTransport}
	c := newFakeClient(t, f, func(c *stripeapi.Config) {
		c.Timeout = 200 * time.Millisecond
		c.HTTPClient = &http.Client{Transport: attempts}
	})
	err := c.CreateMeterEvent(context.Background(), meterEvent("usage-1"))
	se := requireStripeError(t, err, stripeapi.KindNetwork, errs.Unavailable)
	if !se.Retryable() || se.StatusCode != 0 {
		t.Fatalf("error = %+v, want retryable with no status", se)
	}
	if n := attempts.count(); n != 1 {
		t.Fatalf("client made %d attempts, want 1 (no retry)", n)
	}

	// The caller's context deadline counts as a network failure too.
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	c2 := newFakeClient(t, f)
	err = c2.CreateMeterEvent(ctx, meterEvent("usage-2"))
	requireStripeError(t, err, stripeapi.KindNetwork, errs.Unavailable)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("errors.Is(err, context.DeadlineExceeded) = false for %v", err)
	}

	// Stripe may have acted on a request whose answer never came. The caller
	// gives up once the fake holds its request (not after a fixed time, which
	// a loaded machine can run out before the request is sent); once the
	// fake lets it through, a resend is a duplicate, which the caller counts
	// as delivered.
	ctx3, cancel3 := context.WithCancel(context.Background())
	defer cancel3()
	done := make(chan error, 1)
	go func() { done <- c2.CreateMeterEvent(ctx3, meterEvent("usage-3")) }()
	waitFor(t, func() bool { return len(meterEventRequests(f, "usage-3")) == 1 })
	cancel3()
	requireStripeError(t, <-done, stripeapi.KindNetwork, errs.Unavailable)
	release()
	waitFor(t, func() bool { return f.Count("usage-3") == 1 })
	err = c2.CreateMeterEvent(context.Background(), meterEvent("usage-3"))
	requireStripeError(t, err, stripeapi.KindDuplicate, errs.PaymentProviderError)
	if n := len(meterEventRequests(f, "usage-3")); n != 2 {
		t.Fatalf("fake saw %d requests for usage-3, want 2 (the hung one and the resend)", n)
	}
}

// countingTransport counts the requests that leave the client.
type countingTransport struct {
	base http.RoundTripper
	mu   sync.Mutex
	n    int
}

func (c *countingTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	c.mu.Lock()
	c.n++
	c.mu.Unlock()
	return c.base.RoundTrip(r)
}

func (c *countingTransport) count() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.n
}

// meterEventRequests returns the v1 meter event requests the fake received
// for identifier.
func meterEventRequests(f *stripefake.Fake, identifier string) []stripefake.RecordedRequest {
	var out []stripefake.RecordedRequest
	for _, r := range requestsTo(f, "/v1/billing/meter_events") {
		if form, err := url.ParseQuery(r.Body); err == nil && form.Get("identifier") == identifier {
			out = append(out, r)
		}
	}
	return out
}

func TestMeterEventDuplicateIdentifier(t *testing.T) {
	t.Parallel()
	f := stripefake.New(t)
	c := newFakeClient(t, f)
	ctx := context.Background()
	if err := c.CreateMeterEvent(ctx, meterEvent("usage-1")); err != nil {
		t.Fatalf("first delivery: %v", err)
	}
	err := c.CreateMeterEvent(ctx, meterEvent("usage-1"))
	se := requireStripeError(t, err, stripeapi.KindDuplicate, errs.PaymentProviderError)
	if !stripeapi.IsDuplicate(err) || se.Retryable() || se.StatusCode != 400 {
		t.Fatalf("error = %+v, want a non-retryable 400 duplicate", se)
	}
	if f.Count("usage-1") != 1 {
		t.Fatalf("Count = %d, want 1", f.Count("usage-1"))
	}
}

func TestMeterEventRefusalsAreClassifiedByStatusCodeAndMessage(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name   string
		status int
		body   string
		kind   stripeapi.Kind
	}{
		{"duplicate by code", 400, `{"error":{"type":"invalid_request_error","code":"resource_already_exists","message":"Meter event exists."}}`, stripeapi.KindDuplicate},
		{"duplicate by message", 400, `{"error":{"type":"invalid_request_error","message":"AN EVENT ALREADY EXISTS WITH IDENTIFIER u-1"}}`, stripeapi.KindDuplicate},
		{"other refusal", 400, `{"error":{"type":"invalid_request_error","code":"resource_missing","message":"No such customer: 'cus_a'"}}`, stripeapi.KindInvalid},
		{"auth", 401, `{"error":{"type":"invalid_request_error","message":"Invalid API Key provided"}}`, stripeapi.KindAuth},
		{"forbidden", 403, `{"error":{"type":"invalid_request_error","message":"restricted key"}}`, stripeapi.KindAuth},
		{"conflict", 409, `{"error":{"type":"invalid_request_error","code":"idempotency_key_in_use","message":"in use"}}`, stripeapi.KindConflict},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			f := stripefake.New(t)
			f.SetFault(func(*http.Request) (int, string, bool) { return tc.status, tc.body, true })
			c := newFakeClient(t, f)
			err := c.CreateMeterEvent(context.Background(), meterEvent("u-1"))
			se := requireStripeError(t, err, tc.kind, errs.PaymentProviderError)
			if se.StatusCode != tc.status || se.Message == "" {
				t.Fatalf("error = %+v, want status %d and Stripe's message", se, tc.status)
			}
		})
	}
}

func TestMeterEventStreamRoundTrip(t *testing.T) {
	t.Parallel()
	f := stripefake.New(t)
	f.SetSessionLifetime(2 * time.Minute)
	c := newFakeClient(t, f)
	ctx := context.Background()

	before := time.Now()
	session, err := c.OpenMeterEventSession(ctx)
	if err != nil {
		t.Fatalf("OpenMeterEventSession: %v", err)
	}
	if session.Token == "" || session.ExpiresAt.Before(before.Add(time.Minute)) || session.ExpiresAt.After(time.Now().Add(2*time.Minute)) {
		t.Fatalf("session = %+v, want a token expiring in about 2 minutes", session)
	}
	ts := meterEventAt
	evs := []stripeapi.MeterEvent{
		{EventName: "api_calls", StripeCustomerID: "cus_a", Identifier: "s-1", Value: 1, Timestamp: ts},
		{EventName: "api_calls", StripeCustomerID: "cus_b", Identifier: "s-2", Value: 5, Timestamp: ts},
	}
	if err := c.SendMeterEventStream(ctx, session, evs); err != nil {
		t.Fatalf("SendMeterEventStream: %v", err)
	}
	got := f.MeterEvents()
	if len(got) != 2 {
		t.Fatalf("fake holds %d events, want 2", len(got))
	}
	for i, ev := range got {
		want := evs[i]
		if ev.Via != "v2" || ev.Identifier != want.Identifier || ev.EventName != want.EventName ||
			ev.Payload["stripe_customer_id"] != want.StripeCustomerID || ev.Payload["value"] != strconv.FormatInt(want.Value, 10) ||
			!ev.Timestamp.Equal(ts) || ev.Duplicate {
			t.Errorf("event %d = %+v, want %+v via v2", i, ev, want)
		}
	}

	tooMany := make([]stripeapi.MeterEvent, stripeapi.MaxStreamEvents+1)
	for i := range tooMany {
		tooMany[i] = meterEvent(fmt.Sprintf("bulk-%d", i))
	}
	if err := c.SendMeterEventStream(ctx, session, tooMany); errs.CodeOf(err) != errs.Invalid {
		t.Fatalf("101 events: err = %v, want invalid_request", err)
	}
	if n := len(requestsTo(f, "/v2/billing/meter_event_stream")); n != 1 {
		t.Fatalf("fake saw %d stream requests, want 1", n)
	}
}

func TestMeterEventStreamExpiredSession(t *testing.T) {
	t.Parallel()
	f := stripefake.New(t)
	c := newFakeClient(t, f)
	ctx := context.Background()
	session, err := c.OpenMeterEventSession(ctx)
	if err != nil {
		t.Fatalf("OpenMeterEventSession: %v", err)
	}
	f.ExpireSessions()

	err = c.SendMeterEventStream(ctx, session, []stripeapi.MeterEvent{meterEvent("s-1")})
	se := requireStripeError(t, err, stripeapi.KindSessionExpired, errs.PaymentProviderError)
	if !stripeapi.IsSessionExpired(err) || se.StatusCode != 401 || se.Code != "billing_meter_event_session_expired" || !se.Retryable() {
		t.Fatalf("error = %+v, want a retryable 401 billing_meter_event_session_expired", se)
	}
	if f.Count("s-1") != 0 {
		t.Fatalf("an event sent with an expired token was accepted")
	}

	fresh, err := c.OpenMeterEventSession(ctx)
	if err != nil {
		t.Fatalf("OpenMeterEventSession again: %v", err)
	}
	if err := c.SendMeterEventStream(ctx, fresh, []stripeapi.MeterEvent{meterEvent("s-1")}); err != nil {
		t.Fatalf("SendMeterEventStream with a new session: %v", err)
	}
	if f.Count("s-1") != 1 {
		t.Fatalf("Count = %d, want 1", f.Count("s-1"))
	}
}

func TestMeterEventStreamIsNotRetriedAndKeepsRetryAfter(t *testing.T) {
	t.Parallel()
	f := stripefake.New(t)
	c := newFakeClient(t, f)
	ctx := context.Background()
	session, err := c.OpenMeterEventSession(ctx)
	if err != nil {
		t.Fatalf("OpenMeterEventSession: %v", err)
	}
	f.FailNext(1, http.StatusInternalServerError, "")
	err = c.SendMeterEventStream(ctx, session, []stripeapi.MeterEvent{meterEvent("s-1")})
	requireStripeError(t, err, stripeapi.KindServer, errs.PaymentProviderError)
	if n := len(requestsTo(f, "/v2/billing/meter_event_stream")); n != 1 {
		t.Fatalf("fake saw %d stream requests after a 500, want 1", n)
	}

	// stripe-go keeps neither status nor headers on v2 errors; the client
	// still reports both.
	f.FailNext(1, http.StatusTooManyRequests, "2")
	err = c.SendMeterEventStream(ctx, session, []stripeapi.MeterEvent{meterEvent("s-1")})
	se := requireStripeError(t, err, stripeapi.KindRateLimited, errs.RateLimited)
	if se.RetryAfter != 2*time.Second || se.StatusCode != 429 {
		t.Fatalf("error = %+v, want status 429 and RetryAfter 2s", se)
	}
}

func TestMeterEventsURLRoutesTheStreamOnly(t *testing.T) {
	t.Parallel()
	api := stripefake.New(t)
	stream := stripefake.New(t)
	c := newFakeClient(t, api, func(c *stripeapi.Config) { c.MeterEventsURL = stream.URL() })
	ctx := context.Background()
	session, err := c.OpenMeterEventSession(ctx)
	if err != nil {
		t.Fatalf("OpenMeterEventSession: %v", err)
	}
	// The stream host does not know the API host's sessions: a 401 from it
	// proves the request went there.
	err = c.SendMeterEventStream(ctx, session, []stripeapi.MeterEvent{meterEvent("s-1")})
	requireStripeError(t, err, stripeapi.KindAuth, errs.PaymentProviderError)
	if len(requestsTo(stream, "/v2/billing/meter_event_stream")) != 1 || len(requestsTo(api, "/v2/billing/meter_event_stream")) != 0 {
		t.Fatalf("stream request went to the wrong host")
	}
	if len(requestsTo(api, "/v2/billing/meter_event_session")) != 1 {
		t.Fatalf("session request did not go to the API host")
	}
}

func TestMeterEventSummaries(t *testing.T) {
	t.Parallel()
	f := stripefake.New(t)
	f.SetMeter("mtr_calls", "api_calls")
	c := newFakeClient(t, f)
	ctx := context.Background()
	start := time.Date(2026, 3, 1, 10, 0, 0, 0, time.UTC)
	end := start.Add(time.Hour)
	f.SetClock(func() time.Time { return end.Add(time.Hour) }) // Stripe takes only the last 35 days
	send := func(id, customer string, value int64, at time.Time) {
		t.Helper()
		err := c.CreateMeterEvent(ctx, stripeapi.MeterEvent{EventName: "api_calls", StripeCustomerID: customer, Identifier: id, Value: value, Timestamp: at})
		if err != nil {
			t.Fatalf("CreateMeterEvent %s: %v", id, err)
		}
	}
	send("in-1", "cus_a", 3, start)
	send("in-2", "cus_a", 4, end.Add(-time.Second))
	send("late", "cus_a", 100, end)
	send("other", "cus_b", 50, start.Add(time.Minute))

	sums, err := c.MeterEventSummaries(ctx, stripeapi.SummaryInput{MeterID: "mtr_calls", StripeCustomerID: "cus_a", Start: start, End: end})
	if err != nil {
		t.Fatalf("MeterEventSummaries: %v", err)
	}
	if len(sums) != 1 || sums[0].AggregatedValue != 7 || !sums[0].Start.Equal(start) || !sums[0].End.Equal(end) {
		t.Fatalf("summaries = %+v, want one of 7 over [%v, %v)", sums, start, end)
	}
	req := requestsTo(f, "/v1/billing/meters/mtr_calls/event_summaries")[0]
	if !strings.Contains(req.Query, "customer=cus_a") || !strings.Contains(req.Query, "start_time="+strconv.FormatInt(start.Unix(), 10)) {
		t.Fatalf("summary query = %q", req.Query)
	}

	f.SetSummaryOverride("cus_a", 6)
	sums, err = c.MeterEventSummaries(ctx, stripeapi.SummaryInput{MeterID: "mtr_calls", StripeCustomerID: "cus_a", Start: start, End: end})
	if err != nil || len(sums) != 1 || sums[0].AggregatedValue != 6 {
		t.Fatalf("summaries with override = %+v, %v; want 6", sums, err)
	}

	_, err = c.MeterEventSummaries(ctx, stripeapi.SummaryInput{MeterID: "mtr_calls", StripeCustomerID: "cus_a", Start: start.Add(time.Second), End: end})
	if errs.CodeOf(err) != errs.Invalid {
		t.Fatalf("unaligned start: err = %v, want invalid_request", err)
	}
}

// Many concurrent calls share one client; each must get the answer to its
// own request (the response capture travels per request).
func TestConcurrentCallsGetTheirOwnErrors(t *testing.T) {
	t.Parallel()
	f := stripefake.New(t)
	f.SetFault(func(r *http.Request) (int, string, bool) {
		if err := r.ParseForm(); err != nil {
			return 0, "", false
		}
		n, _ := strconv.Atoi(strings.TrimPrefix(r.PostForm.Get("identifier"), "c-"))
		switch n % 3 {
		case 0:
			return 0, "", false
		case 1:
			return 429, `{"error":{"type":"invalid_request_error","code":"rate_limit","message":"slow down"}}`, true
		default:
			return 503, `{"error":{"type":"api_error","message":"down"}}`, true
		}
	})
	c := newFakeClient(t, f)
	var wg sync.WaitGroup
	failures := make(chan string, 90)
	for i := range 90 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			err := c.CreateMeterEvent(context.Background(), meterEvent(fmt.Sprintf("c-%d", i)))
			want := []stripeapi.Kind{"", stripeapi.KindRateLimited, stripeapi.KindServer}[i%3]
			if got := stripeapi.KindOf(err); got != want {
				failures <- fmt.Sprintf("c-%d: kind %q, want %q (%v)", i, got, want, err)
			}
			if se, ok := stripeapi.AsError(err); ok && se.StatusCode != []int{0, 429, 503}[i%3] {
				failures <- fmt.Sprintf("c-%d: status %d", i, se.StatusCode)
			}
		}()
	}
	wg.Wait()
	close(failures)
	for msg := range failures {
		t.Error(msg)
	}
	if got := len(f.MeterEvents()); got != 30 {
		t.Fatalf("fake holds %d events, want 30", got)
	}
}

func TestCallerHTTPClientIsNotModified(t *testing.T) {
	t.Parallel()
	f := stripefake.New(t)
	hc := &http.Client{Timeout: 3 * time.Second}
	c := newFakeClient(t, f, func(c *stripeapi.Config) { c.HTTPClient = hc; c.Timeout = 0 })
	if err := c.CreateMeterEvent(context.Background(), meterEvent("u-1")); err != nil {
		t.Fatalf("CreateMeterEvent: %v", err)
	}
	if hc.Transport != nil || hc.Timeout != 3*time.Second {
		t.Fatalf("caller's http.Client was changed: %+v", hc)
	}
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("condition not met within 5s")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// The v2 stream validates its events after it answers: one stamped outside
// Stripe's window (by Stripe's clock) is answered like the others and then
// dropped, never counted. The fake does the same, so a test sending through
// the stream sees what Stripe would bill.
func TestMeterEventStreamDropsEventsOutsideStripesWindow(t *testing.T) {
	t.Parallel()
	f := stripefake.New(t)
	now := time.Now().Truncate(time.Second)
	f.SetClock(func() time.Time { return now })
	c := newFakeClient(t, f)
	ctx := context.Background()
	session, err := c.OpenMeterEventSession(ctx)
	if err != nil {
		t.Fatalf("OpenMeterEventSession: %v", err)
	}
	evs := []stripeapi.MeterEvent{
		{EventName: "api_calls", StripeCustomerID: "cus_a", Identifier: "in-window", Value: 1, Timestamp: now.Add(5 * time.Minute)},
		{EventName: "api_calls", StripeCustomerID: "cus_a", Identifier: "ahead", Value: 2, Timestamp: now.Add(5*time.Minute + time.Second)},
		{EventName: "api_calls", StripeCustomerID: "cus_a", Identifier: "old", Value: 4, Timestamp: now.Add(-35*24*time.Hour - time.Second)},
	}
	if err := c.SendMeterEventStream(ctx, session, evs); err != nil {
		t.Fatalf("SendMeterEventStream: %v (the stream answers before it validates)", err)
	}
	for id, want := range map[string]int{"in-window": 1, "ahead": 0, "old": 0} {
		if got := f.Count(id); got != want {
			t.Errorf("Stripe kept %s %d times, want %d", id, got, want)
		}
	}
	if got := len(f.MeterEvents()); got != 1 {
		t.Errorf("the fake holds %d meter events, want only the one inside the window", got)
	}
}
