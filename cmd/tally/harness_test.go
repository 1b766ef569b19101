package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"net/url"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/getkin/kin-openapi/openapi3"
	"github.com/getkin/kin-openapi/openapi3filter"
	"github.com/getkin/kin-openapi/routers"
	"github.com/getkin/kin-openapi/routers/gorillamux"
	"github.com/golang-jwt/jwt/v5"
	"github.com/stripe/stripe-go/v82/webhook"
	"gorm.io/gorm"

	"github.com/tallybilling/tally/api"
	"github.com/tallybilling/tally/internal/config"
	"github.com/tallybilling/tally/internal/credits"
	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/db/dbtest"
	"github.com/tallybilling/tally/internal/stripeapi"
	"github.com/tallybilling/tally/internal/stripeapi/stripefake"
	"github.com/tallybilling/tally/pkg/client"
)

// hostZone is the zone the suite runs in, servers included (they run in
// this process): not UTC, so that a time read, made or formatted in the
// host's zone shows, as on a host not on UTC. It is chosen so that the
// local date differs from UTC's when the suite starts: 13:45 ahead of UTC
// (Chatham Islands summer time) from 10:15 UTC on, 11:30 behind before;
// the minutes catch a whole-hour assumption. The contract checker refuses
// any time answered in it (timesNotInUTC).
var hostZone = func() *time.Location {
	if now := time.Now().UTC(); now.Hour()*60+now.Minute() >= 10*60+15 {
		return time.FixedZone("UTC+13:45", 13*3600+45*60)
	}
	return time.FixedZone("UTC-11:30", -(11*3600 + 30*60))
}()

func init() { time.Local = hostZone }

// patience bounds the waits for what takes a moment on a quiet machine (a
// server to start, an event to show in the feed, a worker's round): only a
// failing test waits that long, and a machine running several suites at
// once (load averages of 20 on two cores were seen) does not fail a passing
// one.
const patience = time.Minute

// The keys and secrets every end-to-end server is configured with.
const (
	testServiceKey    = "tally_test_service_key"
	testAdminKey      = "tally_test_admin_key"
	testJWTSecret     = "tally-test-jwt-secret-0123456789abcdef"
	testWebhookSecret = "whsec_tally_test"
)

// server is a running instance of the real `run`, on a port of its own
// (TALLY_HTTP_ADDR 127.0.0.1:0: the port it bound is in URL), against its
// own fresh PostgreSQL database.
type server struct {
	URL string
	// MetricsURL is the separate /metrics listener's (TALLY_METRICS_ADDR),
	// "" when /metrics is served with the API.
	MetricsURL string
	DBURL      string
	env        map[string]string
	logs       *syncBuffer
	stop       context.CancelFunc
	done       chan error
}

type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

func sha256Hex(s string) string {
	sum := sha256.Sum256([]byte(s))
	return hex.EncodeToString(sum[:])
}

// repoFile is the path of a file relative to the module root.
func repoFile(rel string) string {
	_, here, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(here), "..", "..", rel)
}

// baseEnv is the configuration of a test server on a fresh database. Only
// end-to-end tests use it, so it skips under -short before it creates the
// database (which took a second or two per skipped test).
func baseEnv(t testing.TB) map[string]string {
	t.Helper()
	skipShort(t)
	return map[string]string{
		"TALLY_DATABASE_URL":           dbtest.NewURL(t),
		"TALLY_HTTP_ADDR":              "127.0.0.1:0",
		"TALLY_API_KEYS":               "service:" + sha256Hex(testServiceKey) + ",admin:" + sha256Hex(testAdminKey),
		"TALLY_JWT_HS256_SECRET":       testJWTSecret,
		"TALLY_CATALOG_FILE":           repoFile("deploy/catalog.example.yaml"),
		"TALLY_STRIPE_SECRET_KEY":      "sk_test_tally",
		"TALLY_STRIPE_WEBHOOK_SECRETS": testWebhookSecret,
		"TALLY_SHUTDOWN_TIMEOUT":       "10s",
		"TALLY_LOG_LEVEL":              "warn",
		// Small pools: test packages run in parallel against one server whose
		// max_connections is 100 by default.
		"TALLY_DB_MAX_OPEN_CONNS": "5",
	}
}

// skipShort skips an end-to-end test under go test -short (make
// test-short, the quick loop); make test runs every one.
func skipShort(t testing.TB) {
	t.Helper()
	if testing.Short() {
		t.Skip("end-to-end: runs the server (skipped by -short; make test runs it)")
	}
}

// twoServers starts two servers with env (each its own copy of it): two
// replicas of one deployment on one database.
func twoServers(t testing.TB, env map[string]string) (a, b *server) {
	t.Helper()
	return startServer(t, env), startServer(t, maps.Clone(env))
}

