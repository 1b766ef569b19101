package main

import (
	"bytes"
	"context"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/tallybilling/tally/api"
	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/db/dbtest"
	"github.com/tallybilling/tally/pkg/client"
)

func get(t *testing.T, u string) (int, string, http.Header) {
	t.Helper()
	resp, err := http.Get(u)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), resp.Header
}

// The contract, its rendering and the metrics are served by the binary
// itself, with nothing fetched from elsewhere when viewed.
func TestOperationalEndpoints(t *testing.T) {
	t.Parallel()
	s := startServer(t, baseEnv(t))

	status, body, hdr := get(t, s.URL+"/openapi.yaml")
	if status != 200 || !bytes.Equal([]byte(body), api.SpecYAML) || !strings.Contains(hdr.Get("Content-Type"), "yaml") {
		t.Fatalf("/openapi.yaml: %d %s, %d bytes", status, hdr.Get("Content-Type"), len(body))
	}

	status, body, _ = get(t, s.URL+"/docs")
	if status != 200 || !strings.Contains(body, "/v1/customers/{customer_id}/credits/consume") || !strings.Contains(body, `id="error-insufficient_credits"`) {
		t.Fatalf("/docs: %d, missing operations or error table", status)
	}
	for _, external := range []string{"<script src=", "<link rel=\"stylesheet\" href=\"http", "@import"} {
		if strings.Contains(body, external) {
			t.Fatalf("/docs loads something from outside: %q", external)
		}
	}

	if status, _, hdr := get(t, s.URL+"/healthz"); status != 200 || hdr.Get("X-Request-Id") == "" {
		t.Fatalf("/healthz: %d, request id %q", status, hdr.Get("X-Request-Id"))
	}
	for _, probe := range []string{"/healthz", "/readyz"} {
		resp, err := http.Head(s.URL + probe)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("HEAD %s: %d, want 200", probe, resp.StatusCode)
		}
	}
	body = metricsText(t, s)
	for _, metric := range []string{"tally_http_requests_total", "tally_http_request_duration_seconds", "tally_db_up 1"} {
		if !strings.Contains(body, metric) {
			t.Fatalf("/metrics: missing %s", metric)
		}
	}
	if strings.Contains(s.logs.String(), testServiceKey) || strings.Contains(s.logs.String(), testAdminKey) {
		t.Fatal("a secret reached the logs")
	}
}

func TestMetricsOnTheirOwnListener(t *testing.T) {
	t.Parallel()
	env := baseEnv(t)
	env["TALLY_METRICS_ADDR"] = "127.0.0.1:0"
	s := startServer(t, env)
	if status, _, _ := get(t, s.URL+"/metrics"); status != http.StatusNotFound {
		t.Fatalf("/metrics on the API listener: %d, want 404", status)
	}
	if status, body, _ := get(t, s.MetricsURL+"/metrics"); status != 200 || !strings.Contains(body, "tally_db_up") {
		t.Fatalf("/metrics on the metrics listener: %d", status)
	}
}

// `tally migrate` brings an empty database to the current schema, and a
// second run changes nothing; a server on a database with pending
// migrations is alive but not ready.
func TestMigrateCommandAndReadiness(t *testing.T) {
	t.Parallel()
	env := baseEnv(t)
	env["TALLY_DATABASE_URL"] = dbtest.NewEmptyURL(t)
	getenv := func(k string) string { return env[k] }

	s := startServer(t, env)
	if status, body, _ := get(t, s.URL+"/readyz"); status != http.StatusServiceUnavailable || !strings.Contains(body, "migrations") {
		t.Fatalf("/readyz on an unmigrated database: %d %s, want 503 naming migrations", status, body)
	}

	for i := range 2 {
		var out bytes.Buffer
		if err := run(context.Background(), []string{"tally", "migrate"}, getenv, &out, &out); err != nil {
			t.Fatalf("migrate run %d: %v\n%s", i+1, err, out.String())
		}
		if !strings.Contains(out.String(), "migrations applied") {
			t.Fatalf("migrate run %d printed %q", i+1, out.String())
		}
	}
	waitStatus(t, s.URL+"/readyz", http.StatusOK, 5*time.Second)
}

// SIGTERM (here: the run context ending) lets a request already in flight
// finish with its answer before the process exits, and refuses new ones.
func TestShutdownFinishesInFlightRequests(t *testing.T) {
	t.Parallel()
	s := startServer(t, baseEnv(t))
	c := s.service(t)
	grantOverHTTP(t, c, "ivy", 10, "ivy-grant")

	// Hold the customer's balance row so the consume below waits inside
	// its transaction, in flight, while shutdown begins.
	gdb, err := db.Open(context.Background(), s.DBURL, 2, dbtest.Logger(t))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close(gdb)
	blocker := gdb.Begin()
	if err := blocker.Exec(`SELECT 1 FROM credit_balances WHERE customer_id = 'ivy' FOR UPDATE`).Error; err != nil {
		t.Fatal(err)
	}

	type answer struct {
		status int
		body   []byte
		err    error
	}
	done := make(chan answer, 1)
	go func() {
		r, err := c.ConsumeCreditsWithResponse(context.Background(), "ivy", &client.ConsumeCreditsParams{IdempotencyKey: "ivy-1"},
			client.ConsumeRequest{Amount: 3, Reason: "render"})
		if err != nil {
			done <- answer{err: err}
			return
		}
		done <- answer{status: r.StatusCode(), body: r.Body}
	}()
	time.Sleep(300 * time.Millisecond) // the consume is now waiting on the lock

	stopped := make(chan struct{})
	go func() { s.shutdown(t); close(stopped) }()
	time.Sleep(300 * time.Millisecond)
	select {
	case <-stopped:
		t.Fatal("the server stopped while a request was still in flight")
	default:
	}
	if _, err := http.Get(s.URL + "/healthz"); err == nil {
		t.Fatal("a new connection was accepted after shutdown began")
	}
	if err := blocker.Commit().Error; err != nil {
		t.Fatal(err)
	}
	a := <-done
	if a.err != nil || a.status != http.StatusOK {
		t.Fatalf("in-flight consume: status %d err %v body %s, want 200", a.status, a.err, a.body)
	}
	<-stopped
	var balance int64
	if err := gdb.Raw(`SELECT balance FROM credit_balances WHERE customer_id = 'ivy'`).Scan(&balance).Error; err != nil || balance != 7 {
		t.Fatalf("balance after the in-flight consume = %d (%v), want 7", balance, err)
	}
}

// The single-page app's origin may call tally from the browser; others may not.
func TestCORSAllowList(t *testing.T) {
	t.Parallel()
	env := baseEnv(t)
	env["TALLY_CORS_ORIGINS"] = "https://app.example.com"
	s := startServer(t, env)
	for origin, allowed := range map[string]bool{"https://app.example.com": true, "https://evil.example.com": false} {
		req, _ := http.NewRequest(http.MethodOptions, s.URL+"/v1/customers/ann/balance", nil)
		req.Header.Set("Origin", origin)
		req.Header.Set("Access-Control-Request-Method", "GET")
		req.Header.Set("Access-Control-Request-Headers", "authorization")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		got := resp.Header.Get("Access-Control-Allow-Origin")
		if allowed && got != origin {
			t.Errorf("preflight from %s: Access-Control-Allow-Origin %q, want it allowed", origin, got)
		}
		if !allowed && got != "" {
			t.Errorf("preflight from %s: Access-Control-Allow-Origin %q, want none", origin, got)
		}
	}
}
