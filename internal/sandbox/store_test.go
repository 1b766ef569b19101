package sandbox_test

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/db/dbtest"
	"github.com/tallybilling/tally/internal/sandbox"
)

// A user stops and starts tally: the sandbox, kept in PostgreSQL, still
// knows its sessions, payments, events and their deliveries, meter events
// and idempotency keys, and carries on from there.
func TestStateSurvivesARestart(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	gdb := dbtest.New(t)
	hook := newEndpoint(t)
	hook.answer = func(int) int { return http.StatusServiceUnavailable } // tally is down
	// The sandbox's clock stands still unless the test moves it, so when a
	// failed delivery is due again does not depend on how fast a loaded
	// machine runs the steps in between.
	var clock atomic.Int64
	clock.Store(time.Now().UnixNano())
	now := func() time.Time { return time.Unix(0, clock.Load()) }
	open := func() (*sandbox.Account, *httptest.Server) {
		store, err := sandbox.OpenPostgresStore(ctx, gdb)
		if err != nil {
			t.Fatal(err)
		}
		acct, err := sandbox.New(ctx, sandbox.Options{SecretKey: "sk_test_sandbox", PublicURL: "http://sandbox.test", Store: store,
			Webhook: &sandbox.Endpoint{URL: hook.srv.URL, Secret: secret}, Meters: map[string]string{"mtr_1": "api_calls"}, Now: now})
		if err != nil {
			t.Fatal(err)
		}
		api := httptest.NewServer(sandbox.NewAPI(acct))
		t.Cleanup(api.Close)
		return acct, api
	}
	acct, api := open()
	h := &harness{acct: acct, api: api, hook: hook}
	paid := h.session(t, nil)
	if _, err := acct.Pay(ctx, paid, "4242424242424242", "ada@example.com"); err != nil {
		t.Fatal(err)
	}
	unpaid := h.session(t, nil)
	_, created, _ := h.call(t, http.MethodPost, "/v1/customers", "tally-customer-ada", url.Values{"name": {"Ada"}})
	if status, out, _ := h.call(t, http.MethodPost, "/v1/billing/meter_events", "", url.Values{"event_name": {"api_calls"}, "identifier": {"u1"},
		"payload[stripe_customer_id]": {"cus_a"}, "payload[value]": {"5"}}); status != 200 {
		t.Fatalf("meter event: %d %v", status, out)
	}
	acct.DeliverDue(ctx) // every delivery fails once
	before := acct.Events()

	// Restarted (a second process on the same database would see the same).
	acct2, api2 := open()
	h2 := &harness{acct: acct2, api: api2, hook: hook}
	if got := acct2.Events(); len(got) != len(before) || got[0].Delivery.Attempts != 1 || got[0].Delivery.Status != sandbox.DeliveryPending ||
		string(got[0].Payload) != string(before[0].Payload) {
		t.Fatalf("events after the restart: %d (first %+v), want the %d from before, each tried once", len(got), got[0].Delivery, len(before))
	}
	if cs := acct2.Object(paid); cs["status"] != "complete" || acct2.Object(cs["payment_intent"].(string))["status"] != "succeeded" {
		t.Fatalf("the paid session after the restart: %v", cs)
	}
	if _, err := acct2.Pay(ctx, unpaid, "4242424242424242", ""); err != nil {
		t.Fatalf("pay the session created before the restart: %v", err)
	}
	if _, replay, header := h2.call(t, http.MethodPost, "/v1/customers", "tally-customer-ada", url.Values{"name": {"Ada"}}); replay["id"] != created["id"] || header.Get("Idempotent-Replayed") != "true" {
		t.Fatalf("the idempotency key after the restart created %v, want %v replayed", replay["id"], created["id"])
	}
	if status, _, _ := h2.call(t, http.MethodPost, "/v1/billing/meter_events", "", url.Values{"event_name": {"api_calls"}, "identifier": {"u1"},
		"payload[stripe_customer_id]": {"cus_a"}, "payload[value]": {"5"}}); status != http.StatusBadRequest {
		t.Fatalf("the meter event identifier after the restart: %d, want 400 (already exists)", status)
	}
	if m := acct2.Meters(ctx); len(m) != 1 || m[0].Events != 1 || len(m[0].Customers) != 1 || m[0].Customers[0].Total != 5 {
		t.Fatalf("meters after the restart: %+v", m)
	}

	// tally is back: the deliveries pending since before the restart go out,
	// in order, once their retry is due (the clock moves on after the first
	// round); as at Stripe, the events of the payment made since did not
	// wait for them.
	hook.answer = nil
	deadline := time.Now().Add(10 * time.Second)
	for acct2.DeliverDue(ctx); ; acct2.DeliverDue(ctx) {
		clock.Add(int64(time.Second))
		pending := 0
		for _, ev := range acct2.Events() {
			if ev.Delivery.Status != sandbox.DeliverySucceeded {
				pending++
			}
		}
		if pending == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d deliveries still pending", pending)
		}
		time.Sleep(100 * time.Millisecond)
	}
	want := []string{"payment_intent.created", "charge.succeeded", "payment_intent.succeeded", "checkout.session.completed", // since the restart
		"payment_intent.created", "charge.succeeded", "payment_intent.succeeded", "checkout.session.completed", "customer.created"} // retried
	wantTypes(t, "deliveries across a restart", hook.typesOK(), want)
}

