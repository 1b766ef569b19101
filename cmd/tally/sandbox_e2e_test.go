package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"gorm.io/gorm"

	"github.com/tallybilling/tally/pkg/client"
)

// noRedirects is a browser-less client that shows redirects instead of following them.
var noRedirects = &http.Client{Timeout: 30 * time.Second, CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}

// sandboxCheckout starts a checkout of item for customer, with the demo
// app as success and cancel URL (the sandbox allows it), and returns the
// payment id and the hosted page's URL.
func sandboxCheckout(t testing.TB, s *server, customer, item string) (paymentID, pageURL string) {
	t.Helper()
	one := int64(1)
	r, err := s.service(t).CreateCheckoutSessionWithResponse(context.Background(), &client.CreateCheckoutSessionParams{}, client.CheckoutSessionCreate{
		CustomerId: customer, Item: item, Quantity: &one,
		SuccessUrl: s.URL + "/sandbox/demo?checkout=success", CancelUrl: s.URL + "/sandbox/demo?checkout=cancel",
	})
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "checkout", r.StatusCode(), r.Body, http.StatusCreated)
	if !strings.HasPrefix(r.JSON201.Url, s.URL+"/sandbox/checkout/cs_test_") {
		t.Fatalf("the session's url %q is not the sandbox's hosted page", r.JSON201.Url)
	}
	return r.JSON201.PaymentId, r.JSON201.Url
}

// postForm posts a form as a browser would, without following the redirect.
func postForm(t testing.TB, target string, form url.Values) (int, string, string) {
	t.Helper()
	resp, err := noRedirects.PostForm(target, form)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, resp.Header.Get("Location"), string(body)
}

func waitBalance(t testing.TB, s *server, customer string, want int64) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		b := balanceOverHTTP(t, s.service(t), customer)
		if b.Balance == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("balance of %s is %d after 15s, want %d", customer, b.Balance, want)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestSandboxBuyDeclineRefundDispute is the whole story offline: a checkout
// paid on the hosted page after a decline, credited by the webhooks the
// sandbox sends; a partial and a full refund and a lost dispute from the
// dashboard's form endpoints take the credits back; tally verify is clean
// and no event was parked.
func TestSandboxBuyDeclineRefundDispute(t *testing.T) {
	t.Parallel()
	s := startServer(t, sandboxEnv(t))

	pay, page := sandboxCheckout(t, s, "walker", "starter")
	status, _, body := postForm(t, page+"/pay", url.Values{"card": {"4000 0000 0000 0002"}, "email": {"walker@example.com"}})
	if status != http.StatusPaymentRequired || !strings.Contains(body, "Your card was declined.") || !strings.Contains(body, "SANDBOX") {
		t.Fatalf("a declined card: %d, page shows the decline: %t", status, strings.Contains(body, "Your card was declined."))
	}
	waitPayment(t, s, pay, client.PaymentStatusFailed)
	if b := balanceOverHTTP(t, s.service(t), "walker"); b.Balance != 0 {
		t.Fatalf("a decline credited %d", b.Balance)
	}
	status, location, _ := postForm(t, page+"/pay", url.Values{"card": {"4242424242424242"}})
	if status != http.StatusSeeOther || location != s.URL+"/sandbox/demo?checkout=success" {
		t.Fatalf("paid: %d to %q, want 303 to the success_url", status, location)
	}
	p := waitPayment(t, s, pay, client.PaymentStatusSucceeded)
	waitBalance(t, s, "walker", starterCredits)
	if p.PaymentIntentId == nil || p.AmountReceived == nil || *p.AmountReceived != starterAmount {
		t.Fatalf("payment %+v", p)
	}
	pi := *p.PaymentIntentId

	status, location, _ = postForm(t, s.URL+"/sandbox/payments/"+pi+"/refund", url.Values{"amount": {"250"}})
	if status != http.StatusSeeOther || !strings.HasPrefix(location, "/sandbox?msg=Refunded") {
		t.Fatalf("partial refund: %d %q", status, location)
	}
	waitBalance(t, s, "walker", starterCredits*3/4)
	status, _, body = postForm(t, s.URL+"/sandbox/payments/"+pi+"/refund", url.Values{"amount": {"5000"}})
	if status != http.StatusBadRequest || !strings.Contains(body, "greater than unrefunded amount") {
		t.Fatalf("refunding more than is left: %d", status)
	}
	postForm(t, s.URL+"/sandbox/payments/"+pi+"/refund", nil) // the rest
	waitBalance(t, s, "walker", 0)
	waitPayment(t, s, pay, client.PaymentStatusRefunded)

	// A second purchase, disputed and lost.
	pay2, page2 := sandboxCheckout(t, s, "walker", "starter")
	postForm(t, page2+"/pay", url.Values{"card": {"4242424242424242"}})
	pi2 := *waitPayment(t, s, pay2, client.PaymentStatusSucceeded).PaymentIntentId
	waitBalance(t, s, "walker", starterCredits)
	if status, _, _ := postForm(t, s.URL+"/sandbox/payments/"+pi2+"/dispute", nil); status != http.StatusSeeOther {
		t.Fatalf("dispute: %d", status)
	}
	waitBalance(t, s, "walker", 0)
	if status, _, _ := postForm(t, s.URL+"/sandbox/disputes/"+pi2+"/close", url.Values{"outcome": {"lost"}}); status != http.StatusSeeOther {
		t.Fatalf("lose the dispute: %d", status)
	}
	waitPayment(t, s, pay2, client.PaymentStatusDisputeLost)

	// Every delivery was answered 2xx, none parked.
	gdb := openDB(t, s)
	if n := countRows(t, gdb, `SELECT count(*) FROM stripe_sandbox.deliveries WHERE status <> 'succeeded'`); n != 0 {
		t.Fatalf("%d sandbox deliveries not succeeded", n)
	}
	if n := countRows(t, gdb, `SELECT count(*) FROM stripe_events WHERE status IN ('parked', 'failed')`); n != 0 {
		t.Fatalf("%d Stripe events parked or failed", n)
	}
	assertInvariants(t, s)
}

