package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"io"
	"log/slog"
	"net/http"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/getkin/kin-openapi/openapi3"
	"github.com/getkin/kin-openapi/openapi3filter"
	"github.com/getkin/kin-openapi/routers"
	"github.com/getkin/kin-openapi/routers/gorillamux"
	"github.com/golang-jwt/jwt/v5"

	"github.com/tallybilling/tally/api"
	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/db/dbtest"
	"github.com/tallybilling/tally/pkg/client"
)

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

// baseEnv is the configuration of a test server on a fresh database.
func baseEnv(t testing.TB) map[string]string {
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

// startServer runs `tally serve` in-process with env (see baseEnv), learns
// the address it bound and waits until /healthz answers. It is stopped, and
// must stop cleanly, at cleanup.
func startServer(t testing.TB, env map[string]string) *server {
	t.Helper()
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
	case <-time.After(15 * time.Second):
		cancel()
		t.Fatalf("tally serve did not listen within 15s\nlogs:\n%s", s.logs)
	}
	deadline := time.Now().Add(15 * time.Second)
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
			t.Fatalf("tally serve did not become healthy within 15s\nlogs:\n%s", s.logs)
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
func (s *server) shutdown(t testing.TB) {
	if s.stop == nil {
		return
	}
	s.stop()
	s.stop = nil
	select {
	case err := <-s.done:
		if err != nil {
			t.Errorf("tally serve returned %v\nlogs:\n%s", err, s.logs)
		}
	case <-time.After(20 * time.Second):
		t.Errorf("tally serve did not stop within 20s\nlogs:\n%s", s.logs)
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
	return resp, nil
}

// pollEvents follows the feed from after, as a host's poller would, until it
// has seen want events (or 15 s pass). The feed shows an event only once every
// older transaction on the PostgreSQL server has ended, so under a busy test
// run it can lag for a moment; it never skips.
func pollEvents(t testing.TB, c *client.ClientWithResponses, after string, want int) client.EventPage {
	t.Helper()
	page := client.EventPage{NextCursor: after}
	deadline := time.Now().Add(15 * time.Second)
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
			t.Fatalf("feed showed %d events within 15s, want %d", len(page.Data), want)
		}
		time.Sleep(20 * time.Millisecond)
	}
	return page
}
