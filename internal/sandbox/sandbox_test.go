package sandbox_test

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"reflect"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tallybilling/tally/internal/sandbox"
)

// clock is a settable clock.
type clock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *clock) Add(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

// endpoint is a webhook receiver that records what it was sent and
// answers what answer says (200 by default), with reply as the body
// ({"received":true} by default).
type endpoint struct {
	srv    *httptest.Server
	mu     sync.Mutex
	got    []delivery
	answer func(n int) int
	reply  string
}

type delivery struct {
	Type, ID  string
	Signature string
	Body      []byte
	Status    int
}

func newEndpoint(t *testing.T) *endpoint {
	e := &endpoint{}
	e.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		var ev struct{ ID, Type string }
		_ = json.Unmarshal(body, &ev)
		e.mu.Lock()
		status, reply := http.StatusOK, `{"received":true}`
		if e.answer != nil {
			status = e.answer(len(e.got))
		}
		if e.reply != "" {
			reply = e.reply
		}
		e.got = append(e.got, delivery{Type: ev.Type, ID: ev.ID, Signature: r.Header.Get("Stripe-Signature"), Body: body, Status: status})
		e.mu.Unlock()
		w.WriteHeader(status)
		_, _ = io.WriteString(w, reply)
	}))
	t.Cleanup(e.srv.Close)
	return e
}

func (e *endpoint) deliveries() []delivery {
	e.mu.Lock()
	defer e.mu.Unlock()
	return append([]delivery(nil), e.got...)
}

// typesOK are the types of the deliveries answered 2xx, in order.
func (e *endpoint) typesOK() []string {
	var out []string
	for _, d := range e.deliveries() {
		if d.Status < 300 {
			out = append(out, d.Type)
		}
	}
	return out
}

const secret = "whsec_sandbox_test"

type harness struct {
	acct  *sandbox.Account
	api   *httptest.Server
	hook  *endpoint
	clock *clock
}

func newHarness(t *testing.T) *harness {
	t.Helper()
	h := &harness{hook: newEndpoint(t), clock: &clock{now: time.Now().Truncate(time.Second)}}
	acct, err := sandbox.New(context.Background(), sandbox.Options{
		SecretKey: "sk_test_sandbox", PublicURL: "http://sandbox.test",
		Webhook: &sandbox.Endpoint{URL: h.hook.srv.URL, Secret: secret},
		Now:     h.clock.Now, RetryBase: time.Second, RetryMax: time.Minute,
	})
	if err != nil {
		t.Fatal(err)
	}
	h.acct = acct
	h.api = httptest.NewServer(sandbox.NewAPI(acct))
	t.Cleanup(h.api.Close)
	return h
}

// call sends a request to the sandbox's API as tally's client would.
func (h *harness) call(t *testing.T, method, path, key string, form url.Values) (int, map[string]any, http.Header) {
	t.Helper()
	var body io.Reader
	if form != nil {
		body = strings.NewReader(form.Encode())
	}
	req, err := http.NewRequest(method, h.api.URL+path, body)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer sk_test_sandbox")
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	if key != "" {
		req.Header.Set("Idempotency-Key", key)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	var out map[string]any
	if err := json.Unmarshal(raw, &out); err != nil {
		t.Fatalf("%s %s: %q is not JSON", method, path, raw)
	}
	return resp.StatusCode, out, resp.Header
}

// session creates a Checkout Session for one 1000-cent item as tally does.
func (h *harness) session(t *testing.T, extra url.Values) string {
	t.Helper()
	form := url.Values{
		"mode": {"payment"}, "success_url": {"http://app.test/ok?s={CHECKOUT_SESSION_ID}"}, "cancel_url": {"http://app.test/no"},
		"line_items[0][price_data][currency]": {"usd"}, "line_items[0][price_data][unit_amount]": {"1000"},
		"line_items[0][price_data][product_data][name]": {"Starter"}, "line_items[0][quantity]": {"1"},
		"metadata[tally_payment_id]": {"pay_1"}, "payment_intent_data[metadata][tally_payment_id]": {"pay_1"},
	}
	for k, v := range extra {
		form[k] = v
	}
	status, cs, _ := h.call(t, http.MethodPost, "/v1/checkout/sessions", "", form)
	if status != http.StatusOK {
		t.Fatalf("create session: %d %v", status, cs)
	}
	return cs["id"].(string)
}

// payAndDeliver pays a new session with the card that succeeds and runs
// every delivery then due.
func (h *harness) payAndDeliver(t *testing.T) {
	t.Helper()
	if _, err := h.acct.Pay(context.Background(), h.session(t, nil), "4242424242424242", ""); err != nil {
		t.Fatal(err)
	}
	h.deliverAll(t)
}

func (h *harness) deliverAll(t *testing.T) {
	t.Helper()
	h.acct.DeliverDue(context.Background())
}

func wantTypes(t *testing.T, what string, got, want []string) {
	t.Helper()
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("%s: events\n  %v\nwant\n  %v", what, got, want)
	}
}

