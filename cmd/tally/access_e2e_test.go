package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"

	"github.com/tallybilling/tally/internal/stripeapi/stripefake"
	"github.com/tallybilling/tally/pkg/client"
)

// TestWebhookReplayBehindAFreshTimestamp: an attacker who captured a signed
// delivery (here an hour old, well past the 300 s tolerance) puts a fresh
// t= in front of its Stripe-Signature header. The HMAC covers only the old
// timestamp, so the delivery is refused and nothing is stored or credited.
func TestWebhookReplayBehindAFreshTimestamp(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	s := startServer(t, payEnv(t, fake.URL()))
	gdb := openDB(t, s)

	pay := checkout(t, s, "replay-1", "starter", 1)
	paidAtStripe(t, fake, s, pay)
	body := stripeEvent(newEventID(), "payment_intent.succeeded", paymentIntent(pay, "replay-1", "succeeded", starterAmount, starterAmount, "usd"))
	captured := sign(body, testWebhookSecret, time.Now().Add(-time.Hour))

	for _, header := range []string{
		fmt.Sprintf("t=%d,%s", time.Now().Unix(), captured),
		fmt.Sprintf("%s,t=%d", captured, time.Now().Unix()),
		captured,
	} {
		status, out := postWebhook(t, s, body, header)
		mustStatus(t, "replayed delivery "+header, status, out, http.StatusBadRequest)
	}
	if n := countRows(t, gdb, `SELECT count(*) FROM stripe_events`); n != 0 {
		t.Fatalf("a replayed delivery stored %d events", n)
	}
	if got := balanceOf(t, gdb, "replay-1"); got != 0 {
		t.Fatalf("a replayed delivery credited %d", got)
	}
	if p := getPayment(t, s, pay); p.Status != "pending" {
		t.Fatalf("a replayed delivery moved the payment to %s", p.Status)
	}

	// Stripe's own delivery, signed now, is still taken.
	deliver(t, s, body)
	if got := balanceOf(t, gdb, "replay-1"); got != starterCredits {
		t.Fatalf("the genuine delivery credited %d, want %d", got, starterCredits)
	}
	assertInvariants(t, s)
}