// startServer runs `tally serve` in-process with env (see baseEnv), learns
// the address it bound and waits until /healthz answers. It is stopped, and
// must stop cleanly, at cleanup.
func startServer(t testing.TB, env map[string]string) *server {
	t.Helper()
	skipShort(t)
	s := &server{DBURL: env["TALLY_DATABASE_URL"], env: env, logs: &syncBuffer{}, done: make(chan error, 1)}
	ctx, cancel := context.WithCancel(context.Background())
	s.stop = cancel
	bound := make(chan [2]string, 1)
	renv := environment{getenv: func(k string) string { return env[k] }, stdout: s.logs, stderr: s.logs,
		listening: func(addr, metricsAddr string) { bound <- [2]string{addr, metricsAddr} }}
	go func() { s.done <- runIn(ctx, []string{"tally", "serve"}, renv) }()
	select {
	case addrs := <-bound:
		s.URL = "http://" + addrs[0]
		if addrs[1] != "" {
			s.MetricsURL = "http://" + addrs[1]
		}
	case err := <-s.done:
		t.Fatalf("tally serve exited before it listened: %v\nlogs:\n%s", err, s.logs)
	case <-time.After(patience):
		cancel()
		t.Fatalf("tally serve did not listen within %s\nlogs:\n%s", patience, s.logs)
	}
	deadline := time.Now().Add(patience)
	for {
		resp, err := http.Get(s.URL + "/healthz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				break
			}
		}
		select {
		case err := <-s.done:
			t.Fatalf("tally serve exited before it was healthy: %v\nlogs:\n%s", err, s.logs)
		default:
		}
		if time.Now().After(deadline) {
			cancel()
			t.Fatalf("tally serve did not become healthy within %s\nlogs:\n%s", patience, s.logs)
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Cleanup(func() {
		s.checkFeed(t)
		s.shutdown(t)
	})
	return s
}

// checkFeed reads every event the server wrote through the contract
// checker, which validates each event's data against the schema of its type
// in openapi.yaml: whatever a test made tally emit, its events kept the
// contract. It runs at cleanup while the server is still up; a test that
// failed, stopped the server or took its database away is left as it is.
func (s *server) checkFeed(t testing.TB) {
	t.Helper()
	if t.Failed() || s.stop == nil {
		return
	}
	gdb, err := db.Open(context.Background(), s.DBURL, 1, slog.New(slog.DiscardHandler))
	if err != nil {
		return
	}
	defer db.Close(gdb)
	var n int64
	if err := gdb.Raw(`SELECT count(*) FROM events`).Scan(&n).Error; err != nil || n == 0 {
		return
	}
	pollEvents(t, s.client(t, testAdminKey), "", int(n))
}

// shutdown stops the server as SIGTERM would and checks it stopped cleanly.
// It waits 10 s longer than the server's own TALLY_SHUTDOWN_TIMEOUT, so that
// a stop that runs out of that time says so itself (tally serve returns an
// error) rather than being cut short here.
func (s *server) shutdown(t testing.TB) {
	if s.stop == nil {
		return
	}
	s.stop()
	s.stop = nil
	wait := 10 * time.Second
	if d, err := time.ParseDuration(s.env["TALLY_SHUTDOWN_TIMEOUT"]); err == nil {
		wait += d
	}
	select {
	case err := <-s.done:
		if err != nil {
			t.Errorf("tally serve returned %v\nlogs:\n%s", err, s.logs)
		}
	case <-time.After(wait):
		t.Errorf("tally serve did not stop within %s\nlogs:\n%s", wait, s.logs)
	}
}

// client is a pkg/client talking to s with the given bearer token.
func (s *server) client(t testing.TB, token string) *client.ClientWithResponses {
	t.Helper()
	c, err := client.NewClientWithResponses(s.URL, client.WithHTTPClient(&http.Client{Transport: contractChecker(t)}), client.WithRequestEditorFn(func(ctx context.Context, req *http.Request) error {
		if token != "" {
			req.Header.Set("Authorization", "Bearer "+token)
		}
		return nil
	}))
	if err != nil {
		t.Fatalf("client: %v", err)
	}
	return c
}

func (s *server) service(t testing.TB) *client.ClientWithResponses {
	return s.client(t, testServiceKey)
}
func (s *server) admin(t testing.TB) *client.ClientWithResponses { return s.client(t, testAdminKey) }

// userToken is an end-user JWT for customer sub, signed with the test secret.
func userToken(t testing.TB, sub string, expires time.Time) string {
	t.Helper()
	tok, err := jwt.NewWithClaims(jwt.SigningMethodHS256, jwt.RegisteredClaims{
		Subject:   sub,
		ExpiresAt: jwt.NewNumericDate(expires),
		IssuedAt:  jwt.NewNumericDate(time.Now()),
	}).SignedString([]byte(testJWTSecret))
	if err != nil {
		t.Fatalf("sign token: %v", err)
	}
	return tok
}

// tallyCmd runs another subcommand (verify, migrate, ...) against s's
// database and returns its output and error.
func (s *server) tallyCmd(t testing.TB, args ...string) (string, error) {
	t.Helper()
	var out bytes.Buffer
	err := run(context.Background(), append([]string{"tally"}, args...), func(k string) string { return s.env[k] }, &out, &out)
	return out.String(), err
}

// mustStatus fails the test unless the response has the wanted status.
func mustStatus(t testing.TB, what string, got int, body []byte, want int) {
	t.Helper()
	if got != want {
		t.Fatalf("%s: status %d, want %d; body: %s", what, got, want, strings.TrimSpace(string(body)))
	}
}

// specRouter routes requests to the operations of the embedded openapi.yaml.
var specRouter = sync.OnceValues(func() (routers.Router, error) {
	doc, err := openapi3.NewLoader().LoadFromData(api.SpecYAML)
	if err != nil {
		return nil, err
	}
	doc.Servers = nil
	return gorillamux.NewRouter(doc)
})

// sharedTransport lets the many clients of a test reuse connections.
var sharedTransport = &http.Transport{MaxIdleConns: 2000, MaxIdleConnsPerHost: 2000, IdleConnTimeout: 30 * time.Second}

// checkedTransport fails the test when a response breaks the contract: a
// status the operation does not declare, or a body that does not match.
type checkedTransport struct{ t testing.TB }

func contractChecker(t testing.TB) http.RoundTripper { return checkedTransport{t: t} }

func (c checkedTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	resp, err := sharedTransport.RoundTrip(req)
	if err != nil {
		return resp, err
	}
	router, err := specRouter()
	if err != nil {
		c.t.Errorf("load spec: %v", err)
		return resp, nil
	}
	route, params, err := router.FindRoute(req)
	if err != nil {
		return resp, nil // not an operation of the contract (e.g. /metrics)
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		return nil, err
	}
	resp.Body = io.NopCloser(bytes.NewReader(body))
	err = openapi3filter.ValidateResponse(req.Context(), &openapi3filter.ResponseValidationInput{
		RequestValidationInput: &openapi3filter.RequestValidationInput{Request: req, PathParams: params, Route: route},
		Status:                 resp.StatusCode,
		Header:                 resp.Header,
		Body:                   io.NopCloser(bytes.NewReader(body)),
		Options:                &openapi3filter.Options{IncludeResponseStatus: true, MultiError: true},
	})
	if err != nil {
		c.t.Errorf("%s %s answered %d, which breaks openapi.yaml: %v\nbody: %s", req.Method, req.URL.Path, resp.StatusCode, err, body)
	}
	var doc any
	if json.Unmarshal(body, &doc) == nil {
		if bad := timesNotInUTC(doc, nil); len(bad) > 0 {
			c.t.Errorf("%s %s answered times not in UTC (the suite's host zone is %s): %v\nbody: %s",
				req.Method, req.URL.Path, time.Local, bad, body)
		}
	}
	return resp, nil
}

// timesNotInUTC appends to out the strings of the JSON value v that are
// RFC 3339 times written with an offset other than Z: every time tally
// answers is in UTC, whatever its host's zone (which this suite's is not:
// see hostZone). Metadata is the caller's own text and is not looked at.
func timesNotInUTC(v any, out []string) []string {
	switch x := v.(type) {
	case string:
		if _, err := time.Parse(time.RFC3339Nano, x); err == nil && !strings.HasSuffix(x, "Z") {
			out = append(out, x)
		}
	case []any:
		for _, e := range x {
			out = timesNotInUTC(e, out)
		}
	case map[string]any:
		for k, e := range x {
			if k != "metadata" {
				out = timesNotInUTC(e, out)
			}
		}
	}
	return out
}

// pollEvents follows the feed from after, as a host's poller would, until it
// has seen want events (or 15 s pass). The feed shows an event only once every
// older transaction on the PostgreSQL server has ended, so under a busy test
// run it can lag for a moment; it never skips.
func pollEvents(t testing.TB, c *client.ClientWithResponses, after string, want int) client.EventPage {
	t.Helper()
	page := client.EventPage{NextCursor: after}
	deadline := time.Now().Add(patience)
	for len(page.Data) < want {
		r, err := c.ListEventsWithResponse(context.Background(), &client.ListEventsParams{After: &page.NextCursor})
		if err != nil {
			t.Fatal(err)
		}
		mustStatus(t, "events", r.StatusCode(), r.Body, http.StatusOK)
		page.Data = append(page.Data, r.JSON200.Data...)
		page.NextCursor = r.JSON200.NextCursor
		if len(page.Data) >= want {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("feed showed %d events within %s, want %d", len(page.Data), patience, want)
		}
		time.Sleep(20 * time.Millisecond)
	}
	return page
}

// Money flows: the catalog's starter pack, Stripe objects and events as
// Stripe sends them, checkouts, payments and the checks every flow ends
// with.

// The catalog's starter pack (deploy/catalog.example.yaml): $10.00 for 1000 credits.
const (
	starterAmount  = 1000
	starterCredits = 1000
)

// payEnv is a test server's configuration with Stripe's API at stripeURL
// and a quick retry worker.
func payEnv(t testing.TB, stripeURL string) map[string]string {
	env := baseEnv(t)
	env["TALLY_STRIPE_API_URL"] = stripeURL
	env["TALLY_STRIPE_EVENT_RETRY_INTERVAL"] = "100ms"
	return env
}

// assertInvariants runs `tally verify` against the server's database and
// fails on any breach (or when it checked no payment at all).
func assertInvariants(t testing.TB, s *server) {
	t.Helper()
	out, err := s.tallyCmd(t, "verify")
	if err != nil || !strings.Contains(out, "ok: every invariant holds") {
		t.Fatalf("tally verify: %v\n%s", err, out)
	}
	if strings.Contains(out, " and 0 payments") {
		t.Fatalf("tally verify checked no payments:\n%s", out)
	}
}

// receivablesOverHTTP runs GET /v1/admin/verify, fails unless it is ok, and
// returns what each customer owes (open shortfalls) and the body.
func receivablesOverHTTP(t testing.TB, s *server) (map[string]int64, string) {
	t.Helper()
	r, err := s.admin(t).VerifyInvariantsWithResponse(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "verify", r.StatusCode(), r.Body, http.StatusOK)
	if !r.JSON200.Ok {
		t.Fatalf("verify found problems: %s", r.Body)
	}
	owed := map[string]int64{}
	for _, rc := range r.JSON200.Receivables {
		owed[rc.CustomerId] = rc.Shortfall
	}
	return owed, string(r.Body)
}

func balanceOf(t testing.TB, gdb *gorm.DB, customerID string) int64 {
	t.Helper()
	b, err := credits.New(credits.Options{DB: gdb, Config: config.Default().Credits}).Balance(context.Background(), customerID)
	if err != nil {
		t.Fatalf("balance of %s: %v", customerID, err)
	}
	return b.Balance
}

func countRows(t testing.TB, gdb *gorm.DB, query string, args ...any) int64 {
	t.Helper()
	var n int64
	if err := gdb.Raw(query, args...).Scan(&n).Error; err != nil {
		t.Fatalf("%s: %v", query, err)
	}
	return n
}

// checkout starts a checkout of quantity × item for customer and returns the payment id.
func checkout(t testing.TB, s *server, customer, item string, quantity int64) string {
	t.Helper()
	r, err := s.service(t).CreateCheckoutSessionWithResponse(context.Background(), &client.CreateCheckoutSessionParams{}, client.CheckoutSessionCreate{
		CustomerId: customer, Item: item, Quantity: &quantity,
		SuccessUrl: "https://app.example.com/paid", CancelUrl: "https://app.example.com/cancel",
	})
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "checkout", r.StatusCode(), r.Body, http.StatusCreated)
	return r.JSON201.PaymentId
}