func TestCardPaymentSendsStripesEventsInOrder(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	id := h.session(t, nil)
	res, err := h.acct.Pay(context.Background(), id, "4242 4242 4242 4242", "ada@example.com")
	if err != nil || res.Outcome != sandbox.CardSucceeds || res.RedirectURL != "http://app.test/ok?s="+id {
		t.Fatalf("pay: %+v, %v", res, err)
	}
	h.deliverAll(t)
	wantTypes(t, "a card payment", h.hook.typesOK(), []string{"payment_intent.created", "charge.succeeded", "payment_intent.succeeded", "checkout.session.completed"})

	_, cs, _ := h.call(t, http.MethodGet, "/v1/checkout/sessions/"+id+"?expand[0]=payment_intent", "", nil)
	pi, _ := cs["payment_intent"].(map[string]any)
	if cs["status"] != "complete" || cs["payment_status"] != "paid" || pi == nil || pi["status"] != "succeeded" ||
		pi["amount_received"] != float64(1000) || pi["metadata"].(map[string]any)["tally_payment_id"] != "pay_1" {
		t.Fatalf("session after payment: %v", cs)
	}
}

func TestDeclinedCardsLeaveTheSessionOpen(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	id := h.session(t, nil)
	for _, c := range []struct{ card, code, msg string }{
		{"4000000000000002", "generic_decline", "Your card was declined."},
		{"4000 0000 0000 9995", "insufficient_funds", "Your card has insufficient funds."},
	} {
		res, err := h.acct.Pay(context.Background(), id, c.card, "")
		if err != nil || res.Outcome != sandbox.CardDeclined || res.Message != c.msg {
			t.Fatalf("pay with %s: %+v, %v", c.card, res, err)
		}
		v, _ := h.acct.Checkout(context.Background(), id)
		if v.Status != "open" || v.LastError != c.msg {
			t.Fatalf("after %s: session %+v, want open showing %q", c.card, v, c.msg)
		}
	}
	// Then the buyer pays with a good card, in the same session and with the same PaymentIntent.
	if _, err := h.acct.Pay(context.Background(), id, "4242424242424242", ""); err != nil {
		t.Fatal(err)
	}
	h.deliverAll(t)
	wantTypes(t, "two declines then a success", h.hook.typesOK(), []string{
		"payment_intent.created", "charge.failed", "payment_intent.payment_failed",
		"charge.failed", "payment_intent.payment_failed",
		"charge.succeeded", "payment_intent.succeeded", "checkout.session.completed"})
	var pis []string
	for _, d := range h.hook.deliveries() {
		if strings.HasPrefix(d.Type, "payment_intent.") {
			var ev struct {
				Data struct {
					Object struct {
						ID               string
						LastPaymentError *struct {
							DeclineCode string `json:"decline_code"`
						} `json:"last_payment_error"`
					}
				}
			}
			_ = json.Unmarshal(d.Body, &ev)
			pis = append(pis, ev.Data.Object.ID)
		}
	}
	for _, pi := range pis {
		if pi != pis[0] {
			t.Fatalf("PaymentIntents %v: one session, one PaymentIntent", pis)
		}
	}
	if _, err := h.acct.Pay(context.Background(), id, "4242424242424242", ""); err == nil {
		t.Fatal("a completed session was paid again")
	}
}

