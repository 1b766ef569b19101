package sandbox_test

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/tallybilling/tally/internal/sandbox"
)

// Every page renders whole, with the sandbox banner, whatever the account
// holds: a template that fails halfway would show a cut page.
func TestEveryPageRendersWithTheBanner(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	ctx := context.Background()
	paid := h.session(t, nil)
	if _, err := h.acct.Pay(ctx, paid, "4000000000000259", "ada@example.com"); err != nil { // paid, then disputed
		t.Fatal(err)
	}
	declined := h.session(t, nil)
	if _, err := h.acct.Pay(ctx, declined, "4000000000000002", ""); err != nil {
		t.Fatal(err)
	}
	authenticating := h.session(t, nil)
	if _, err := h.acct.Pay(ctx, authenticating, "4000002760003184", ""); err != nil {
		t.Fatal(err)
	}
	_, cus, _ := h.call(t, http.MethodPost, "/v1/customers", "", url.Values{})
	setup := func() string {
		_, cs, _ := h.call(t, http.MethodPost, "/v1/checkout/sessions", "", url.Values{"mode": {"setup"}, "customer": {cus["id"].(string)}, "success_url": {"http://app.test/"}})
		return cs["id"].(string)
	}()
	_, inv, _ := h.call(t, http.MethodPost, "/v1/invoices", "", url.Values{"customer": {cus["id"].(string)}, "collection_method": {"send_invoice"}, "days_until_due": {"7"}})
	h.call(t, http.MethodPost, "/v1/invoiceitems", "", url.Values{"invoice": {inv["id"].(string)}, "amount": {"700"}, "description": {"Pro"}})
	h.call(t, http.MethodPost, "/v1/invoices/"+inv["id"].(string)+"/finalize", "", url.Values{})
	h.call(t, http.MethodPost, "/v1/billing/meter_events", "", url.Values{"event_name": {"api_calls"}, "payload[stripe_customer_id]": {"cus_a"}, "payload[value]": {"2"}})
	h.hook.answer = func(n int) int {
		if n%2 == 0 {
			return http.StatusInternalServerError
		}
		return http.StatusOK
	}
	h.deliverAll(t)

	web := httptest.NewServer(sandbox.NewWeb(sandbox.WebOptions{Account: h.acct, API: sandbox.NewAPI(h.acct), APIURL: h.api.URL,
		Demo: sandbox.NewDemo(sandbox.DemoOptions{JWTSecret: []byte("0123456789abcdef0123456789abcdef")})}))
	defer web.Close()
	for _, c := range []struct {
		path   string
		status int
		shows  string
	}{
		{"/sandbox", 200, "Win dispute"},
		{"/sandbox/checkout/" + paid, 200, "can no longer be paid"},
		{"/sandbox/checkout/" + declined, 200, "Your card was declined."},
		{"/sandbox/checkout/" + authenticating, 200, "authenticate-approve"},
		{"/sandbox/checkout/" + setup, 200, "Save card"},
		{"/sandbox/checkout/cs_test_nope", 404, "No such"},
		{"/sandbox/invoices/" + inv["id"].(string), 200, "pay-invoice"},
		{"/sandbox/demo", 200, "app.js"},
	} {
		resp, err := http.Get(web.URL + c.path)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		page := string(body)
		if resp.StatusCode != c.status || !strings.Contains(page, "SANDBOX") || !strings.Contains(page, c.shows) || !strings.Contains(page, "</html>") {
			t.Errorf("GET %s: %d, banner %t, shows %q %t, whole %t", c.path, resp.StatusCode, strings.Contains(page, "SANDBOX"),
				c.shows, strings.Contains(page, c.shows), strings.Contains(page, "</html>"))
		}
	}
	// An action refused says why, on the dashboard, with a 4xx.
	resp, err := http.PostForm(web.URL+"/sandbox/payments/pi_nope/refund", url.Values{"amount": {"x"}})
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadRequest || !strings.Contains(string(body), "positive whole number") {
		t.Fatalf("a bad refund amount: %d", resp.StatusCode)
	}
}