// TestIdempotencyKeySpaces: an end user's keys live in a space of their own,
// per customer, so a key the SPA chose never blocks the backend's consume
// or grant for the same customer; every API key shares one space (as
// Stripe scopes keys per account), so a retry after a key rotation is still
// a replay.
func TestIdempotencyKeySpaces(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	const otherServiceKey = "tally_test_second_service_key"
	fake := stripefake.New(t)
	env := payEnv(t, fake.URL())
	env["TALLY_API_KEYS"] += ",service:" + sha256Hex(otherServiceKey)
	s := startServer(t, env)
	gdb := openDB(t, s)
	key := "job-42"

	userCheckout := func(customer string) string {
		t.Helper()
		r, err := s.client(t, userToken(t, customer, time.Now().Add(time.Hour))).CreateCheckoutSessionWithResponse(ctx,
			&client.CreateCheckoutSessionParams{IdempotencyKey: &key}, client.CheckoutSessionCreate{
				CustomerId: customer, Item: "starter",
				SuccessUrl: "https://app.example.com/paid", CancelUrl: "https://app.example.com/cancel",
			})
		if err != nil {
			t.Fatal(err)
		}
		mustStatus(t, customer+"'s own checkout", r.StatusCode(), r.Body, http.StatusCreated)
		return r.JSON201.PaymentId
	}

	// alice's SPA checks out with job-42; the backend then grants alice
	// credits under job-42, and consumes under job-42 for bob after bob's
	// SPA used it too.
	alicePay := userCheckout("alice")
	grant, err := s.service(t).GrantCreditsWithResponse(ctx, "alice", &client.GrantCreditsParams{IdempotencyKey: key},
		client.GrantRequest{Amount: 100, Reason: "welcome"})
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "backend grant for alice with the SPA's key", grant.StatusCode(), grant.Body, http.StatusCreated)

	userCheckout("bob")
	bobGrant, err := s.service(t).GrantCreditsWithResponse(ctx, "bob", &client.GrantCreditsParams{IdempotencyKey: "seed"},
		client.GrantRequest{Amount: 10, Reason: "welcome"})
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "grant for bob", bobGrant.StatusCode(), bobGrant.Body, http.StatusCreated)
	consume, err := s.service(t).ConsumeCreditsWithResponse(ctx, "bob", &client.ConsumeCreditsParams{IdempotencyKey: key},
		client.ConsumeRequest{Amount: 3, Reason: "job 42"})
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "backend consume for bob with the SPA's key", consume.StatusCode(), consume.Body, http.StatusOK)
	if got := balanceOf(t, gdb, "bob"); got != 7 {
		t.Fatalf("bob's balance = %d, want 7", got)
	}

	// The SPA's own retry is still a replay of its first answer.
	again := userCheckout("alice")
	if again != alicePay {
		t.Fatalf("alice's retry made payment %s, want the replay of %s", again, alicePay)
	}

	// A grant retried under a second service key (a rotation in flight) is
	// the same request in the same space: replayed, not granted twice.
	rotated, err := s.client(t, otherServiceKey).GrantCreditsWithResponse(ctx, "alice", &client.GrantCreditsParams{IdempotencyKey: key},
		client.GrantRequest{Amount: 100, Reason: "welcome"})
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "grant retried with another service key", rotated.StatusCode(), rotated.Body, http.StatusCreated)
	if rotated.HTTPResponse.Header.Get("Idempotent-Replayed") != "true" {
		t.Fatal("a grant retried with another service key was not a replay")
	}
	if got := balanceOf(t, gdb, "alice"); got != 100 {
		t.Fatalf("alice's balance = %d, want 100 (one grant)", got)
	}

	// Usage intake names no customer in its path: its keys are shared by
	// every API key too.
	batch := client.UsageBatch{Events: []client.UsageEventInput{{CustomerId: "alice", Meter: "api_calls", Value: 1, Identifier: "rot-1"}}}
	for i, k := range []string{testServiceKey, otherServiceKey} {
		r, err := s.client(t, k).IngestUsageEventsWithResponse(ctx, &client.IngestUsageEventsParams{IdempotencyKey: &key}, batch)
		if err != nil {
			t.Fatal(err)
		}
		mustStatus(t, "usage batch", r.StatusCode(), r.Body, http.StatusAccepted)
		if replayed := r.HTTPResponse.Header.Get("Idempotent-Replayed") == "true"; replayed != (i == 1) {
			t.Fatalf("usage batch %d: replayed = %v", i+1, replayed)
		}
	}
	mustVerifyClean(t, s)
}