func TestAuthenticationApprovedOrFailed(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	failed := h.session(t, nil)
	res, err := h.acct.Pay(context.Background(), failed, "4000002760003184", "")
	if err != nil || res.Outcome != sandbox.CardAuthenticate {
		t.Fatalf("3DS card: %+v, %v", res, err)
	}
	if v, _ := h.acct.Checkout(context.Background(), failed); !v.AwaitingAuthentication {
		t.Fatalf("the page does not show the authentication step: %+v", v)
	}
	res, err = h.acct.Authenticate(context.Background(), failed, false)
	if err != nil || res.Outcome != sandbox.CardDeclined || !strings.Contains(res.Message, "unable to authenticate") {
		t.Fatalf("failed authentication: %+v, %v", res, err)
	}
	approved := h.session(t, nil)
	if _, err := h.acct.Pay(context.Background(), approved, "4000 0027 6000 3184", ""); err != nil {
		t.Fatal(err)
	}
	if res, err := h.acct.Authenticate(context.Background(), approved, true); err != nil || res.Outcome != sandbox.CardSucceeds {
		t.Fatalf("approved authentication: %+v, %v", res, err)
	}
	h.deliverAll(t)
	wantTypes(t, "3DS failed, then 3DS approved", h.hook.typesOK(), []string{
		"payment_intent.created", "payment_intent.requires_action", "payment_intent.payment_failed",
		"payment_intent.created", "payment_intent.requires_action", "charge.succeeded", "payment_intent.succeeded", "checkout.session.completed"})
}

func TestRefundsAndDisputesInStripesOrder(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	ctx := context.Background()
	pay := func() string {
		id := h.session(t, nil)
		if _, err := h.acct.Pay(ctx, id, "4242424242424242", ""); err != nil {
			t.Fatal(err)
		}
		return h.acct.Object(id)["payment_intent"].(string)
	}
	refunded, won, lost := pay(), pay(), pay()
	h.deliverAll(t)
	before := len(h.hook.typesOK())

	if _, err := h.acct.Refund(ctx, refunded, 300, ""); err != nil {
		t.Fatal(err)
	}
	if _, err := h.acct.Refund(ctx, refunded, 800, ""); err == nil {
		t.Fatal("refunded 800 of the 700 left")
	}
	// The rest, through the API as a script would.
	status, re, _ := h.call(t, http.MethodPost, "/v1/refunds", "", url.Values{"payment_intent": {refunded}})
	if status != http.StatusOK || re["amount"] != float64(700) {
		t.Fatalf("refund the rest: %d %v", status, re)
	}
	if _, err := h.acct.OpenDispute(ctx, won, ""); err != nil {
		t.Fatal(err)
	}
	if _, err := h.acct.Refund(ctx, won, 0, ""); err == nil {
		t.Fatal("refunded a disputed charge")
	}
	if _, err := h.acct.CloseDispute(ctx, won, true); err != nil {
		t.Fatal(err)
	}
	if _, err := h.acct.OpenDispute(ctx, lost, ""); err != nil {
		t.Fatal(err)
	}
	if _, err := h.acct.CloseDispute(ctx, lost, false); err != nil {
		t.Fatal(err)
	}
	if _, err := h.acct.CloseDispute(ctx, lost, true); err == nil {
		t.Fatal("a lost dispute was won afterwards")
	}
	h.deliverAll(t)
	wantTypes(t, "refunds and disputes", h.hook.typesOK()[before:], []string{
		"charge.refunded", "refund.created", "charge.refunded", "refund.created",
		"charge.dispute.created", "charge.dispute.funds_withdrawn", "charge.dispute.updated", "charge.dispute.closed", "charge.dispute.funds_reinstated",
		"charge.dispute.created", "charge.dispute.funds_withdrawn", "charge.dispute.closed"})
	// charge.refunded carries the cumulative amount_refunded.
	var refundedTotals []float64
	for _, d := range h.hook.deliveries() {
		if d.Type == "charge.refunded" {
			var ev struct {
				Data struct{ Object map[string]any }
			}
			_ = json.Unmarshal(d.Body, &ev)
			refundedTotals = append(refundedTotals, ev.Data.Object["amount_refunded"].(float64))
		}
	}
	if !reflect.DeepEqual(refundedTotals, []float64{300, 1000}) {
		t.Fatalf("charge.refunded amount_refunded %v, want [300 1000]", refundedTotals)
	}
}

func TestEveryDeliveryIsSignedWithTheEndpointSecret(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	h.payAndDeliver(t)
	deliveries := h.hook.deliveries()
	if len(deliveries) != 4 {
		t.Fatalf("%d deliveries, want 4", len(deliveries))
	}
	for _, d := range deliveries {
		ts, err := strconv.ParseInt(strings.TrimPrefix(strings.Split(d.Signature, ",")[0], "t="), 10, 64)
		if err != nil {
			t.Fatalf("signature %q has no timestamp", d.Signature)
		}
		want := sandbox.Sign(d.Body, secret, time.Unix(ts, 0))
		if d.Signature != want || !strings.Contains(d.Signature, ",v1=") {
			t.Fatalf("%s signed %q, want %q", d.Type, d.Signature, want)
		}
	}
}

