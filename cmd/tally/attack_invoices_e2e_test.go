package main

import (
	"bytes"
	"context"
	"io"
	"maps"
	"net/http"
	"strings"
	"sync"
	"testing"

	"github.com/tallybilling/tally/internal/stripeapi"
	"github.com/tallybilling/tally/internal/stripeapi/stripefake"
	"github.com/tallybilling/tally/pkg/client"
)

// The self-attack pass on pay by invoice, sync and dismiss, against the
// running binary: hostile inputs, replays, races between a sync and the
// webhooks on several instances, Stripe failing mid-way.

// rawRequest sends body to path with the service or admin key and returns
// the status and answer.
func rawRequest(t testing.TB, s *server, method, path, key, body string, headers map[string]string) (int, string) {
	t.Helper()
	req, err := http.NewRequest(method, s.URL+path, bytes.NewBufferString(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+key)
	req.Header.Set("Content-Type", "application/json")
	for k, v := range headers {
		req.Header.Set(k, v)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	out, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(out)
}

// Hostile bodies for the new operations get a 4xx problem and write nothing.
func TestAttackInvoicePaymentHostileInputs(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	s := startServer(t, payEnv(t, fake.URL()))
	gdb := openDB(t, s)
	setBilling(t, s, "target")
	key := map[string]string{"Idempotency-Key": "k"}
	path := "/v1/customers/target/invoice-payments"
	for _, c := range []struct {
		name, body string
		headers    map[string]string
		status     int
	}{
		{"no idempotency key", `{"item":"starter"}`, nil, 400},
		{"malformed JSON", `{"item":`, key, 400},
		{"unknown field (an amount)", `{"item":"starter","amount":1}`, key, 400},
		{"credits in the body", `{"item":"starter","credits":1000000}`, key, 400},
		{"negative quantity", `{"item":"starter","quantity":-1}`, key, 400},
		{"huge quantity", `{"item":"starter","quantity":100000}`, key, 400},
		{"quantity as a string", `{"item":"starter","quantity":"2"}`, key, 400},
		{"days until due negative", `{"item":"starter","days_until_due":-1}`, key, 400},
		{"days until due over a year", `{"item":"starter","days_until_due":9999}`, key, 400},
		{"purchase order too long", `{"item":"starter","purchase_order":"` + strings.Repeat("x", 141) + `"}`, key, 400},
		{"a NUL in the memo", `{"item":"starter","memo":"a\u0000b"}`, key, 422},
		{"a bell in the purchase order", `{"item":"starter","purchase_order":"PO\u0007"}`, key, 422},
		{"a plan", `{"item":"api"}`, key, 422},
	} {
		status, out := rawRequest(t, s, http.MethodPost, path, testServiceKey, c.body, c.headers)
		// Schema violations are 422 (the gate's convention), unreadable bodies 400.
		if (status != c.status && !(c.status == 400 && status == 422)) || !strings.Contains(out, `"code"`) {
			t.Errorf("%s: %d %s, want %d with a problem", c.name, status, out, c.status)
		}
	}
	// Another customer's path with a malformed id, and the admin operations' bad bodies.
	if status, out := rawRequest(t, s, http.MethodPost, "/v1/customers/bad%20id/invoice-payments", testServiceKey, `{"item":"starter"}`, key); status != 400 {
		t.Errorf("a malformed customer id: %d %s", status, out)
	}
	for _, c := range []struct{ name, path, body string }{
		{"dismiss without a reason", "/v1/admin/stripe-events/evt_x/dismiss", `{}`},
		{"dismiss with an empty reason", "/v1/admin/stripe-events/evt_x/dismiss", `{"reason":""}`},
		{"dismiss with a huge reason", "/v1/admin/stripe-events/evt_x/dismiss", `{"reason":"` + strings.Repeat("x", 1001) + `"}`},
		{"sync since not a time", "/v1/admin/stripe-sync", `{"since":"yesterday"}`},
		{"sync with an unknown field", "/v1/admin/stripe-sync", `{"all":true}`},
	} {
		if status, out := rawRequest(t, s, http.MethodPost, c.path, testAdminKey, c.body, nil); status != 400 && status != 422 {
			t.Errorf("%s: %d %s, want 400 or 422", c.name, status, out)
		}
	}
	if status, _ := rawRequest(t, s, http.MethodPost, "/v1/admin/stripe-sync", testServiceKey, `{}`, nil); status != 403 {
		t.Errorf("a service key syncing: %d, want 403", status)
	}
	// Billing details: a bad country, a bad tax id type, a bad email.
	for _, body := range []string{`{"billing":{"address":{"country":"Germany"}}}`, `{"billing":{"tax_id":{"type":"VAT","value":"1"}}}`,
		`{"billing":{"email":"not an email"}}`, `{"billing":{"name":"a\u0007b"}}`} {
		if status, out := rawRequest(t, s, http.MethodPut, "/v1/customers/target", testServiceKey, body, nil); status < 400 || status > 422 {
			t.Errorf("billing %s: %d %s, want 4xx", body, status, out)
		}
	}
	if n := countRows(t, gdb, `SELECT count(*) FROM payments`); n != 0 {
		t.Fatalf("hostile requests wrote %d payments", n)
	}
	if n := len(fake.Sandbox().Objects("invoice")); n != 0 {
		t.Fatalf("hostile requests created %d invoices", n)
	}
	if c := readCustomer(t, s, "target"); c.Billing == nil || deref(c.Billing.Email) != "ap@target.example" {
		t.Fatalf("hostile billing updates changed the customer: %+v", c.Billing)
	}
}

// Stripe fails to send the invoice: the request answers an error, the
// payment is failed with the reason (Stripe's internals hidden from end
// users), nothing is stored under the key, and the same key then succeeds.
func TestAttackStripeFailsMidInvoice(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	s := startServer(t, payEnv(t, fake.URL()))
	gdb := openDB(t, s)
	setBilling(t, s, "flaky")
	fake.SetFault(func(r *http.Request) (int, string, bool) {
		if strings.HasSuffix(r.URL.Path, "/send") {
			return 400, `{"error":{"type":"invalid_request_error","message":"sending is broken today"}}`, true
		}
		return 0, "", false
	})
	r := payByInvoice(t, s, "flaky", "starter", 1, "flaky-1", "")
	if r.StatusCode() < 400 {
		t.Fatalf("a failed send answered %d", r.StatusCode())
	}
	var failed string
	if err := gdb.Raw(`SELECT id FROM payments WHERE customer_id = 'flaky'`).Scan(&failed).Error; err != nil || failed == "" {
		t.Fatalf("the failed attempt's payment: %v", err)
	}
	p := getPayment(t, s, failed)
	if p.Status != client.PaymentStatusFailed || !strings.HasPrefix(deref(p.FailureReason), "invoice creation failed") {
		t.Fatalf("after the failed send: %s (%s)", p.Status, deref(p.FailureReason))
	}
	fake.SetFault(nil)
	again := payByInvoice(t, s, "flaky", "starter", 1, "flaky-1", "")
	mustStatus(t, "the same key after the failure", again.StatusCode(), again.Body, http.StatusCreated)
	if again.JSON201.PaymentId == failed || again.HTTPResponse.Header.Get("Idempotent-Replayed") == "true" {
		t.Fatalf("the retry replayed the failure: %+v", again.JSON201)
	}
	deliver(t, s, stripeEvent(newEventID(), "invoice.paid", invoiceActionAt(t, fake, again.JSON201.Invoice.Id, "pay")))
	if bal := balanceOf(t, gdb, "flaky"); bal != starterCredits {
		t.Fatalf("balance %d, want %d", bal, starterCredits)
	}
	assertInvariants(t, s)
}

// A sync races the webhooks: three instances on one database each run
// syncs while the same payments' events arrive, concurrently, for Checkout
// and pay-by-invoice payments, and an operator replays a stored
// invoice.paid. Every payment is credited exactly once; concurrent syncs
// are refused with 409, never run twice at once.
func TestAttackSyncRacingWebhooksOnManyInstances(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	env := syncEnv(t, fake.URL())
	servers := []*server{startServer(t, env)}
	for range 2 {
		e := maps.Clone(env)
		servers = append(servers, startServer(t, e))
	}
	s := servers[0]
	gdb := openDB(t, s)

	type paid struct {
		pay, customer string
		events        [][]byte
	}
	var all []paid
	for i := range 4 {
		customer := "race-co-" + string(rune('a'+i))
		pay := checkout(t, s, customer, "starter", 1)
		session := paidAtStripe(t, fake, s, pay)
		all = append(all, paid{pay, customer, [][]byte{
			stripeEvent(newEventID(), "payment_intent.succeeded", paymentIntent(pay, customer, "succeeded", starterAmount, starterAmount, "usd")),
			stripeEvent(newEventID(), "checkout.session.completed", session),
		}})
	}
	for i := range 4 {
		customer := "race-inv-" + string(rune('a'+i))
		setBilling(t, s, customer)
		r := payByInvoice(t, s, customer, "starter", 1, "race-"+customer, "")
		mustStatus(t, "invoice payment", r.StatusCode(), r.Body, http.StatusCreated)
		obj := invoiceActionAt(t, fake, r.JSON201.Invoice.Id, "pay")
		all = append(all, paid{r.JSON201.PaymentId, customer, [][]byte{stripeEvent(newEventID(), "invoice.paid", obj)}})
	}

	var wg sync.WaitGroup
	var mu sync.Mutex
	statuses := map[int]int{}
	for round := range 3 {
		for i, srv := range servers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				status, _ := rawRequest(t, srv, http.MethodPost, "/v1/admin/stripe-sync", testAdminKey, `{}`, nil)
				mu.Lock()
				statuses[status]++
				mu.Unlock()
			}()
			for _, p := range all {
				for _, body := range p.events {
					wg.Add(1)
					go func() {
						defer wg.Done()
						deliver(t, servers[(i+round)%len(servers)], body)
					}()
				}
			}
		}
	}
	wg.Wait()
	for status := range statuses {
		if status != http.StatusOK && status != http.StatusConflict {
			t.Fatalf("syncs answered %v, want only 200 and 409", statuses)
		}
	}
	// An operator replays an invoice.paid: nothing more.
	var stored string
	if err := gdb.Raw(`SELECT id FROM stripe_events WHERE type = 'invoice.paid' LIMIT 1`).Scan(&stored).Error; err != nil || stored == "" {
		t.Fatalf("no stored invoice.paid: %v", err)
	}
	rep, err := s.admin(t).ReplayStripeEventWithResponse(context.Background(), stored)
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "replay", rep.StatusCode(), rep.Body, http.StatusOK)
	for _, p := range all {
		if bal := balanceOf(t, gdb, p.customer); bal != starterCredits {
			t.Errorf("%s: balance %d, want %d", p.customer, bal, starterCredits)
		}
		if n := confirmations(t, gdb, p.pay); n != 1 {
			t.Errorf("%s: %d confirmations", p.pay, n)
		}
	}
	if n := countRows(t, gdb, `SELECT count(*) FROM events WHERE type = 'payment.succeeded'`); n != int64(len(all)) {
		t.Fatalf("%d payment.succeeded events for %d payments", n, len(all))
	}
	assertInvariants(t, s)
}

