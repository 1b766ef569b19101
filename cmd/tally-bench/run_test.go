package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/stripe/stripe-go/v82/webhook"

	"github.com/tallybilling/tally/internal/db/dbtest"
)

// fakeTally answers like tally would, checks what a real server checks
// (key, Idempotency-Key, signature, batch shape) and remembers what it was
// sent. Balance reads answer 503 as an endpoint that is not built yet does;
// holds do not exist, as before issue 10. (cmd/tally-bench's e2e test runs
// the bench against the real server.)
type fakeTally struct {
	secret string
	batch  int

	mu          sync.Mutex
	grants      map[string]int
	consumeKeys map[string]bool
	eventIDs    map[string]bool
	identifiers map[string]bool
	problems    []string
}

func (f *fakeTally) fail(format string, a ...any) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(f.problems) < 10 {
		f.problems = append(f.problems, fmt.Sprintf(format, a...))
	}
}

func (f *fakeTally) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	path := r.URL.Path
	if path == "/healthz" {
		writeJSON(w, 200, `{"status":"ok"}`)
		return
	}
	if path == "/webhooks/stripe" {
		evt, err := webhook.ConstructEvent(body, r.Header.Get("Stripe-Signature"), f.secret)
		if err != nil {
			writeJSON(w, 400, `{"code":"invalid_request","detail":"bad signature"}`)
			return
		}
		f.mu.Lock()
		dup := f.eventIDs[evt.ID]
		f.eventIDs[evt.ID] = true
		f.mu.Unlock()
		if dup {
			f.fail("event id %s sent twice", evt.ID)
		}
		writeJSON(w, 200, `{"received":true,"status":"parked"}`)
		return
	}
	if r.Header.Get("Authorization") != "Bearer svc" {
		writeJSON(w, 401, `{"code":"unauthorized"}`)
		return
	}
	parts := strings.Split(strings.Trim(path, "/"), "/")
	switch {
	case len(parts) == 5 && parts[3] == "credits" && parts[4] == "grants":
		if r.Header.Get("Idempotency-Key") == "" {
			f.fail("grant without Idempotency-Key")
		}
		f.mu.Lock()
		f.grants[parts[2]]++
		f.mu.Unlock()
		writeJSON(w, 201, `{"transaction_id":"t","grant_id":"g","amount":1,"balance":1}`)
	case len(parts) == 5 && parts[3] == "credits" && parts[4] == "consume":
		key := r.Header.Get("Idempotency-Key")
		f.mu.Lock()
		dup := f.consumeKeys[key]
		f.consumeKeys[key] = true
		_, granted := f.grants[parts[2]]
		f.mu.Unlock()
		if key == "" || dup {
			f.fail("consume Idempotency-Key %q missing or reused", key)
		}
		if !granted {
			writeJSON(w, 404, `{"code":"not_found","detail":"no such customer"}`)
			return
		}
		writeJSON(w, 200, `{"transaction_id":"t","amount":1,"balance":1}`)
	case len(parts) == 4 && parts[3] == "balance":
		writeJSON(w, 503, `{"code":"unavailable","detail":"GetBalance is not built yet"}`)
	case path == "/v1/usage-events":
		var batch struct {
			Events []struct {
				Meter      string `json:"meter"`
				Identifier string `json:"identifier"`
			} `json:"events"`
		}
		if err := json.Unmarshal(body, &batch); err != nil || len(batch.Events) != f.batch {
			f.fail("usage batch of %d events (%v)", len(batch.Events), err)
		}
		var results []string
		rejected := 0
		for _, e := range batch.Events {
			f.mu.Lock()
			dup := f.identifiers[e.Identifier]
			f.identifiers[e.Identifier] = true
			f.mu.Unlock()
			if dup {
				f.fail("identifier %s sent twice", e.Identifier)
			}
			if e.Meter != "api_calls" {
				rejected++
				results = append(results, `{"status":"rejected","code":"invalid_request","detail":"unknown meter"}`)
			} else {
				results = append(results, `{"status":"accepted"}`)
			}
		}
		writeJSON(w, 202, `{"accepted":`+strconv.Itoa(len(batch.Events)-rejected)+`,"duplicates":0,"rejected":`+strconv.Itoa(rejected)+`,"results":[`+strings.Join(results, ",")+`]}`)
	default:
		writeJSON(w, 404, `{"code":"not_found","detail":"no such route"}`)
	}
}