func getPayment(t testing.TB, s *server, id string) client.Payment {
	t.Helper()
	r, err := s.service(t).GetPaymentWithResponse(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "get payment", r.StatusCode(), r.Body, http.StatusOK)
	return *r.JSON200
}

var eventSeq atomic.Int64

func newEventID() string {
	return fmt.Sprintf("evt_test_%d_%d", time.Now().UnixNano(), eventSeq.Add(1))
}

// stripeEvent is an event as Stripe sends it (API version of our endpoint).
func stripeEvent(id, typ string, object map[string]any) []byte {
	return stripeEventVersion(id, typ, "2025-03-31.basil", object)
}

func stripeEventVersion(id, typ, apiVersion string, object map[string]any) []byte {
	b, err := json.Marshal(map[string]any{
		"id": id, "object": "event", "api_version": apiVersion, "created": time.Now().Unix(),
		"livemode": false, "pending_webhooks": 1, "type": typ,
		"request": map[string]any{"id": nil, "idempotency_key": nil},
		"data":    map[string]any{"object": object},
	})
	if err != nil {
		panic(err)
	}
	return b
}

func piID(paymentID string) string { return "pi_" + strings.TrimPrefix(paymentID, "pay_") }

// ourPaymentIntents answers GET /v1/payment_intents/{id} on a fake Stripe
// as Stripe does for the PaymentIntents of tally's checkouts: with the
// tally metadata checkout puts there (named), or none for any other; or
// 503 while down. A refund or dispute of a PaymentIntent nothing linked
// yet finds its payment that way.
type ourPaymentIntents struct {
	mu       sync.Mutex
	metadata map[string]string // PaymentIntent -> metadata JSON
	down     bool
}