func TestDeliveriesAreRetriedWhileTheEndpointFails(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	down := true
	var mu sync.Mutex
	h.hook.answer = func(int) int {
		mu.Lock()
		defer mu.Unlock()
		if down {
			return http.StatusServiceUnavailable
		}
		return http.StatusOK
	}
	h.payAndDeliver(t) // four events, four failures
	for _, ev := range h.acct.Events() {
		if d := ev.Delivery; d.Status != sandbox.DeliveryPending || d.Attempts != 1 || !d.NextAttemptAt.Equal(h.clock.Now().Add(time.Second)) {
			t.Fatalf("%s after one failure: %+v, want pending, retried in 1s", ev.Type, *d)
		}
	}
	h.clock.Add(time.Second)
	h.deliverAll(t) // second failures: next in 2s
	h.clock.Add(time.Second)
	if n := h.acct.DeliverDue(context.Background()); n != 0 {
		t.Fatalf("%d deliveries attempted 1s after the second failure, want none before 2s", n)
	}
	mu.Lock()
	down = false
	mu.Unlock()
	h.clock.Add(time.Second)
	h.deliverAll(t)
	wantTypes(t, "once the endpoint is back", h.hook.typesOK(), []string{"payment_intent.created", "charge.succeeded", "payment_intent.succeeded", "checkout.session.completed"})
	for _, ev := range h.acct.Events() {
		if d := ev.Delivery; d.Status != sandbox.DeliverySucceeded || d.Attempts != 3 || *d.LastStatus != 200 {
			t.Fatalf("%s: %+v, want succeeded at the third attempt", ev.Type, *d)
		}
	}
	attempts := h.acct.Attempts()
	if len(attempts) != 12 || attempts[0].Status != http.StatusServiceUnavailable || !strings.Contains(attempts[0].Answer, "received") {
		t.Fatalf("%d attempts recorded (first %+v), want 12 with the endpoint's answers", len(attempts), attempts[0])
	}

	// An endpoint that does not answer at all: the attempt records why.
	h.hook.srv.Close()
	h.payAndDeliver(t)
	last := h.acct.Attempts()[len(h.acct.Attempts())-1]
	if last.Status != 0 || last.Error == "" {
		t.Fatalf("attempt at a closed endpoint: %+v, want no status and the error", last)
	}
}

func TestIdempotencyKeysAreHonoured(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	form := url.Values{"mode": {"payment"}, "success_url": {"http://app.test/ok"},
		"line_items[0][price_data][currency]": {"usd"}, "line_items[0][price_data][unit_amount]": {"500"}, "line_items[0][price_data][product_data][name]": {"X"}}
	status, first, _ := h.call(t, http.MethodPost, "/v1/checkout/sessions", "tally-checkout-pay_1", form)
	if status != 200 {
		t.Fatalf("create: %d %v", status, first)
	}
	status, again, header := h.call(t, http.MethodPost, "/v1/checkout/sessions", "tally-checkout-pay_1", form)
	if status != 200 || again["id"] != first["id"] || header.Get("Idempotent-Replayed") != "true" {
		t.Fatalf("replay: %d %v %v, want the first session replayed", status, again["id"], header)
	}
	other := url.Values{}
	for k, v := range form {
		other[k] = v
	}
	other.Set("line_items[0][price_data][unit_amount]", "900")
	status, refused, _ := h.call(t, http.MethodPost, "/v1/checkout/sessions", "tally-checkout-pay_1", other)
	if status != 400 || refused["error"].(map[string]any)["type"] != "idempotency_error" {
		t.Fatalf("same key, other parameters: %d %v, want 400 idempotency_error", status, refused)
	}
	if n := len(h.acct.Objects("checkout.session")); n != 1 {
		t.Fatalf("%d sessions, want 1", n)
	}
	// Stripe keeps a key 24 hours; after that it is a new request.
	h.clock.Add(25 * time.Hour)
	if _, later, _ := h.call(t, http.MethodPost, "/v1/checkout/sessions", "tally-checkout-pay_1", other); later["id"] == first["id"] || later["id"] == nil {
		t.Fatalf("a key 25h old replayed %v", later)
	}
	// An event names the request and its key.
	h.call(t, http.MethodPost, "/v1/customers", "tally-customer-c1", url.Values{"metadata[tally_customer_id]": {"c1"}})
	evs := h.acct.Events()
	var ev struct {
		Request struct {
			ID             string `json:"id"`
			IdempotencyKey string `json:"idempotency_key"`
		} `json:"request"`
	}
	_ = json.Unmarshal(evs[len(evs)-1].Payload, &ev)
	if ev.Request.IdempotencyKey != "tally-customer-c1" || !strings.HasPrefix(ev.Request.ID, "req_") {
		t.Fatalf("customer.created request %+v", ev.Request)
	}
}

