package main

import (
	"bytes"
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/tallybilling/tally/api"
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
	status, body, _ = get(t, s.URL+"/metrics")
	for _, metric := range []string{"tally_http_requests_total", "tally_http_request_duration_seconds", "tally_db_up 1"} {
		if status != 200 || !strings.Contains(body, metric) {
			t.Fatalf("/metrics: %d, missing %s", status, metric)
		}
	}
	if strings.Contains(s.logs.String(), testServiceKey) {
		t.Fatal("a secret reached the logs")
	}
}

func TestMetricsOnTheirOwnListener(t *testing.T) {
	env := baseEnv(t)
	env["TALLY_METRICS_ADDR"] = freeAddr(t)
	s := startServer(t, env)
	if status, _, _ := get(t, s.URL+"/metrics"); status != http.StatusNotFound {
		t.Fatalf("/metrics on the API listener: %d, want 404", status)
	}
	if status, body, _ := get(t, "http://"+env["TALLY_METRICS_ADDR"]+"/metrics"); status != 200 || !strings.Contains(body, "tally_db_up") {
		t.Fatalf("/metrics on the metrics listener: %d", status)
	}
}