func answerPaymentIntents(fake *stripefake.Fake) *ourPaymentIntents {
	o := &ourPaymentIntents{metadata: map[string]string{}}
	fake.SetFault(func(r *http.Request) (int, string, bool) {
		id, ok := strings.CutPrefix(r.URL.Path, "/v1/payment_intents/")
		if r.Method != http.MethodGet || !ok {
			return 0, "", false
		}
		o.mu.Lock()
		defer o.mu.Unlock()
		if o.down {
			return http.StatusServiceUnavailable, `{"error":{"type":"api_error","message":"down"}}`, true
		}
		md, ok := o.metadata[id]
		if !ok {
			md = `{}`
		}
		return http.StatusOK, fmt.Sprintf(`{"id":%q,"object":"payment_intent","status":"requires_payment_method","amount":%d,"amount_received":0,"currency":"usd","livemode":false,"metadata":%s}`,
			id, starterAmount, md), true
	})
	return o
}

// name gives payment pay's PaymentIntent (piID) the metadata naming it
// and its customer.
func (o *ourPaymentIntents) name(pay, customer string) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.metadata[piID(pay)] = fmt.Sprintf(`{"tally_payment_id":%q,"tally_customer_id":%q}`, pay, customer)
}

// checkout starts a checkout of starter for customer on s and gives its
// PaymentIntent tally's metadata naming it.
func (o *ourPaymentIntents) checkout(t testing.TB, s *server, customer string) string {
	t.Helper()
	pay := checkout(t, s, customer, "starter", 1)
	o.name(pay, customer)
	return pay
}