func TestSessionsExpireWithTheirPaymentIntent(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	id := h.session(t, url.Values{"expires_at": {itoa(h.clock.Now().Add(time.Hour).Unix())}})
	if _, err := h.acct.Pay(context.Background(), id, "4000000000000002", ""); err != nil {
		t.Fatal(err)
	}
	h.clock.Add(time.Hour)
	if n, err := h.acct.ExpireDue(context.Background()); n != 1 || err != nil {
		t.Fatalf("ExpireDue = %d, %v", n, err)
	}
	if _, err := h.acct.Pay(context.Background(), id, "4242424242424242", ""); err == nil {
		t.Fatal("an expired session was paid")
	}
	h.deliverAll(t)
	wantTypes(t, "a declined session expiring", h.hook.typesOK(), []string{
		"payment_intent.created", "charge.failed", "payment_intent.payment_failed", "payment_intent.canceled", "checkout.session.expired"})
}

func TestInvoiceLifecycle(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	_, nomail, _ := h.call(t, http.MethodPost, "/v1/customers", "", url.Values{"name": {"No Mail"}})
	_, cus, _ := h.call(t, http.MethodPost, "/v1/customers", "", url.Values{"name": {"Acme"}, "email": {"ap@acme.example"},
		"address[line1]": {"1 Main St"}, "address[country]": {"DE"}, "tax_id_data[0][type]": {"eu_vat"}, "tax_id_data[0][value]": {"DE123456789"}})
	if addr, _ := cus["address"].(map[string]any); addr["line1"] != "1 Main St" || addr["country"] != "DE" {
		t.Fatalf("customer address %v", cus["address"])
	}
	// As at Stripe, an invoice is sent only to a customer with an email.
	_, lone, _ := h.call(t, http.MethodPost, "/v1/invoices", "", url.Values{"customer": {nomail["id"].(string)}, "collection_method": {"send_invoice"}, "days_until_due": {"1"}})
	h.call(t, http.MethodPost, "/v1/invoiceitems", "", url.Values{"invoice": {lone["id"].(string)}, "amount": {"100"}, "currency": {"usd"}})
	h.call(t, http.MethodPost, "/v1/invoices/"+lone["id"].(string)+"/finalize", "", url.Values{})
	if status, out, _ := h.call(t, http.MethodPost, "/v1/invoices/"+lone["id"].(string)+"/send", "", url.Values{}); status != 400 {
		t.Fatalf("sent to a customer without an email: %d %v", status, out)
	}
	status, inv, _ := h.call(t, http.MethodPost, "/v1/invoices", "", url.Values{"customer": {cus["id"].(string)}, "collection_method": {"send_invoice"},
		"days_until_due": {"30"}, "metadata[tally_payment_id]": {"pay_9"}, "custom_fields[0][name]": {"PO"}, "custom_fields[0][value]": {"PO-1"}})
	if status != 200 {
		t.Fatalf("create invoice: %d %v", status, inv)
	}
	id := inv["id"].(string)
	if status, item, _ := h.call(t, http.MethodPost, "/v1/invoiceitems", "", url.Values{"invoice": {id}, "amount": {"50000"}, "currency": {"usd"}, "description": {"Pro pack"}}); status != 200 {
		t.Fatalf("item: %d %v", status, item)
	}
	for _, step := range []string{"finalize", "send", "pay"} {
		if status, out, _ := h.call(t, http.MethodPost, "/v1/invoices/"+id+"/"+step, "", url.Values{}); status != 200 {
			t.Fatalf("%s: %d %v", step, status, out)
		}
	}
	_, paid, _ := h.call(t, http.MethodGet, "/v1/invoices/"+id, "", nil)
	if paid["status"] != "paid" || paid["amount_paid"] != float64(50000) || paid["number"] == nil || paid["hosted_invoice_url"] == nil {
		t.Fatalf("paid invoice: %v", paid)
	}
	if status, _, _ := h.call(t, http.MethodPost, "/v1/invoices/"+id+"/void", "", url.Values{}); status != 400 {
		t.Fatalf("voiding a paid invoice answered %d, want 400", status)
	}
	h.deliverAll(t)
	got := h.hook.typesOK()
	// The two customer.created, and the unsent invoice's three events, first.
	wantTypes(t, "an invoice paid", got[5:], []string{"invoice.created", "invoiceitem.created", "invoice.finalized", "invoice.sent", "invoice.paid", "invoice.payment_succeeded"})

	// The event list shows them too, newest first, filtered by type.
	_, list, _ := h.call(t, http.MethodGet, "/v1/events?types[]=invoice.paid&types[]=invoice.finalized&limit=10", "", nil)
	data := list["data"].([]any)
	if len(data) != 3 || data[0].(map[string]any)["type"] != "invoice.paid" {
		t.Fatalf("GET /v1/events: %v", list)
	}
}