// The database refuses a payment's commit: the buyer is told it failed,
// and nothing the store does not hold is shown, answered or delivered. The
// hosted page still offers the session for payment and does not send the
// buyer on as paid, and no event of the lost payment reaches the
// endpoint. Once the store takes writes again, the buyer pays once and
// the endpoint gets that one payment's events.
func TestARefusedCommitIsNeitherShownNorDelivered(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	h, gdb := storedHarness(t)
	acct, hook := h.acct, h.hook
	web := httptest.NewServer(sandbox.NewWeb(sandbox.WebOptions{Account: acct, API: sandbox.NewAPI(acct), APIURL: h.api.URL}))
	t.Cleanup(web.Close)
	id := h.session(t, nil)
	page := web.URL + "/sandbox/checkout/" + id
	noRedirects := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	pay := func() (int, string) {
		t.Helper()
		resp, err := noRedirects.PostForm(page+"/pay", url.Values{"card": {"4242424242424242"}})
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode, resp.Header.Get("Location")
	}

	// The store's writes fail from here, as a database that went away would.
	refuseWrites(t, gdb)
	if st, loc := pay(); st != http.StatusInternalServerError || loc != "" {
		t.Fatalf("pay while the store refuses writes: %d to %q, want 500 on the page", st, loc)
	}
	if st, loc := pay(); st != http.StatusInternalServerError || loc != "" {
		t.Fatalf("pay again while the store refuses writes: %d to %q, want 500 on the page (the session is not paid)", st, loc)
	}
	if cs := acct.Object(id); cs["status"] != "open" || cs["payment_intent"] != nil {
		t.Fatalf("the session after a refused payment: status %v, payment_intent %v; want open, none", cs["status"], cs["payment_intent"])
	}
	if v, err := acct.Checkout(ctx, id); err != nil || v.Status != "open" {
		t.Fatalf("the hosted page's view after a refused payment: %+v, %v; want open", v, err)
	}
	if n := acct.DeliverDue(ctx); n != 0 || len(hook.deliveries()) != 0 {
		t.Fatalf("%d deliveries attempted, %v received, of a payment the store refused", n, hook.typesOK())
	}

	// The database takes writes again.
	allowWrites(t, gdb)
	want := "http://app.test/ok?s=" + id
	if st, loc := pay(); st != http.StatusSeeOther || loc != want {
		t.Fatalf("pay once the store is back: %d to %q, want 303 to %q", st, loc, want)
	}
	acct.DeliverDue(ctx)
	wantTypes(t, "the one payment that was stored", hook.typesOK(), []string{"payment_intent.created", "charge.succeeded", "payment_intent.succeeded", "checkout.session.completed"})
	for _, d := range hook.deliveries() {
		if !strings.Contains(string(d.Body), acct.Object(id)["payment_intent"].(string)) {
			t.Fatalf("%s is not about the stored PaymentIntent %v", d.Type, acct.Object(id)["payment_intent"])
		}
	}
}