// setDown makes Stripe answer 503 (or answer again).
func (o *ourPaymentIntents) setDown(down bool) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.down = down
}

// paymentIntent is a PaymentIntent object for our payment; received is
// amount_received (0 unless it succeeded).
func paymentIntent(paymentID, customer, status string, amount, received int64, currency string) map[string]any {
	pi := map[string]any{
		"id": piID(paymentID), "object": "payment_intent", "amount": amount, "amount_capturable": 0,
		"amount_received": received, "currency": currency, "livemode": false, "status": status,
		"capture_method": "automatic", "confirmation_method": "automatic", "created": time.Now().Unix(),
		"customer": "cus_test", "latest_charge": "ch_" + strings.TrimPrefix(paymentID, "pay_"),
		"metadata":             map[string]string{stripeapi.MetadataPaymentID: paymentID, stripeapi.MetadataCustomerID: customer, stripeapi.MetadataItem: "starter"},
		"payment_method_types": []string{"card"}, "last_payment_error": nil, "cancellation_reason": nil,
	}
	if status == "requires_payment_method" {
		pi["last_payment_error"] = map[string]any{"type": "card_error", "code": "card_declined", "decline_code": "generic_decline", "message": "Your card was declined."}
	}
	return pi
}

// checkoutSession is a Checkout Session object for our payment.
func checkoutSession(paymentID, customer, sessionID, status, paymentStatus string, amount int64) map[string]any {
	return map[string]any{
		"id": sessionID, "object": "checkout.session", "mode": "payment", "status": status, "payment_status": paymentStatus,
		"payment_intent": piID(paymentID), "customer": "cus_test", "invoice": nil, "subscription": nil,
		"client_reference_id": paymentID, "amount_total": amount, "amount_subtotal": amount, "currency": "usd",
		"livemode": false, "expires_at": time.Now().Add(time.Hour).Unix(), "created": time.Now().Unix(),
		"metadata": map[string]string{stripeapi.MetadataPaymentID: paymentID, stripeapi.MetadataCustomerID: customer, stripeapi.MetadataItem: "starter"},
		"url":      nil,
	}
}

// refundedCharge is the charge of charge.refunded, amount_refunded cumulative.
func refundedCharge(paymentID string, amount, refunded int64) map[string]any {
	return map[string]any{
		"id": "ch_" + strings.TrimPrefix(paymentID, "pay_"), "object": "charge", "amount": amount, "amount_captured": amount,
		"amount_refunded": refunded, "refunded": refunded == amount, "currency": "usd", "livemode": false,
		"paid": true, "status": "succeeded", "payment_intent": piID(paymentID), "metadata": map[string]string{},
	}
}