// GET /v1/invoice_payments answers which invoice a PaymentIntent paid:
// Checkout's invoice for its PaymentIntent, nothing for any other.
func TestInvoicePaymentsOfAPaymentIntent(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	id := h.session(t, url.Values{"invoice_creation[enabled]": {"true"}})
	if _, err := h.acct.Pay(context.Background(), id, "4242 4242 4242 4242", "ada@example.com"); err != nil {
		t.Fatal(err)
	}
	_, cs, _ := h.call(t, http.MethodGet, "/v1/checkout/sessions/"+id, "", nil)
	pi, inv := cs["payment_intent"].(string), cs["invoice"]
	status, list, _ := h.call(t, http.MethodGet, "/v1/invoice_payments?payment[type]=payment_intent&payment[payment_intent]="+pi, "", nil)
	data, _ := list["data"].([]any)
	if status != http.StatusOK || len(data) != 1 || inv == nil {
		t.Fatalf("invoice payments of %s: %d %v (session's invoice %v)", pi, status, list, inv)
	}
	if ip := data[0].(map[string]any); ip["invoice"] != inv || ip["status"] != "paid" || ip["payment"].(map[string]any)["payment_intent"] != pi {
		t.Fatalf("invoice payment %v, want %v paid by %s", ip, inv, pi)
	}
	status, list, _ = h.call(t, http.MethodGet, "/v1/invoice_payments?payment[type]=payment_intent&payment[payment_intent]=pi_other", "", nil)
	if data, _ := list["data"].([]any); status != http.StatusOK || len(data) != 0 {
		t.Fatalf("invoice payments of another PaymentIntent: %d %v", status, list)
	}
}

func TestLiveKeysAreRefused(t *testing.T) {
	t.Parallel()
	for _, key := range []string{"sk_live_123", "rk_live_123"} {
		if _, err := sandbox.New(context.Background(), sandbox.Options{SecretKey: key}); err == nil {
			t.Fatalf("the sandbox took the live key %s", key)
		}
	}
	h := newHarness(t)
	req, _ := http.NewRequest(http.MethodPost, h.api.URL+"/v1/customers", strings.NewReader(""))
	req.Header.Set("Authorization", "Bearer sk_test_other")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("another key: %d, want 401", resp.StatusCode)
	}
}

func itoa(n int64) string { return strconv.FormatInt(n, 10) }