// The database refuses a payment's commit, then comes back before anything
// else touches the sandbox: tally's next call is a GET of the session (its
// sync of a pending payment, or a confirmation checking the session). The
// API answers from the store, never the refused payment: a session shown
// as paid there is credited by tally, and the sandbox would then forget it.
func TestARefusedCommitIsNotAnsweredByTheAPI(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	h, gdb := storedHarness(t)
	acct := h.acct
	id := h.session(t, nil)

	refuseWrites(t, gdb)
	if _, err := acct.Pay(ctx, id, "4242424242424242", ""); err == nil {
		t.Fatal("a payment the store refused was answered as done")
	}
	allowWrites(t, gdb)

	status, cs, _ := h.call(t, http.MethodGet, "/v1/checkout/sessions/"+id, "", nil)
	if status != http.StatusOK || cs["status"] != "open" || cs["payment_status"] != "unpaid" || cs["payment_intent"] != nil {
		t.Fatalf("GET of a session whose payment the store refused: %d, status %v, payment_status %v, payment_intent %v; want 200, open, unpaid, none",
			status, cs["status"], cs["payment_status"], cs["payment_intent"])
	}
	status, list, _ := h.call(t, http.MethodGet, "/v1/events?limit=100", "", nil)
	if data, _ := list["data"].([]any); status != http.StatusOK || len(data) != 0 {
		t.Fatalf("GET /v1/events after a refused payment: %d, %d events; want 200 and none (the store holds none)", status, len(data))
	}
	if n := acct.DeliverDue(ctx); n != 0 {
		t.Fatalf("%d deliveries of a refused payment", n)
	}
}

// storedHarness is a sandbox account kept in a fresh PostgreSQL database,
// with its API and a webhook endpoint, and that database.
func storedHarness(t *testing.T) (*harness, *gorm.DB) {
	t.Helper()
	ctx := context.Background()
	gdb := dbtest.New(t)
	store, err := sandbox.OpenPostgresStore(ctx, gdb)
	if err != nil {
		t.Fatal(err)
	}
	hook := newEndpoint(t)
	acct, err := sandbox.New(ctx, sandbox.Options{SecretKey: "sk_test_sandbox", PublicURL: "http://sandbox.test", Store: store,
		Webhook: &sandbox.Endpoint{URL: hook.srv.URL, Secret: secret}})
	if err != nil {
		t.Fatal(err)
	}
	api := httptest.NewServer(sandbox.NewAPI(acct))
	t.Cleanup(api.Close)
	return &harness{acct: acct, api: api, hook: hook}, gdb
}

// refuseWrites makes every write of the sandbox's objects fail, as a
// database that went away would, until allowWrites.
func refuseWrites(t *testing.T, gdb *gorm.DB) {
	t.Helper()
	for _, q := range []string{
		`CREATE FUNCTION stripe_sandbox.refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'the test refuses this write'; END $$`,
		`CREATE TRIGGER refuse BEFORE INSERT OR UPDATE ON stripe_sandbox.objects FOR EACH ROW EXECUTE FUNCTION stripe_sandbox.refuse()`,
	} {
		if err := gdb.Exec(q).Error; err != nil {
			t.Fatal(err)
		}
	}
}

func allowWrites(t *testing.T, gdb *gorm.DB) {
	t.Helper()
	if err := gdb.Exec(`DROP TRIGGER refuse ON stripe_sandbox.objects`).Error; err != nil {
		t.Fatal(err)
	}
}