// postWebhook POSTs body to /webhooks/stripe with the given signature
// header (none when empty).
func postWebhook(t testing.TB, s *server, body []byte, signature string) (int, []byte) {
	t.Helper()
	req, err := http.NewRequest(http.MethodPost, s.URL+"/webhooks/stripe", bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json; charset=utf-8")
	if signature != "" {
		req.Header.Set("Stripe-Signature", signature)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	out, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, out
}

func sign(body []byte, secret string, at time.Time) string {
	return webhook.GenerateTestSignedPayload(&webhook.UnsignedPayload{Payload: body, Secret: secret, Timestamp: at}).Header
}

// deliver sends a correctly signed event and expects Stripe's 200.
func deliver(t testing.TB, s *server, body []byte) {
	t.Helper()
	status, out := postWebhook(t, s, body, sign(body, testWebhookSecret, time.Now()))
	mustStatus(t, "webhook delivery", status, out, http.StatusOK)
}

// deliverSuccess delivers the checkout.session.completed and then the
// payment_intent.succeeded of pay, a checkout of starter by customer: the
// payment succeeds, and its PaymentIntent is linked to it.
func deliverSuccess(t testing.TB, s *server, pay, customer string) {
	t.Helper()
	p := getPayment(t, s, pay)
	deliver(t, s, stripeEvent(newEventID(), "checkout.session.completed", checkoutSession(pay, customer, *p.CheckoutSessionId, "complete", "paid", starterAmount)))
	deliver(t, s, stripeEvent(newEventID(), "payment_intent.succeeded", paymentIntent(pay, customer, "succeeded", starterAmount, starterAmount, "usd")))
}

func eventStatus(t testing.TB, gdb *gorm.DB, id string) (status, lastError string) {
	t.Helper()
	var stored struct {
		Status    string
		LastError *string
	}
	res := gdb.Raw(`SELECT status, last_error FROM stripe_events WHERE id = ?`, id).Scan(&stored)
	if res.Error != nil || res.RowsAffected == 0 {
		t.Fatalf("stored event %s: %v (%d rows)", id, res.Error, res.RowsAffected)
	}
	if stored.LastError != nil {
		lastError = *stored.LastError
	}
	return stored.Status, lastError
}

// move is a payment transition as "from>to" ("" from for the first).
func move(tr client.PaymentTransition) string {
	from := ""
	if tr.From != nil {
		from = *tr.From
	}
	return from + ">" + tr.To
}

func metrics(t testing.TB, s *server) string {
	t.Helper()
	return metricsText(t, s)
}

func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	waitForWithin(t, what, patience, cond)
}

// waitForWithin is waitFor with its own bound, for what takes many rounds
// of a worker even on a quiet machine.
func waitForWithin(t testing.TB, what string, within time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", within, what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func containsStr(list []string, s string) bool {
	for _, v := range list {
		if v == s {
			return true
		}
	}
	return false
}

// paidAtStripe is the buyer paying payment pay's Checkout Session with
// PaymentIntent piID(pay): from then on the fake's session names it, as
// Stripe's does. It returns the session object as Stripe now shows it
// (what checkout.session.completed carries).
func paidAtStripe(t testing.TB, fake *stripefake.Fake, s *server, pay string) map[string]any {
	t.Helper()
	p := getPayment(t, s, pay)
	if p.CheckoutSessionId == nil {
		t.Fatalf("payment %s has no Checkout Session", pay)
	}
	obj := fake.PayCheckoutSession(*p.CheckoutSessionId, piID(pay))
	if obj == nil {
		t.Fatalf("Stripe has no Checkout Session %s", *p.CheckoutSessionId)
	}
	return obj
}

// consumeOverHTTP spends amount of customer's credits with a fresh key.
func consumeOverHTTP(t testing.TB, s *server, customer string, amount int64) {
	t.Helper()
	r, err := s.service(t).ConsumeCreditsWithResponse(context.Background(), customer,
		&client.ConsumeCreditsParams{IdempotencyKey: newEventID()}, client.ConsumeRequest{Amount: amount, Reason: "usage"})
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "consume", r.StatusCode(), r.Body, http.StatusOK)
}

// buyStarter checks out one starter pack for customer and delivers its
// success, and returns the payment id.
func buyStarter(t testing.TB, fake *stripefake.Fake, s *server, customer string) string {
	t.Helper()
	pay := checkout(t, s, customer, "starter", 1)
	paidAtStripe(t, fake, s, pay)
	deliver(t, s, stripeEvent(newEventID(), "payment_intent.succeeded", paymentIntent(pay, customer, "succeeded", starterAmount, starterAmount, "usd")))
	return pay
}

// stripeEventCreated is stripeEvent as Stripe created it at created.
func stripeEventCreated(id, typ string, created time.Time, object map[string]any) []byte {
	var ev map[string]any
	if err := json.Unmarshal(stripeEvent(id, typ, object), &ev); err != nil {
		panic(err)
	}
	ev["created"] = created.Unix()
	b, err := json.Marshal(ev)
	if err != nil {
		panic(err)
	}
	return b
}