// TestSandboxSurvivesARestartOfTally: a session started before tally
// restarts is paid after it, and credited.
func TestSandboxSurvivesARestartOfTally(t *testing.T) {
	t.Parallel()
	env := sandboxEnv(t)
	s := startServer(t, env)
	pay, page := sandboxCheckout(t, s, "restarter", "pro")
	s.shutdown(t)

	// Restarted where it was: the page's URL names its address.
	env["TALLY_HTTP_ADDR"] = strings.TrimPrefix(s.URL, "http://")
	s = startServer(t, env)
	if status, _, body := postForm(t, page+"/pay", url.Values{"card": {"4242424242424242"}}); status != http.StatusSeeOther {
		t.Fatalf("pay after the restart: %d %s", status, body)
	}
	waitPayment(t, s, pay, client.PaymentStatusSucceeded)
	waitBalance(t, s, "restarter", 6000)
	assertInvariants(t, s)
}

// TestSandboxMeterSummariesReconcile: usage delivered to the sandbox's
// meters reconciles with tally's own totals, through tally's reconciliation.
func TestSandboxMeterSummariesReconcile(t *testing.T) {
	t.Parallel()
	s := startServer(t, sandboxEnv(t))
	ctx := context.Background()
	svc := s.service(t)
	// A checkout creates the Stripe customer (in the sandbox) that usage needs.
	for _, c := range []string{"meterA", "meterB"} {
		sandboxCheckout(t, s, c, "starter")
	}
	at := time.Now().Add(-3 * time.Minute)
	evs := []client.UsageEventInput{usageEvent("meterA", "sb-1", 3), usageEvent("meterA", "sb-2", 4), usageEvent("meterB", "sb-3", 10)}
	for i := range evs {
		evs[i].Timestamp = &at
	}
	res, err := svc.IngestUsageEventsWithResponse(ctx, nil, client.UsageBatch{Events: evs})
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "ingest", res.StatusCode(), res.Body, http.StatusAccepted)
	for _, id := range []string{"sb-1", "sb-2", "sb-3"} {
		waitUsageStatus(t, svc, id, client.UsageStatusDelivered)
	}
	from, to := time.Now().Add(-time.Hour).Truncate(time.Minute), time.Now().Add(time.Hour)
	rec, err := s.admin(t).CreateReconciliationWithResponse(ctx, client.ReconciliationRequest{Meter: "api_calls", From: &from, To: &to})
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "reconciliation", rec.StatusCode(), rec.Body, http.StatusOK)
	if rec.JSON200.Checked != 2 || len(rec.JSON200.Mismatches) != 0 {
		t.Fatalf("reconciliation %s, want 2 customers checked and no drift", rec.Body)
	}
	resp, err := http.Get(s.URL + "/sandbox")
	if err != nil {
		t.Fatal(err)
	}
	page, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if !strings.Contains(string(page), "3 events") && !strings.Contains(string(page), "<td>3</td>") {
		t.Fatalf("the dashboard does not show the meter's 3 events")
	}
}