func TestSavedCardsPayOffSession(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	ctx := context.Background()
	_, cus, _ := h.call(t, http.MethodPost, "/v1/customers", "", url.Values{"email": {"ada@example.com"}})
	customer := cus["id"].(string)

	// A pack bought with the card saved for later.
	bought := h.session(t, url.Values{"customer": {customer}, "payment_intent_data[setup_future_usage]": {"off_session"}})
	if _, err := h.acct.Pay(ctx, bought, "4242424242424242", ""); err != nil {
		t.Fatal(err)
	}
	// A card saved in setup mode, and one that is saved but declines charges.
	saveCard := func(card string) {
		status, cs, _ := h.call(t, http.MethodPost, "/v1/checkout/sessions", "", url.Values{"mode": {"setup"}, "customer": {customer},
			"success_url": {"http://app.test/ok"}, "setup_intent_data[metadata][tally_customer_id]": {"ada"}})
		if status != 200 {
			t.Fatalf("setup session: %d %v", status, cs)
		}
		if res, err := h.acct.Pay(ctx, cs["id"].(string), card, ""); err != nil || res.Outcome != sandbox.CardSucceeds {
			t.Fatalf("save %s: %+v %v", card, res, err)
		}
	}
	saveCard("4000002760003184")
	saveCard("4000000000000341")
	h.deliverAll(t)
	wantTypes(t, "a card saved while paying, two in setup mode", h.hook.typesOK()[1:], []string{
		"payment_intent.created", "payment_method.attached", "charge.succeeded", "payment_intent.succeeded", "checkout.session.completed",
		"setup_intent.created", "payment_method.attached", "setup_intent.succeeded", "checkout.session.completed",
		"setup_intent.created", "payment_method.attached", "setup_intent.succeeded", "checkout.session.completed"})

	_, list, _ := h.call(t, http.MethodGet, "/v1/customers/"+customer+"/payment_methods", "", nil)
	pms := list["data"].([]any)
	if len(pms) != 3 {
		t.Fatalf("%d saved payment methods, want 3", len(pms))
	}
	last4 := func(pm any) string { return pm.(map[string]any)["card"].(map[string]any)["last4"].(string) }
	id := func(pm any) string { return pm.(map[string]any)["id"].(string) }
	if last4(pms[0]) != "0341" || last4(pms[1]) != "3184" || last4(pms[2]) != "4242" {
		t.Fatalf("saved cards %v, newest first", list)
	}
	if status, out, _ := h.call(t, http.MethodPost, "/v1/customers/"+customer, "", url.Values{"invoice_settings[default_payment_method]": {id(pms[2])}}); status != 200 ||
		out["invoice_settings"].(map[string]any)["default_payment_method"] != id(pms[2]) {
		t.Fatalf("set the default: %d %v", status, out)
	}

	charge := func(pm, key string) (int, map[string]any, http.Header) {
		return h.call(t, http.MethodPost, "/v1/payment_intents", key, url.Values{"amount": {"1000"}, "currency": {"usd"}, "customer": {customer},
			"payment_method": {pm}, "off_session": {"true"}, "confirm": {"true"}, "metadata[tally_payment_id]": {"pay_auto"}})
	}
	before := len(h.acct.Objects("payment_intent"))
	status, pi, _ := charge(id(pms[2]), "tally-auto-top-up-1")
	if status != 200 || pi["status"] != "succeeded" || pi["amount_received"] != float64(1000) {
		t.Fatalf("off-session charge of the saved 4242: %d %v", status, pi)
	}
	if status, again, header := charge(id(pms[2]), "tally-auto-top-up-1"); status != 200 || again["id"] != pi["id"] || header.Get("Idempotent-Replayed") != "true" {
		t.Fatalf("the same key again: %d %v", status, again["id"])
	}
	for _, c := range []struct{ pm, key, code string }{{id(pms[1]), "tally-auto-top-up-2", "authentication_required"}, {id(pms[0]), "tally-auto-top-up-3", "card_declined"}} {
		status, refused, _ := charge(c.pm, c.key)
		e := refused["error"].(map[string]any)
		if status != http.StatusPaymentRequired || e["type"] != "card_error" || e["code"] != c.code || e["payment_intent"].(map[string]any)["status"] != "requires_payment_method" {
			t.Fatalf("off-session %s: %d %v", c.code, status, refused)
		}
		if status, replay, header := charge(c.pm, c.key); status != http.StatusPaymentRequired || header.Get("Idempotent-Replayed") != "true" ||
			replay["error"].(map[string]any)["payment_intent"].(map[string]any)["id"] != e["payment_intent"].(map[string]any)["id"] {
			t.Fatalf("a declined key replayed: %d %v", status, replay)
		}
	}
	if n := len(h.acct.Objects("payment_intent")) - before; n != 3 {
		t.Fatalf("%d PaymentIntents created for 3 keys sent twice each, want 3", n)
	}
	h.deliverAll(t)
	got := h.hook.typesOK()
	wantTypes(t, "off-session: a success, an authentication_required, a decline", got[len(got)-8:], []string{
		"payment_intent.created", "charge.succeeded", "payment_intent.succeeded",
		"payment_intent.created", "payment_intent.payment_failed",
		"payment_intent.created", "charge.failed", "payment_intent.payment_failed"})
}