func eventAttempts(t testing.TB, gdb *gorm.DB, id string) int64 {
	t.Helper()
	return countRows(t, gdb, `SELECT attempts FROM stripe_events WHERE id = ?`, id)
}

// dispute is a Stripe Dispute on our payment's charge.
func dispute(paymentID, id, status string, amount int64) map[string]any {
	return map[string]any{
		"id": id, "object": "dispute", "amount": amount, "currency": "usd", "status": status, "reason": "fraudulent",
		"charge": "ch_" + strings.TrimPrefix(paymentID, "pay_"), "payment_intent": piID(paymentID),
		"livemode": false, "is_charge_refundable": strings.HasPrefix(status, "warning_"), "created": time.Now().Unix(),
		"metadata": map[string]string{}, "balance_transactions": []any{},
		"evidence_details": map[string]any{"due_by": time.Now().Add(7 * 24 * time.Hour).Unix(), "has_evidence": false, "past_due": false, "submission_count": 0},
	}
}

// disputeEvent is a charge.dispute.* event (type is the part after "charge.dispute.").
func disputeEvent(typ string, d map[string]any) []byte {
	return stripeEvent(newEventID(), "charge.dispute."+typ, d)
}

// Credits over HTTP, the database behind the server, metrics.

func grantOverHTTP(t testing.TB, c *client.ClientWithResponses, customerID string, amount int64, key string) client.GrantResult {
	t.Helper()
	r, err := c.GrantCreditsWithResponse(context.Background(), customerID, &client.GrantCreditsParams{IdempotencyKey: key},
		client.GrantRequest{Amount: amount, Reason: "welcome"})
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "grant", r.StatusCode(), r.Body, http.StatusCreated)
	return *r.JSON201
}

func balanceOverHTTP(t testing.TB, c *client.ClientWithResponses, customerID string) client.Balance {
	t.Helper()
	r, err := c.GetBalanceWithResponse(context.Background(), customerID, nil)
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "balance", r.StatusCode(), r.Body, http.StatusOK)
	b, err := r.JSON200.AsBalance()
	if err != nil {
		t.Fatalf("balance: %v: %s", err, r.Body)
	}
	return b
}

func ledgerOverHTTP(t testing.TB, c *client.ClientWithResponses, customerID string) []client.LedgerEntry {
	t.Helper()
	limit := 500
	r, err := c.ListCreditTransactionsWithResponse(context.Background(), customerID, &client.ListCreditTransactionsParams{Limit: &limit})
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "transactions", r.StatusCode(), r.Body, http.StatusOK)
	return r.JSON200.Data
}

// mustVerifyClean runs `tally verify` against the server's database.
func mustVerifyClean(t testing.TB, s *server) {
	t.Helper()
	out, err := s.tallyCmd(t, "verify")
	if err != nil || !strings.Contains(out, "ok: every invariant holds") {
		t.Fatalf("tally verify: %v\n%s", err, out)
	}
}

// openDB is a direct handle on the server's database, for checks and for
// tampering behind the API's back.
func openDB(t testing.TB, s *server) *gorm.DB {
	t.Helper()
	gdb, err := db.Open(context.Background(), s.DBURL, 2, dbtest.Logger(t))
	if err != nil {
		t.Fatalf("open %s: %v", s.DBURL, err)
	}
	t.Cleanup(func() { _ = db.Close(gdb) })
	return gdb
}

// metricsText is /metrics of s's API listener, read with the admin key.
func metricsText(t testing.TB, s *server) string {
	t.Helper()
	status, body := getWithToken(t, s.URL+"/metrics", testAdminKey)
	if status != http.StatusOK {
		t.Fatalf("/metrics: %d %s", status, body)
	}
	return body
}

// getWithToken GETs u with a bearer token (none when empty).
func getWithToken(t testing.TB, u, token string) (int, string) {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, u, nil)
	if err != nil {
		t.Fatal(err)
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// Usage metering.

// meteringEnv is a server whose delivery worker polls quickly.
func meteringEnv(t *testing.T, stripeURL string) map[string]string {
	env := baseEnv(t)
	env["TALLY_STRIPE_API_URL"] = stripeURL
	env["TALLY_METER_POLL_INTERVAL"] = "20ms"
	return env
}

func usageEvent(customer, identifier string, value float64) client.UsageEventInput {
	return client.UsageEventInput{CustomerId: customer, Meter: "api_calls", Value: value, Identifier: identifier}
}

// waitUsageStatus polls GET /v1/usage-events/{identifier} until it reports want.
func waitUsageStatus(t *testing.T, c *client.ClientWithResponses, identifier string, want client.UsageStatus) client.UsageEventStatus {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		res, err := c.GetUsageEventWithResponse(context.Background(), identifier)
		if err != nil {
			t.Fatal(err)
		}
		if res.JSON200 != nil && res.JSON200.Status == want {
			return *res.JSON200
		}
		if time.Now().After(deadline) {
			t.Fatalf("usage event %s: still %s after 30s, want %s", identifier, res.Body, want)
		}
		time.Sleep(25 * time.Millisecond)
	}
}