// The dashboard shows a long answer of the host app cut to size on a
// character boundary: a page cut inside a character is not UTF-8, and the
// browser shows a broken character where the text ends.
func TestDashboardCutsLongAnswersOnACharacter(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	answer := "x" + strings.Repeat("é", 200) // the 120th byte is the first half of an é
	h.hook.mu.Lock()
	h.hook.reply = answer
	h.hook.mu.Unlock()
	h.payAndDeliver(t)

	web := httptest.NewServer(sandbox.NewWeb(sandbox.WebOptions{Account: h.acct, API: sandbox.NewAPI(h.acct), APIURL: h.api.URL}))
	defer web.Close()
	resp, err := http.Get(web.URL + "/sandbox")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if !utf8.Valid(body) {
		t.Fatalf("the dashboard is not valid UTF-8: an answer was cut inside a character")
	}
	if !strings.Contains(string(body), "x"+strings.Repeat("é", 50)) || !strings.Contains(string(body), "…") || strings.Contains(string(body), answer) {
		t.Fatalf("the dashboard does not show the answer cut short with an ellipsis:\n%s", body)
	}
}

// A buyer whose pay answer was lost (a second click, a dropped connection,
// a server that committed and then failed to answer) posts the form again:
// the session is paid, so the page sends them on to the merchant's success
// URL, as Stripe's hosted page does, and nothing is paid or sent twice. A
// session that is not paid still refuses the form.
func TestPayingACompletedSessionAgainGoesToTheMerchant(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	web := httptest.NewServer(sandbox.NewWeb(sandbox.WebOptions{Account: h.acct, API: sandbox.NewAPI(h.acct), APIURL: h.api.URL}))
	defer web.Close()
	noRedirects := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	pay := func(id string) (int, string) {
		t.Helper()
		resp, err := noRedirects.PostForm(web.URL+"/sandbox/checkout/"+id+"/pay", url.Values{"card": {"4242424242424242"}})
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode, resp.Header.Get("Location")
	}
	id := h.session(t, nil)
	want := "http://app.test/ok?s=" + id
	for attempt := range 3 {
		if st, loc := pay(id); st != http.StatusSeeOther || loc != want {
			t.Fatalf("pay attempt %d: %d to %q, want 303 to %q", attempt, st, loc, want)
		}
	}
	h.deliverAll(t)
	wantTypes(t, "one payment paid three times", h.hook.typesOK(), []string{"payment_intent.created", "charge.succeeded", "payment_intent.succeeded", "checkout.session.completed"})

	expired := h.session(t, nil)
	if err := h.acct.ExpireSession(context.Background(), expired); err != nil {
		t.Fatal(err)
	}
	if st, loc := pay(expired); st != http.StatusBadRequest || loc != "" {
		t.Fatalf("paying an expired session: %d to %q, want 400 on the page", st, loc)
	}
}

// Resending an event the sandbox never sent is the dashboard's 404, as
// closing an unknown dispute is, not a 500; the events that exist keep
// their deliveries as they were.
func TestResendingAnUnknownEventIsNotFound(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	h.payAndDeliver(t)
	before := len(h.acct.Attempts())
	web := httptest.NewServer(sandbox.NewWeb(sandbox.WebOptions{Account: h.acct, API: sandbox.NewAPI(h.acct), APIURL: h.api.URL}))
	defer web.Close()
	resp, err := http.PostForm(web.URL+"/sandbox/events/evt_never_sent/resend", url.Values{})
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusNotFound || !strings.Contains(string(body), "evt_never_sent") {
		t.Errorf("resending an unknown event: %d, names it %t; want 404 naming it", resp.StatusCode, strings.Contains(string(body), "evt_never_sent"))
	}
	if n := h.acct.DeliverDue(context.Background()); n != 0 {
		t.Errorf("%d deliveries due after resending an unknown event, want none", n)
	}
	if after := len(h.acct.Attempts()); after != before {
		t.Errorf("%d delivery attempts after resending an unknown event, want %d", after, before)
	}
}