func writeJSON(w http.ResponseWriter, status int, body string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_, _ = io.WriteString(w, body)
}

func startFake(t *testing.T) (*fakeTally, string) {
	f := &fakeTally{secret: "whsec_fake", batch: 100, grants: map[string]int{}, consumeKeys: map[string]bool{},
		eventIDs: map[string]bool{}, identifiers: map[string]bool{}}
	srv := httptest.NewServer(f)
	t.Cleanup(srv.Close)
	return f, srv.URL
}

// A whole run against a fake server: funding through the API, unique keys,
// ids and identifiers, baselines with ratios, an endpoint answering 503
// reported as a failed scenario with its reason (and exit status 1), and a
// missing endpoint as a skipped one. Each window is 3 s: the SQL baselines
// run on the machine's PostgreSQL beside the rest of the suite, and one
// commit stalled past a 1 s window in CI once (every worker of sql
// consume-hot waited on that row, and none started inside the window).
func TestRunReportsEveryScenarioAndFailsOnA503Endpoint(t *testing.T) {
	t.Parallel()
	f, url := startFake(t)
	var out, errOut bytes.Buffer
	err := run(t.Context(), []string{
		"-url", url, "-key", "svc", "-webhook-secret", f.secret, "-db", dbtest.NewURL(t),
		"-scenarios", "consume-many,consume-hot,balance,usage,hold-capture,webhook-parked", "-usage-batch", "100",
		"-concurrency", "4", "-duration", "3s", "-warmup", "20ms", "-customers", "20", "-json",
	}, env(nil), &out, &errOut)
	if !errors.Is(err, errNotClean) {
		t.Fatalf("run = %v, want errNotClean because balance answered 503; stderr:\n%s", err, errOut.String())
	}
	for _, p := range f.problems {
		t.Error("fake server saw:", p)
	}

	var rep report
	if err := json.Unmarshal(out.Bytes(), &rep); err != nil {
		t.Fatalf("output is not the JSON report: %v\n%s", err, out.String())
	}
	byName := map[string]scenarioResult{}
	var names []string
	for _, sc := range rep.Scenarios {
		byName[sc.Name] = sc
		names = append(names, sc.Name)
	}
	want := []string{"sql consume-many", "consume-many", "sql consume-hot", "consume-hot", "sql balance", "balance", "usage", "hold-capture", "webhook-parked"}
	if strings.Join(names, ",") != strings.Join(want, ",") {
		t.Fatalf("scenarios %v, want %v", names, want)
	}
	for _, name := range []string{"sql consume-many", "consume-many", "sql consume-hot", "consume-hot", "sql balance", "webhook-parked", "usage"} {
		sc := byName[name]
		if sc.Status != statusOK || sc.Requests == 0 || sc.Errors != 0 || sc.P50Ms <= 0 || sc.P99Ms < sc.P50Ms {
			t.Errorf("%s: %+v, want ok with requests and ordered percentiles", name, sc)
		}
	}
	for _, name := range []string{"consume-many", "consume-hot"} {
		if sc := byName[name]; sc.Baseline != "sql "+name || sc.ThroughputRatio <= 0 || sc.P50Ratio <= 0 {
			t.Errorf("%s: baseline %q ratios %v %v, want both ratios against sql %s", name, sc.Baseline, sc.ThroughputRatio, sc.P50Ratio, name)
		}
	}
	bal := byName["balance"]
	if bal.Status != statusFailed || bal.Errors != bal.Requests || bal.ErrorsByKind["HTTP 503 unavailable"] != bal.Requests ||
		bal.ErrorExamples["HTTP 503 unavailable"] != "GetBalance is not built yet" {
		t.Errorf("balance: %+v, want failed with every request counted as HTTP 503 unavailable and its detail", bal)
	}
	if bal.Baseline != "" {
		t.Errorf("balance failed but was compared with %s", bal.Baseline)
	}
	if wh := byName["webhook-parked"]; wh.Answers["stored as parked"] != wh.Requests {
		t.Errorf("webhook-parked answers %v, want every event stored as parked", wh.Answers)
	}
	if u := byName["usage"]; u.RateUnit != unitEvents || u.Rate != float64(u.OK)*100/3.0 {
		t.Errorf("usage rate %v %s, want 100 events per accepted request over 3s", u.Rate, u.RateUnit)
	}
	if h := byName["hold-capture"]; h.Status != statusSkipped || !strings.Contains(h.Failure, "no holds endpoint") || !strings.Contains(h.Failure, "no such route") {
		t.Errorf("hold-capture: %+v, want skipped, saying the server has no holds endpoint", h)
	}
	if len(rep.Targets) != len(targets) {
		t.Errorf("%d target lines, want one per target (%d)", len(rep.Targets), len(targets))
	}
	for _, tr := range rep.Targets {
		if tr.Verdict != verdictOtherWorker {
			t.Errorf("target %s at 4 workers: %s, want %s", tr.Target, tr.Verdict, verdictOtherWorker)
		}
	}
	if rep.Verify.Checked || !strings.Contains(rep.Verify.Summary, "no -admin-key") {
		t.Errorf("verify %+v, want not run for lack of an admin key", rep.Verify)
	}
	if len(f.grants) != 21 {
		t.Errorf("%d customers funded through the API, want 20 and the hot one", len(f.grants))
	}
	if rep.Machine.CPUs < 1 || rep.Machine.GoVersion == "" || rep.Machine.Server != url || rep.Settings.WebhookType != "payment_intent.succeeded" ||
		rep.Machine.LoadAvgStart == "" || rep.Machine.LoadAvgEnd == "" {
		t.Errorf("machine %+v settings %+v", rep.Machine, rep.Settings)
	}
}