// The database goes away after an operation's commit was refused (a
// dispute closed from the dashboard, during an outage): the account must
// reload before it shows anything, and cannot. The dashboard and an
// invoice's page then answer 5xx saying the store cannot be read; neither
// answers 200 with an account that has no payments, nor 404 for an invoice
// the store holds. Once the database is back, both show what the store
// holds (the dispute still open).
func TestAnUnreadableStoreIsNotShownAsAnEmptyAccount(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	h, gdb := storedHarness(t)
	acct := h.acct
	web := httptest.NewServer(sandbox.NewWeb(sandbox.WebOptions{Account: acct, API: sandbox.NewAPI(acct), APIURL: h.api.URL}))
	t.Cleanup(web.Close)
	id := h.session(t, nil)
	if _, err := acct.Pay(ctx, id, "4000000000000259", ""); err != nil { // paid, then disputed
		t.Fatal(err)
	}
	pi := acct.Object(id)["payment_intent"].(string)
	_, cus, _ := h.call(t, http.MethodPost, "/v1/customers", "", url.Values{})
	_, inv, _ := h.call(t, http.MethodPost, "/v1/invoices", "", url.Values{"customer": {cus["id"].(string)}, "collection_method": {"send_invoice"}, "days_until_due": {"7"}})
	invoice := inv["id"].(string)
	get := func(path string) (int, string) {
		t.Helper()
		resp, err := http.Get(web.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(body)
	}
	noRedirects := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}

	takeStoreAway(t, gdb)
	resp, err := noRedirects.PostForm(web.URL+"/sandbox/disputes/"+pi+"/close", url.Values{"outcome": {"lost"}})
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusInternalServerError {
		t.Fatalf("closing a dispute while the store is away: %d, want 500", resp.StatusCode)
	}
	if st, page := get("/sandbox"); st < 500 || strings.Contains(page, "No payments yet") || !strings.Contains(page, "cannot be read") {
		t.Errorf("the dashboard while the store cannot be read: %d, says no payments %t, says the store cannot be read %t; want 5xx saying so",
			st, strings.Contains(page, "No payments yet"), strings.Contains(page, "cannot be read"))
	}
	if st, page := get("/sandbox/invoices/" + invoice); st < 500 || !strings.Contains(page, "cannot be read") {
		t.Errorf("an invoice's page while the store cannot be read: %d, says the store cannot be read %t; want 5xx saying so",
			st, strings.Contains(page, "cannot be read"))
	}

	bringStoreBack(t, gdb)
	if st, page := get("/sandbox"); st != http.StatusOK || !strings.Contains(page, pi) || !strings.Contains(page, "Win dispute") {
		t.Errorf("the dashboard once the store is back: %d, shows %s %t, its dispute open %t", st, pi, strings.Contains(page, pi), strings.Contains(page, "Win dispute"))
	}
	if st, _ := get("/sandbox/invoices/" + invoice); st != http.StatusOK {
		t.Errorf("an invoice's page once the store is back: %d", st)
	}
	if d := acct.Objects("dispute"); len(d) != 1 || d[0]["status"] != "needs_response" {
		t.Errorf("the dispute after a refused close: %v, want one needing a response", d)
	}
}

// takeStoreAway makes the sandbox's store neither readable nor writable,
// as a database that went away, until bringStoreBack.
func takeStoreAway(t *testing.T, gdb *gorm.DB) {
	t.Helper()
	if err := gdb.Exec(`ALTER TABLE stripe_sandbox.objects RENAME TO objects_away`).Error; err != nil {
		t.Fatal(err)
	}
}

func bringStoreBack(t *testing.T, gdb *gorm.DB) {
	t.Helper()
	if err := gdb.Exec(`ALTER TABLE stripe_sandbox.objects_away RENAME TO objects`).Error; err != nil {
		t.Fatal(err)
	}
}
