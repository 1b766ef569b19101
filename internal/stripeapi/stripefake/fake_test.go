package stripefake_test

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/tallybilling/tally/internal/stripeapi"
	"github.com/tallybilling/tally/internal/stripeapi/stripefake"
)

func post(t *testing.T, f *stripefake.Fake, path, idemKey string, form url.Values) (int, map[string]any) {
	t.Helper()
	req, err := http.NewRequest(http.MethodPost, f.URL()+path, strings.NewReader(form.Encode()))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer sk_test_x")
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	if idemKey != "" {
		req.Header.Set("Idempotency-Key", idemKey)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("POST %s: %v", path, err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	var body map[string]any
	if err := json.Unmarshal(raw, &body); err != nil {
		t.Fatalf("POST %s: body %q is not JSON: %v", path, raw, err)
	}
	return resp.StatusCode, body
}

func TestIdempotencyKeyReusedWithOtherParametersIsRefused(t *testing.T) {
	t.Parallel()
	f := stripefake.New(t)
	status, first := post(t, f, "/v1/customers", "k1", url.Values{"name": {"Ada"}})
	if status != 200 {
		t.Fatalf("first create: status %d", status)
	}
	status, replay := post(t, f, "/v1/customers", "k1", url.Values{"name": {"Ada"}})
	if status != 200 || replay["id"] != first["id"] {
		t.Fatalf("replay: status %d, id %v; want 200 and %v", status, replay["id"], first["id"])
	}
	status, body := post(t, f, "/v1/customers", "k1", url.Values{"name": {"Grace"}})
	errObj, _ := body["error"].(map[string]any)
	if status != 400 || errObj["type"] != "idempotency_error" {
		t.Fatalf("reuse with other params: status %d, body %v; want 400 idempotency_error", status, body)
	}
	if n := len(f.Customers()); n != 1 {
		t.Fatalf("fake created %d customers, want 1", n)
	}
}

func TestRequestsWithoutAKeyAreRefused(t *testing.T) {
	t.Parallel()
	f := stripefake.New(t)
	resp, err := http.Post(f.URL()+"/v1/customers", "application/x-www-form-urlencoded", strings.NewReader("name=Ada"))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("status = %d, want 401", resp.StatusCode)
	}
}

func TestMaxRequestsPerSecondCountsTheBusiestWindow(t *testing.T) {
	t.Parallel()
	f := stripefake.New(t)
	for range 5 {
		post(t, f, "/v1/billing/meter_events", "", url.Values{"event_name": {"e"}, "payload[value]": {"1"}, "payload[stripe_customer_id]": {"cus_a"}})
	}
	time.Sleep(1100 * time.Millisecond)
	for range 3 {
		post(t, f, "/v1/customers", "", url.Values{})
	}
	if got := f.MaxRequestsPerSecond(); got != 5 {
		t.Errorf("MaxRequestsPerSecond() = %d, want 5", got)
	}
	if got := f.MaxRequestsPerSecond("/v1/customers"); got != 3 {
		t.Errorf("MaxRequestsPerSecond(/v1/customers) = %d, want 3", got)
	}
}

func TestSetHangBeyondTheClientTimeout(t *testing.T) {
	t.Parallel()
	f := stripefake.New(t)
	f.SetHang(time.Second)
	c, err := stripeapi.New(stripeapi.Config{SecretKey: "sk_test_x", APIURL: f.URL(), Timeout: 100 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	err = c.CreateMeterEvent(context.Background(), stripeapi.MeterEvent{EventName: "e", StripeCustomerID: "cus_a", Identifier: "h-1", Value: 1})
	if stripeapi.KindOf(err) != stripeapi.KindNetwork {
		t.Fatalf("err = %v, want a network error", err)
	}
	f.SetHang(0)
	// Answered again, to a client whose timeout a loaded machine cannot
	// run out (100ms did, with tests running in parallel).
	c, err = stripeapi.New(stripeapi.Config{SecretKey: "sk_test_x", APIURL: f.URL()})
	if err != nil {
		t.Fatal(err)
	}
	if err := c.CreateMeterEvent(context.Background(), stripeapi.MeterEvent{EventName: "e", StripeCustomerID: "cus_a", Identifier: "h-2", Value: 1}); err != nil {
		t.Fatalf("after the hang: %v", err)
	}
}

func TestStreamRejectsTheSecretKeyAndV1RejectsSessionTokens(t *testing.T) {
	t.Parallel()
	f := stripefake.New(t)
	status, session := post(t, f, "/v2/billing/meter_event_session", "", url.Values{})
	if status != 200 {
		t.Fatalf("open session: status %d", status)
	}
	token, _ := session["authentication_token"].(string)

	req, _ := http.NewRequest(http.MethodPost, f.URL()+"/v2/billing/meter_event_stream",
		strings.NewReader(`{"events":[{"event_name":"e","identifier":"x","payload":{"stripe_customer_id":"cus_a","value":"1"}}]}`))
	req.Header.Set("Authorization", "Bearer sk_test_x")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("stream with the secret key: status %d, want 401", resp.StatusCode)
	}

	req, _ = http.NewRequest(http.MethodPost, f.URL()+"/v1/customers", strings.NewReader(""))
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err = http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("v1 with a session token: status %d, want 401", resp.StatusCode)
	}
}

// A dropped answer: the client sees a network failure, the fake keeps the
// meter event, and a resend is told it already exists.
func TestDropAnswersKeepsTheEffectAndLosesTheAnswer(t *testing.T) {
	t.Parallel()
	f := stripefake.New(t)
	f.DropAnswers(func(r *http.Request) bool { return r.URL.Path == "/v1/billing/meter_events" })
	c, err := stripeapi.New(stripeapi.Config{SecretKey: "sk_test_x", APIURL: f.URL(), MaxNetworkRetries: -1})
	if err != nil {
		t.Fatal(err)
	}
	ev := stripeapi.MeterEvent{EventName: "api_calls", StripeCustomerID: "cus_1", Identifier: "drop-1", Value: 3, Timestamp: time.Now()}
	err = c.CreateMeterEvent(context.Background(), ev)
	if stripeapi.KindOf(err) != stripeapi.KindNetwork {
		t.Fatalf("send with a dropped answer: %v, want a network failure", err)
	}
	if f.Count("drop-1") != 1 {
		t.Fatalf("the fake kept %d copies, want 1", f.Count("drop-1"))
	}
	if reqs := f.Requests(); len(reqs) != 1 || !reqs[0].Dropped || reqs[0].Status != http.StatusOK {
		t.Fatalf("recorded %+v, want one dropped request handled with 200", reqs)
	}
	f.DropAnswers(nil)
	if err := c.CreateMeterEvent(context.Background(), ev); !stripeapi.IsDuplicate(err) {
		t.Fatalf("resend: %v, want Stripe's duplicate identifier answer", err)
	}
}