// Signed invoice events aimed at another customer's payment: an invoice
// of customer B's own (real, paid, right amount) whose metadata names
// customer A's pending invoice payment is parked; A's payment stays
// pending and B gets nothing.
func TestAttackInvoiceOfOneCustomerNamingAnothersPayment(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	s := startServer(t, payEnv(t, fake.URL()))
	gdb := openDB(t, s)
	setBilling(t, s, "victim")
	setBilling(t, s, "attacker")
	victim := payByInvoice(t, s, "victim", "pro", 1, "victim-1", "")
	mustStatus(t, "victim's invoice", victim.StatusCode(), victim.Body, http.StatusCreated)
	own := payByInvoice(t, s, "attacker", "pro", 1, "attacker-1", "")
	mustStatus(t, "attacker's invoice", own.StatusCode(), own.Body, http.StatusCreated)

	paid := invoiceActionAt(t, fake, own.JSON201.Invoice.Id, "pay")
	meta := map[string]any{stripeapi.MetadataPaymentID: victim.JSON201.PaymentId, stripeapi.MetadataCustomerID: "victim"}
	for _, obj := range []map[string]any{
		withFields(paid, map[string]any{"metadata": meta}),
		withFields(paid, map[string]any{"metadata": map[string]any{stripeapi.MetadataPaymentID: victim.JSON201.PaymentId, stripeapi.MetadataCustomerID: "attacker"}}),
	} {
		id := newEventID()
		deliver(t, s, stripeEvent(id, "invoice.paid", obj))
		if status, lastErr := eventStatus(t, gdb, id); status != "parked" {
			t.Fatalf("an attacker's invoice naming the victim's payment: %s (%s)", status, lastErr)
		}
	}
	if p := getPayment(t, s, victim.JSON201.PaymentId); p.Status != client.PaymentStatusPending || deref(p.Invoice.Status) != "open" {
		t.Fatalf("the victim's payment: %s, invoice %+v", p.Status, p.Invoice)
	}
	if a, v := balanceOf(t, gdb, "attacker"), balanceOf(t, gdb, "victim"); a != 0 || v != 0 {
		t.Fatalf("balances attacker %d victim %d, want 0 and 0", a, v)
	}
	// The attacker's own invoice, as Stripe sent it, credits the attacker once.
	deliver(t, s, stripeEvent(newEventID(), "invoice.paid", paid))
	if a := balanceOf(t, gdb, "attacker"); a != proCredits {
		t.Fatalf("attacker's own invoice: balance %d, want %d", a, proCredits)
	}
	assertInvariants(t, s)
}