// A 202 in which the server rejected events is not a success: a wrong meter
// must show as errors, not as a fast usage scenario.
func TestUsageWithRejectedEventsCountsAsErrors(t *testing.T) {
	t.Parallel()
	_, url := startFake(t)
	var out bytes.Buffer
	err := run(t.Context(), []string{
		"-url", url, "-key", "svc", "-scenarios", "usage", "-meter", "no_such_meter", "-usage-batch", "100",
		"-concurrency", "2", "-duration", "100ms", "-warmup", "0s", "-db", "",
	}, env(nil), &out, io.Discard)
	if !errors.Is(err, errNotClean) {
		t.Fatalf("run = %v, want errNotClean", err)
	}
	if !strings.Contains(out.String(), "error 202 with rejected invalid_request") || !strings.Contains(out.String(), "unknown meter") ||
		!strings.Contains(out.String(), "baseline: none") {
		t.Errorf("report does not show the rejected events:\n%s", out.String())
	}
}

func TestRunRefusesWhenNoServerAnswers(t *testing.T) {
	t.Parallel()
	srv := httptest.NewServer(http.NotFoundHandler())
	srv.Close() // nothing listens at this address any more
	err := run(t.Context(), []string{"-url", srv.URL, "-key", "svc", "-scenarios", "consume-many", "-db", ""}, env(nil), io.Discard, io.Discard)
	if err == nil || !strings.Contains(err.Error(), "no tally server answering") {
		t.Fatalf("run = %v, want a clear 'no tally server' error", err)
	}
}
