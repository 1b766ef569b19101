package sandbox_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tallybilling/tally/internal/db/dbtest"
	"github.com/tallybilling/tally/internal/sandbox"
)

// raw sends a request with a bearer token and a JSON body to api.
func raw(t *testing.T, method, u, token, body string) (int, []byte) {
	t.Helper()
	req, err := http.NewRequest(method, u, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+token)
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	out, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, out
}

// Meter error reports are v2 events kept in the store: after a restart
// each is still served at GET /v2/core/events/{id} with its data, listed
// by GET /v2/core/events?object_id= (newest first, every one once across
// pages), never by GET /v1/events, and its pending delivery still goes out
// thin.
func TestMeterErrorReportsSurviveARestartAndPageOnce(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	gdb := dbtest.New(t)
	hook := newEndpoint(t)
	hook.answer = func(int) int { return http.StatusServiceUnavailable } // tally is down
	var clock atomic.Int64
	clock.Store(time.Now().UnixNano())
	now := func() time.Time { return time.Unix(0, clock.Load()) }
	open := func() (*sandbox.Account, *httptest.Server) {
		store, err := sandbox.OpenPostgresStore(ctx, gdb)
		if err != nil {
			t.Fatal(err)
		}
		acct, err := sandbox.New(ctx, sandbox.Options{SecretKey: "sk_test_sandbox", PublicURL: "http://sandbox.test", Store: store,
			Webhook: &sandbox.Endpoint{URL: hook.srv.URL, Secret: secret}, Meters: map[string]string{"mtr_1": "api_calls"}, Now: now,
			RetryBase: time.Second, RetryMax: time.Minute})
		if err != nil {
			t.Fatal(err)
		}
		api := httptest.NewServer(sandbox.NewAPI(acct))
		t.Cleanup(api.Close)
		return acct, api
	}
	acct, api := open()
	h := &harness{acct: acct, api: api, hook: hook}
	if status, out, _ := h.call(t, http.MethodPost, "/v1/customers", "", url.Values{"name": {"Ada"}}); status != 200 {
		t.Fatalf("customer: %d %v", status, out)
	}
	status, body := raw(t, http.MethodPost, api.URL+"/v2/billing/meter_event_session", "sk_test_sandbox", "")
	var session struct {
		Token string `json:"authentication_token"`
	}
	if status != 200 || json.Unmarshal(body, &session) != nil {
		t.Fatalf("session: %d %s", status, body)
	}
	const reports = 230
	ahead := now().Add(time.Hour).UTC().Format(time.RFC3339)
	for i := range reports {
		status, body := raw(t, http.MethodPost, api.URL+"/v2/billing/meter_event_stream", session.Token,
			fmt.Sprintf(`{"events":[{"event_name":"api_calls","identifier":"ahead-%d","timestamp":%q,"payload":{"stripe_customer_id":"cus_a","value":"1"}}]}`, i, ahead))
		if status != 200 {
			t.Fatalf("stream %d: %d %s", i, status, body)
		}
	}
	acct.DeliverDue(ctx) // every delivery fails once

	acct2, api2 := open()
	var ids []string
	for _, ev := range acct2.Events() {
		if ev.Type == "v1.billing.meter.error_report_triggered" {
			ids = append(ids, ev.ID)
		}
	}
	if len(ids) != reports {
		t.Fatalf("%d reports after the restart, want %d", len(ids), reports)
	}
	status, body = raw(t, http.MethodGet, api2.URL+"/v2/core/events/"+ids[0], "sk_test_sandbox", "")
	if status != 200 || !strings.Contains(string(body), `"error_types"`) || !strings.Contains(string(body), `"ahead-0"`) {
		t.Fatalf("the first report after the restart: %d %s", status, body)
	}
	status, body = raw(t, http.MethodGet, api2.URL+"/v1/events?limit=100", "sk_test_sandbox", "")
	if status != 200 || strings.Contains(string(body), "v2.core.event") || !strings.Contains(string(body), "customer.created") {
		t.Fatalf("GET /v1/events after the restart: %d %.300s, want customer.created and no v2 event", status, body)
	}
	seen := map[string]bool{}
	var order []string
	next := "/v2/core/events?object_id=mtr_1&limit=100"
	for pages := 0; next != ""; pages++ {
		if pages > 10 {
			t.Fatal("the listing does not end")
		}
		status, body := raw(t, http.MethodGet, api2.URL+next, "sk_test_sandbox", "")
		var page struct {
			Data []struct {
				ID   string          `json:"id"`
				Data json.RawMessage `json:"data"`
			} `json:"data"`
			NextPageURL *string `json:"next_page_url"`
		}
		if status != 200 || json.Unmarshal(body, &page) != nil {
			t.Fatalf("GET %s: %d %.300s", next, status, body)
		}
		for _, ev := range page.Data {
			if seen[ev.ID] || len(ev.Data) == 0 {
				t.Fatalf("%s listed twice or without its data", ev.ID)
			}
			seen[ev.ID] = true
			order = append(order, ev.ID)
		}
		next = ""
		if page.NextPageURL != nil {
			next = *page.NextPageURL
		}
	}
	if len(order) != reports || order[0] != ids[len(ids)-1] || order[len(order)-1] != ids[0] {
		t.Fatalf("listed %d reports, first %s last %s; want %d, newest first", len(order), order[0], order[len(order)-1], reports)
	}

	// tally is back: the reports pending since before the restart go out thin.
	hook.answer = nil
	deadline := time.Now().Add(10 * time.Second)
	for {
		clock.Add(int64(time.Minute))
		acct2.DeliverDue(ctx)
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
	}
	thin := 0
	for _, d := range hook.deliveries() {
		if d.Type == "v1.billing.meter.error_report_triggered" && d.Status < 300 {
			if strings.Contains(string(d.Body), `"data"`) || !strings.HasPrefix(string(d.Body), `{"object":"v2.core.event",`) {
				t.Fatalf("a report delivered after the restart: %s, want thin", d.Body)
			}
			thin++
		}
	}
	if thin != reports {
		t.Fatalf("%d reports delivered after the restart, want %d", thin, reports)
	}
}