// TestSandboxDemoBackend: the demo signs in only as demo customers, reads
// with the user's token, and spends through its backend with the service
// key, as a product's backend would; tally still refuses a user's token on
// consume itself.
func TestSandboxDemoBackend(t *testing.T) {
	t.Parallel()
	s := startServer(t, sandboxEnv(t))
	token := func(customer string) (int, string) {
		resp, err := http.Post(s.URL+"/sandbox/demo/token", "application/json", strings.NewReader(`{"customer_id":"`+customer+`"}`))
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var out struct{ Token string }
		_ = json.NewDecoder(resp.Body).Decode(&out)
		return resp.StatusCode, out.Token
	}
	if status, _ := token("walker"); status != http.StatusBadRequest {
		t.Fatalf("a token for a non-demo customer: %d, want 400", status)
	}
	status, tok := token("demo-spender")
	if status != http.StatusOK {
		t.Fatalf("demo token: %d", status)
	}
	grantOverHTTP(t, s.service(t), "demo-spender", 500, "demo-welcome")
	if b := balanceOverHTTP(t, s.client(t, tok), "demo-spender"); b.Balance != 500 {
		t.Fatalf("the user's own balance: %d", b.Balance)
	}
	if r, err := s.client(t, tok).GetBalanceWithResponse(context.Background(), "walker", nil); err != nil || r.StatusCode() != http.StatusForbidden {
		t.Fatalf("another customer's balance with the demo token: %v %d", err, r.StatusCode())
	}
	spend := func(amount, key string) (int, string) {
		req, _ := http.NewRequest(http.MethodPost, s.URL+"/sandbox/demo/api/spend", strings.NewReader(`{"amount":`+amount+`}`))
		req.Header.Set("Authorization", "Bearer "+tok)
		req.Header.Set("Idempotency-Key", key)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(body)
	}
	for range 2 { // a retried click spends once
		if status, body := spend("120", "click-1"); status != http.StatusOK {
			t.Fatalf("spend: %d %s", status, body)
		}
	}
	if status, body := spend("1000", "click-2"); status != http.StatusPaymentRequired || !strings.Contains(body, "insufficient_credits") {
		t.Fatalf("overspend: %d %s", status, body)
	}
	if b := balanceOverHTTP(t, s.service(t), "demo-spender"); b.Balance != 380 {
		t.Fatalf("balance after spending 120 (twice sent): %d, want 380", b.Balance)
	}
	one := int64(1)
	r, err := s.client(t, tok).ConsumeCreditsWithResponse(context.Background(), "demo-spender", &client.ConsumeCreditsParams{IdempotencyKey: "direct"},
		client.ConsumeRequest{Amount: one, Reason: "from the browser"})
	if err != nil || r.StatusCode() != http.StatusForbidden {
		t.Fatalf("consume with the user's own token: %v %d, want 403 (services only)", err, r.StatusCode())
	}
}