// TestReadinessTellsNoOneWhereTheDatabaseIs: /readyz answers anyone, so
// when the database is gone it says which check failed and nothing about
// the database (user, name, address); the detail goes to the log.
func TestReadinessTellsNoOneWhereTheDatabaseIs(t *testing.T) {
	t.Parallel()
	env := baseEnv(t)
	proxy := behindDBProxy(t, env)
	u, err := url.Parse(env["TALLY_DATABASE_URL"])
	if err != nil {
		t.Fatal(err)
	}
	s := startServer(t, env)

	proxy.down()
	_, port, _ := strings.Cut(proxy.addr, ":")
	dbName := strings.TrimPrefix(u.Path, "/")
	// The first ping may only find its pooled connection broken; the next
	// ones fail to connect, with an error naming user, database and address.
	deadline := time.Now().Add(5 * time.Second)
	for {
		status, body := getWithToken(t, s.URL+"/readyz", "")
		if status == http.StatusServiceUnavailable && !strings.Contains(body, `"database":"failing"`) {
			t.Fatalf("/readyz without a database: %d %s, want 503 naming the database check", status, body)
		}
		for _, secret := range []string{u.User.Username(), dbName, port, "127.0.0.1"} {
			if strings.Contains(body, secret) {
				t.Fatalf("/readyz tells anyone %q: %s", secret, body)
			}
		}
		logs := s.logs.String()
		if status == http.StatusServiceUnavailable && strings.Contains(logs, "readiness check failed") && strings.Contains(logs, port) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the readiness failure's detail did not reach the log within 5s:\n%s", logs)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestMetricsOnTheMainListenerNeedTheAdminKey: on the API's own listener,
// which the internet may reach, /metrics answers only an admin key (what
// Prometheus sends as its bearer token); the separate TALLY_METRICS_ADDR
// listener, reachable only inside the cluster, stays open.
func TestMetricsOnTheMainListenerNeedTheAdminKey(t *testing.T) {
	t.Parallel()
	s := startServer(t, baseEnv(t))
	for _, c := range []struct {
		who, token string
		want       int
	}{
		{"anyone", "", http.StatusUnauthorized},
		{"a wrong key", "not-a-key", http.StatusUnauthorized},
		{"a service key", testServiceKey, http.StatusForbidden},
		{"an end user", userToken(t, "alice", time.Now().Add(time.Hour)), http.StatusForbidden},
		{"the admin key", testAdminKey, http.StatusOK},
	} {
		status, body := getWithToken(t, s.URL+"/metrics", c.token)
		if status != c.want {
			t.Fatalf("/metrics for %s: %d, want %d: %s", c.who, status, c.want, body)
		}
		if (status == http.StatusOK) != strings.Contains(body, "tally_db_up 1") {
			t.Fatalf("/metrics for %s: %d with body %.200s", c.who, status, body)
		}
		if status != http.StatusOK && !strings.Contains(body, `"code"`) {
			t.Fatalf("/metrics refusal for %s is not problem+json: %s", c.who, body)
		}
	}

	env := baseEnv(t)
	env["TALLY_METRICS_ADDR"] = "127.0.0.1:0"
	own := startServer(t, env)
	if status, body := getWithToken(t, own.MetricsURL+"/metrics", ""); status != http.StatusOK || !strings.Contains(body, "tally_db_up") {
		t.Fatalf("/metrics on the cluster-only listener without a token: %d", status)
	}
	if status, _ := getWithToken(t, own.URL+"/metrics", testAdminKey); status != http.StatusNotFound {
		t.Fatalf("/metrics on the API listener with a metrics listener set: %d, want 404", status)
	}
}

// remoteIPs are the remote_ip of every access log line for path, in order.
func remoteIPs(t testing.TB, s *server, path string) []string {
	t.Helper()
	var ips []string
	for line := range strings.SplitSeq(s.logs.String(), "\n") {
		var entry struct {
			Msg      string `json:"msg"`
			Path     string `json:"path"`
			RemoteIP string `json:"remote_ip"`
		}
		if json.Unmarshal([]byte(line), &entry) == nil && entry.Msg == "request" && entry.Path == path {
			ips = append(ips, entry.RemoteIP)
		}
	}
	return ips
}

// TestRemoteIPTrustsOnlyConfiguredProxies: X-Forwarded-For is anyone's to
// write, so the access log's remote_ip believes it only when the connection
// comes from a proxy listed in TALLY_TRUSTED_PROXIES (none by default), and
// then takes the last address no trusted proxy added.
func TestRemoteIPTrustsOnlyConfiguredProxies(t *testing.T) {
	t.Parallel()
	send := func(s *server, path string, headers map[string]string) {
		t.Helper()
		req, _ := http.NewRequest(http.MethodGet, s.URL+path, nil)
		for k, v := range headers {
			req.Header.Set(k, v)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
	}
	forged := map[string]string{"X-Forwarded-For": "203.0.113.9", "X-Real-IP": "203.0.113.10"}

	env := baseEnv(t)
	env["TALLY_LOG_LEVEL"] = "info"
	direct := startServer(t, env)
	send(direct, "/probe-direct", forged)
	if got := remoteIPs(t, direct, "/probe-direct"); len(got) != 1 || got[0] != "127.0.0.1" {
		t.Fatalf("without trusted proxies, remote_ip = %v, want the connection's 127.0.0.1", got)
	}

	env = baseEnv(t)
	env["TALLY_LOG_LEVEL"] = "info"
	env["TALLY_TRUSTED_PROXIES"] = "10.0.0.0/8, 127.0.0.1/32"
	proxied := startServer(t, env)
	send(proxied, "/probe-forwarded", forged)
	// The client forged its first hop; our proxies (10.1.2.3, then the
	// connection's 127.0.0.1) appended the address they saw.
	send(proxied, "/probe-chain", map[string]string{"X-Forwarded-For": "198.51.100.1, 203.0.113.7, 10.1.2.3"})
	if got := remoteIPs(t, proxied, "/probe-forwarded"); len(got) != 1 || got[0] != "203.0.113.9" {
		t.Fatalf("from a trusted proxy, remote_ip = %v, want the forwarded 203.0.113.9", got)
	}
	if got := remoteIPs(t, proxied, "/probe-chain"); len(got) != 1 || got[0] != "203.0.113.7" {
		t.Fatalf("through a chain of trusted proxies, remote_ip = %v, want 203.0.113.7", got)
	}

	env = baseEnv(t)
	env["TALLY_TRUSTED_PROXIES"] = "10.0.0.0/33,not-an-ip"
	if _, err := startServerErr(env); err == nil || !strings.Contains(err.Error(), "TALLY_TRUSTED_PROXIES") {
		t.Fatalf("bad TALLY_TRUSTED_PROXIES: %v, want an error naming it", err)
	}
}

// startServerErr runs `tally serve` with env and returns its error when it
// refuses to start (nil when it is still running after a moment).
func startServerErr(env map[string]string) (string, error) {
	var out syncBuffer
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	err := run(ctx, []string{"tally", "serve"}, func(k string) string { return env[k] }, &out, &out)
	return out.String(), err
}

// TestEndUserTokenWithAStringExpIsRefused: "exp":"<seconds>" is not a
// NumericDate (RFC 7519 §2); such a token is refused, not read as a date.
func TestEndUserTokenWithAStringExpIsRefused(t *testing.T) {
	t.Parallel()
	s := startServer(t, baseEnv(t))
	ctx := context.Background()
	createCustomer(t, s, "alice")
	for exp, want := range map[any]int{
		time.Now().Add(time.Hour).Unix():                        http.StatusOK,
		strconv.FormatInt(time.Now().Add(time.Hour).Unix(), 10): http.StatusUnauthorized,
	} {
		tok, err := jwt.NewWithClaims(jwt.SigningMethodHS256, jwt.MapClaims{"sub": "alice", "exp": exp}).SignedString([]byte(testJWTSecret))
		if err != nil {
			t.Fatal(err)
		}
		r, err := s.client(t, tok).GetBalanceWithResponse(ctx, "alice", nil)
		if err != nil {
			t.Fatal(err)
		}
		mustStatus(t, fmt.Sprintf("balance with exp %#v", exp), r.StatusCode(), r.Body, want)
	}
}

func createCustomer(t testing.TB, s *server, id string) {
	t.Helper()
	r, err := s.service(t).UpsertCustomerWithResponse(context.Background(), id, client.CustomerUpsert{})
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "create "+id, r.StatusCode(), r.Body, http.StatusCreated)
}

// TestEndUsersSeeNoProviderInternals: when Stripe refuses a checkout, the
// payment records why; the backend (a service key) reads Stripe's request
// id and message there, the end user reads only that creation failed.
func TestEndUsersSeeNoProviderInternals(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	fake := stripefake.New(t)
	fake.SetFault(func(r *http.Request) (int, string, bool) {
		if r.URL.Path != "/v1/checkout/sessions" {
			return 0, "", false
		}
		return http.StatusBadRequest, `{"error":{"type":"invalid_request_error","code":"resource_missing","message":"No such tax rate for account acct_internal_77"}}`, true
	})
	s := startServer(t, payEnv(t, fake.URL()))
	user := s.client(t, userToken(t, "carol", time.Now().Add(time.Hour)))
	r, err := user.CreateCheckoutSessionWithResponse(ctx, &client.CreateCheckoutSessionParams{}, client.CheckoutSessionCreate{
		CustomerId: "carol", Item: "starter", SuccessUrl: "https://app.example.com/paid", CancelUrl: "https://app.example.com/cancel",
	})
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "checkout Stripe refuses", r.StatusCode(), r.Body, http.StatusBadGateway)
	internals := []string{"req_fake_fault", "acct_internal_77", "resource_missing"}
	for _, secret := range internals {
		if strings.Contains(string(r.Body), secret) {
			t.Fatalf("the end user's 502 shows %q: %s", secret, r.Body)
		}
	}

	reasons := func(c *client.ClientWithResponses) string {
		t.Helper()
		list, err := c.ListCustomerPaymentsWithResponse(ctx, "carol", &client.ListCustomerPaymentsParams{})
		if err != nil {
			t.Fatal(err)
		}
		mustStatus(t, "carol's payments", list.StatusCode(), list.Body, http.StatusOK)
		if len(list.JSON200.Data) != 1 {
			t.Fatalf("carol has %d payments, want 1", len(list.JSON200.Data))
		}
		one, err := c.GetPaymentWithResponse(ctx, list.JSON200.Data[0].Id)
		if err != nil {
			t.Fatal(err)
		}
		mustStatus(t, "carol's payment", one.StatusCode(), one.Body, http.StatusOK)
		return string(list.Body) + "\n" + string(one.Body)
	}
	seen := reasons(user)
	if !strings.Contains(seen, "checkout session creation failed") {
		t.Fatalf("the end user is not told the checkout failed: %s", seen)
	}
	for _, secret := range internals {
		if strings.Contains(seen, secret) {
			t.Fatalf("the end user reads %q in its payment: %s", secret, seen)
		}
	}
	if backend := reasons(s.service(t)); !strings.Contains(backend, "req_fake_fault") || !strings.Contains(backend, "acct_internal_77") {
		t.Fatalf("the backend lost Stripe's request id and message: %s", backend)
	}
	mustVerifyClean(t, s)
}

// rawJSON sends body to path with the service key and Idempotency-Key key
// (none when empty) and returns the status and the decoded problem, if any.
func rawJSON(t testing.TB, s *server, method, path, key, body string) (int, client.Problem) {
	t.Helper()
	req, err := http.NewRequest(method, s.URL+path, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+testServiceKey)
	req.Header.Set("Content-Type", "application/json")
	if key != "" {
		req.Header.Set("Idempotency-Key", key)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var p client.Problem
	if resp.StatusCode >= 400 {
		if err := json.NewDecoder(resp.Body).Decode(&p); err != nil {
			t.Fatalf("%s %s: %d without a problem body: %v", method, path, resp.StatusCode, err)
		}
	}
	return resp.StatusCode, p
}

// TestBidiControlsAreRefusedWhereverTextIsStored: the embedding, override
// and isolate controls of Unicode's bidirectional algorithm (U+202A-U+202E,
// U+2066-U+2069) make stored text display as something else ("Trojan
// Source"): an operator reads a reason or an identifier backwards. Every
// field whose text tally stores refuses them, naming the field; nothing is
// written. The invisible marks U+200E/U+200F, which right-to-left text
// needs, stay allowed.
func TestBidiControlsAreRefusedWhereverTextIsStored(t *testing.T) {
	t.Parallel()
	s := startServer(t, baseEnv(t))
	gdb := openDB(t, s)
	createCustomer(t, s, "dana")
	grant, p := rawJSON(t, s, http.MethodPost, "/v1/customers/dana/credits/grants", "seed", `{"amount":10,"reason":"seed"}`)
	if grant != http.StatusCreated {
		t.Fatalf("seed grant: %d %+v", grant, p)
	}
	before := countRows(t, gdb, `SELECT count(*) FROM credit_ledger`)
	keysBefore := countRows(t, gdb, `SELECT count(*) FROM idempotency_keys`)

	for _, c := range []struct {
		name, method, path, key, body string
		status                        int
		pointer                       string
	}{
		{"customer name", http.MethodPut, "/v1/customers/eve", "", `{"name":"invoice\u202Efdp.exe"}`, 422, "/name"},
		{"customer metadata value", http.MethodPut, "/v1/customers/eve", "", `{"metadata":{"plan":"pro\u2066x"}}`, 422, "/metadata"},
		{"customer metadata key", http.MethodPut, "/v1/customers/eve", "", `{"metadata":{"pl\u202Aan":"pro"}}`, 422, "/metadata"},
		{"customer email", http.MethodPut, "/v1/customers/eve", "", `{"email":"eve\u202E@example.com"}`, 422, "/email"},
		{"consume reason", http.MethodPost, "/v1/customers/dana/credits/consume", "c-1", `{"amount":1,"reason":"refund \u202Eer"}`, 422, "/reason"},
		{"consume metadata", http.MethodPost, "/v1/customers/dana/credits/consume", "c-2", `{"amount":1,"reason":"x","metadata":{"job":"\u2067j"}}`, 422, "/metadata"},
		{"grant reason", http.MethodPost, "/v1/customers/dana/credits/grants", "g-1", `{"amount":1,"reason":"\u202Bpromo"}`, 422, "/reason"},
		{"idempotency key", http.MethodPost, "/v1/customers/dana/credits/consume", "job-\u202E24", `{"amount":1,"reason":"x"}`, 400, ""},
	} {
		status, p := rawJSON(t, s, c.method, c.path, c.key, c.body)
		if status != c.status || p.Code != client.ErrorCodeInvalidRequest || p.Detail == nil || !strings.Contains(*p.Detail, "bidirectional") {
			t.Errorf("%s: %d %+v, want %d invalid_request about a bidirectional control", c.name, status, p, c.status)
			continue
		}
		if c.pointer != "" && (p.Errors == nil || (*p.Errors)[0].Pointer != c.pointer) {
			t.Errorf("%s: errors %+v, want pointer %s", c.name, p.Errors, c.pointer)
		}
	}
	if n := countRows(t, gdb, `SELECT count(*) FROM customers WHERE id = 'eve'`); n != 0 {
		t.Errorf("refused upserts created eve")
	}
	if n := countRows(t, gdb, `SELECT count(*) FROM credit_ledger`); n != before {
		t.Errorf("refused requests wrote %d ledger entries", n-before)
	}
	if n := countRows(t, gdb, `SELECT count(*) FROM idempotency_keys`); n != keysBefore {
		t.Errorf("refused requests kept %d idempotency keys", n-keysBefore)
	}

	// A batch of usage answers per event: the one with a bidi control in
	// its identifier is rejected, naming it; the other is accepted.
	r, err := s.service(t).IngestUsageEventsWithResponse(context.Background(), &client.IngestUsageEventsParams{}, client.UsageBatch{Events: []client.UsageEventInput{
		{CustomerId: "dana", Meter: "api_calls", Value: 1, Identifier: "u-\u202E1"},
		{CustomerId: "dana", Meter: "api_calls", Value: 1, Identifier: "u-2"},
	}})
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "usage batch", r.StatusCode(), r.Body, http.StatusAccepted)
	res := r.JSON202.Results
	if res[0].Status != "rejected" || res[0].Detail == nil || !strings.Contains(*res[0].Detail, "bidirectional") || res[1].Status != "accepted" {
		t.Fatalf("usage results %s", r.Body)
	}
	if n := countRows(t, gdb, `SELECT count(*) FROM usage_events`); n != 1 {
		t.Fatalf("%d usage events stored, want only u-2", n)
	}

	// Right-to-left text with its marks is ordinary text.
	status, p := rawJSON(t, s, http.MethodPut, "/v1/customers/eve", "", `{"name":"\u05E9\u05DC\u05D5\u05DD 2\u200F"}`)
	if status != http.StatusCreated {
		t.Fatalf("a Hebrew name with a right-to-left mark: %d %+v", status, p)
	}
	mustVerifyClean(t, s)
}