// A subscription's billing period ends a calendar month after it starts,
// on its start's day, or on the last day of a shorter month, as Stripe
// counts periods: one started January 31 ends February 28 (February 29 in
// a leap year), not March 3.
func TestSubscriptionPeriodsEndOnTheAnchorDay(t *testing.T) {
	t.Parallel()
	for _, c := range []struct{ start, end time.Time }{
		{time.Date(2027, 1, 31, 10, 0, 0, 0, time.UTC), time.Date(2027, 2, 28, 10, 0, 0, 0, time.UTC)},
		{time.Date(2028, 1, 31, 10, 0, 0, 0, time.UTC), time.Date(2028, 2, 29, 10, 0, 0, 0, time.UTC)},
		{time.Date(2027, 3, 31, 10, 0, 0, 0, time.UTC), time.Date(2027, 4, 30, 10, 0, 0, 0, time.UTC)},
		{time.Date(2027, 12, 15, 10, 0, 0, 0, time.UTC), time.Date(2028, 1, 15, 10, 0, 0, 0, time.UTC)},
	} {
		h := newHarness(t)
		h.clock.mu.Lock()
		h.clock.now = c.start
		h.clock.mu.Unlock()
		cs := h.session(t, url.Values{"mode": {"subscription"}, "line_items[0][price]": {"price_metered"},
			"line_items[0][price_data][unit_amount]": nil, "line_items[0][price_data][currency]": nil,
			"line_items[0][price_data][product_data][name]": nil, "line_items[0][quantity]": nil})
		if _, err := h.acct.Pay(context.Background(), cs, "4242424242424242", "sub@example.com"); err != nil {
			t.Fatal(err)
		}
		status, list, _ := h.call(t, http.MethodGet, "/v1/subscriptions?price=price_metered", "", nil)
		data, _ := list["data"].([]any)
		if status != http.StatusOK || len(data) != 1 {
			t.Fatalf("subscriptions from %s: %d %v", c.start, status, list)
		}
		items := data[0].(map[string]any)["items"].(map[string]any)["data"].([]any)
		item := items[0].(map[string]any)
		if got := time.Unix(int64(item["current_period_end"].(float64)), 0).UTC(); !got.Equal(c.end) {
			t.Errorf("a subscription started %s ends its period %s, want %s", c.start, got, c.end)
		}
	}
}

// Stripe takes a meter event stamped within the past 35 days or up to 5
// minutes ahead of its own clock, and refuses any other with a 400 naming
// the timestamp; an event without a timestamp is stamped now.
func TestMeterEventsOutsideStripesWindowAreRefused(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	now := h.clock.Now()
	send := func(id string, at *time.Time) (int, map[string]any) {
		form := url.Values{"event_name": {"api_calls"}, "identifier": {id}, "payload[stripe_customer_id]": {"cus_1"}, "payload[value]": {"1"}}
		if at != nil {
			form.Set("timestamp", strconv.FormatInt(at.Unix(), 10))
		}
		status, body, _ := h.call(t, http.MethodPost, "/v1/billing/meter_events", "", form)
		return status, body
	}
	for _, c := range []struct {
		id     string
		at     *time.Time
		status int
		says   string
	}{
		{"now", nil, 200, ""},
		{"ahead-5m", new(now.Add(5 * time.Minute)), 200, ""},
		{"ahead-5m1s", new(now.Add(5*time.Minute + time.Second)), 400, "5 minutes in the future"},
		{"past-35d", new(now.Add(-35 * 24 * time.Hour)), 200, ""},
		{"past-35d1s", new(now.Add(-35*24*time.Hour - time.Second)), 400, "35 days in past"},
	} {
		status, body := send(c.id, c.at)
		if status != c.status {
			t.Errorf("%s: %d %v, want %d", c.id, status, body, c.status)
			continue
		}
		if c.status == 400 {
			e, _ := body["error"].(map[string]any)
			if e["type"] != "invalid_request_error" || e["param"] != "timestamp" || !strings.Contains(e["message"].(string), c.says) {
				t.Errorf("%s: error %v, want invalid_request_error on timestamp saying %q", c.id, e, c.says)
			}
		}
	}
	if got := len(h.acct.MeterEvents()); got != 3 {
		t.Errorf("the sandbox holds %d meter events, want the 3 inside the window", got)
	}
}