// The offline Stripe sandbox.

// sandboxEnv is a server running the offline Stripe sandbox: no Stripe
// URL, its own webhooks to its own /webhooks/stripe.
func sandboxEnv(t testing.TB) map[string]string {
	env := baseEnv(t)
	env["TALLY_STRIPE_SANDBOX"] = "true"
	env["TALLY_STRIPE_SANDBOX_DEMO_KEY"] = testServiceKey
	env["TALLY_STRIPE_EVENT_RETRY_INTERVAL"] = "100ms"
	env["TALLY_METER_POLL_INTERVAL"] = "20ms"
	return env
}

// waitPayment polls the payment until it has status want (webhooks arrive
// asynchronously, as from Stripe).
func waitPayment(t testing.TB, s *server, id string, want client.PaymentStatus) client.Payment {
	t.Helper()
	deadline := time.Now().Add(patience)
	for {
		p := getPayment(t, s, id)
		if p.Status == want {
			return p
		}
		if time.Now().After(deadline) {
			t.Fatalf("payment %s is %s after %s, want %s; transitions %+v", id, p.Status, patience, want, p.Transitions)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// A proxy in front of PostgreSQL, to take the database away and bring it back.

// dbProxy stands between tally and PostgreSQL so a test can take the
// database away (every connection cut, new ones refused) and bring it back on
// the same address, as a database restart or failover looks to the service.
type dbProxy struct {
	t      testing.TB
	target string
	addr   string
	mu     sync.Mutex
	ln     net.Listener
	conns  map[net.Conn]bool
	// stalled, while set, holds every byte in either direction: the
	// database accepts connections and then says nothing (stall, resume).
	stalled atomic.Bool
}

// behindDBProxy points env's TALLY_DATABASE_URL at a new proxy in front
// of its database, and returns the proxy.
func behindDBProxy(t testing.TB, env map[string]string) *dbProxy {
	t.Helper()
	u, err := url.Parse(env["TALLY_DATABASE_URL"])
	if err != nil {
		t.Fatal(err)
	}
	proxy := newDBProxy(t, u.Host)
	u.Host = proxy.addr
	env["TALLY_DATABASE_URL"] = u.String()
	return proxy
}

func newDBProxy(t testing.TB, target string) *dbProxy {
	// The first up binds a port of its own; later ones take it again.
	p := &dbProxy{t: t, target: target, addr: "127.0.0.1:0", conns: map[net.Conn]bool{}}
	p.up()
	t.Cleanup(p.down)
	return p
}

func (p *dbProxy) up() {
	p.t.Helper()
	var ln net.Listener
	var err error
	for range 50 { // the port may linger briefly after down
		if ln, err = net.Listen("tcp", p.addr); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		p.t.Fatalf("proxy listen: %v", err)
	}
	p.mu.Lock()
	p.ln = ln
	p.addr = ln.Addr().String()
	p.mu.Unlock()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go p.pipe(c)
		}
	}()
}

func (p *dbProxy) pipe(c net.Conn) {
	s, err := net.Dial("tcp", p.target)
	if err != nil {
		c.Close()
		return
	}
	p.mu.Lock()
	p.conns[c], p.conns[s] = true, true
	p.mu.Unlock()
	go func() { p.copy(s, c); s.Close() }()
	p.copy(c, s)
	c.Close()
}

// copy is io.Copy from src to dst that holds what it read while the proxy
// is stalled.
func (p *dbProxy) copy(dst, src net.Conn) {
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		for n > 0 && p.stalled.Load() {
			time.Sleep(10 * time.Millisecond)
		}
		if n > 0 {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// stall makes the database stop answering without closing anything, as
// a database host that hangs or a network that drops packets looks to
// the service; resume lets the held bytes through.
func (p *dbProxy) stall()  { p.stalled.Store(true) }
func (p *dbProxy) resume() { p.stalled.Store(false) }

func (p *dbProxy) down() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.ln != nil {
		p.ln.Close()
		p.ln = nil
	}
	for c := range p.conns {
		c.Close()
	}
	p.conns = map[net.Conn]bool{}
}

// deref is what p points at, or T's zero value when p is nil: the
// generated client's optional fields read in one expression.
func deref[T any](p *T) T {
	if p == nil {
		var zero T
		return zero
	}
	return *p
}