// TestSandboxChargesWhileSavesHoldThePool: with the sandbox as its Stripe,
// on the smallest pool tally accepts, the customer saves its automatic
// top-up settings several times just as the worker takes them for a
// charge. Each save holds a pooled connection while it waits for the
// charge in flight, and the charge waits for the sandbox's answer. The
// sandbox committed through tally's own pool, so with every other
// connection held by a save, it waited for one of them, and nobody went
// on until the saves gave up.
func TestSandboxChargesWhileSavesHoldThePool(t *testing.T) {
	t.Parallel()
	env := sandboxEnv(t)
	env["TALLY_DB_MAX_OPEN_CONNS"] = "4"
	s := startServer(t, env)
	gdb := openDB(t, s)
	settings := client.AutoTopUpSettings{Enabled: true, Threshold: 500, Item: "starter"}

	// The worker looks for top-ups every second, so it may charge one
	// before the test holds the settings: then try again with another
	// customer.
	var top string
	var tx *gorm.DB
	for i := 0; top == "" && i < 3; i++ {
		customer := fmt.Sprintf("pooled-%d", i)
		sandboxSaveCard(t, s, customer)
		grantOverHTTP(t, s.service(t), customer, 1000, "grant-"+customer)
		putAutoTopUp(t, s, customer, settings)
		spend(t, s, customer, 600, customer+"-spend")
		tx = gdb.Begin()
		if err := tx.Exec(`SELECT 1 FROM auto_top_up_settings WHERE customer_id = ? FOR UPDATE`, customer).Error; err != nil {
			t.Fatal(err)
		}
		var pending []string
		if err := tx.Raw(`SELECT id FROM payments WHERE customer_id = ? AND method = 'auto_top_up' AND status = 'pending' AND payment_intent_id IS NULL`, customer).
			Scan(&pending).Error; err != nil {
			t.Fatal(err)
		}
		if len(pending) == 1 {
			top = pending[0]
			settings.Threshold = 400 // the saves below change something
			break
		}
		tx.Rollback()
		t.Logf("the worker charged %s's top-up before the test held its settings; again", customer)
	}
	if top == "" {
		t.Fatal("the worker charged every top-up before the test could hold its settings")
	}
	defer tx.Rollback()
	customer := getPayment(t, s, top).CustomerId
	waitFor(t, "the worker to wait for the settings", func() bool { return revtWaiting(t, gdb, "FOR SHARE") == 1 })

	const saves = 6
	answers := saveAtOnce(t, s, customer, settings, saves, 15*time.Second)
	// Every connection of the pool but the worker's is a save waiting.
	waitFor(t, "the saves to take the pool", func() bool { return revtWaiting(t, gdb, `INSERT INTO "auto_top_up_settings"`) >= 3 })
	tx.Rollback() // the worker has the settings, the saves wait for its charge
	start := time.Now()
	for i := range saves {
		if st := <-answers; st != http.StatusOK {
			t.Fatalf("save %d answered %d after %s: the charge waited for a connection the saves held", i, st, time.Since(start).Round(time.Millisecond))
		}
	}
	t.Logf("the saves answered %s after the charge went out", time.Since(start).Round(time.Millisecond))
	if p := waitCharged(t, s, top); p.PaymentIntentId == nil {
		t.Fatalf("top-up %+v, want charged", p)
	}
	waitPayment(t, s, top, client.PaymentStatusSucceeded)
	assertInvariants(t, s)
}

// sandboxSaveCard saves the test card 4242 for customer on the sandbox's
// hosted page, and waits for the webhook that records it.
func sandboxSaveCard(t testing.TB, s *server, customer string) {
	t.Helper()
	r, err := s.service(t).CreatePaymentMethodSetupWithResponse(context.Background(), customer, client.PaymentMethodSetupCreate{
		SuccessUrl: s.URL + "/sandbox/demo?setup=success", CancelUrl: s.URL + "/sandbox/demo?setup=cancel",
	})
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "payment method setup", r.StatusCode(), r.Body, http.StatusCreated)
	if status, _, body := postForm(t, r.JSON201.Url+"/pay", url.Values{"card": {topUpCard}, "email": {customer + "@example.com"}}); status != http.StatusSeeOther {
		t.Fatalf("saving the card on the hosted page: %d %s", status, body)
	}
	waitFor(t, "the saved card of "+customer, func() bool { return customerOverHTTP(t, s, customer).PaymentMethod != nil })
}
