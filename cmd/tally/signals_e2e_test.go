package main

import (
	"context"
	"encoding/json"
	"net/http"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"testing"

	"github.com/tallybilling/tally/internal/stripeapi/stripefake"
	"github.com/tallybilling/tally/pkg/client"
)

// The alert rules load and their unit tests pass, with promtool:
// TALLY_PROMTOOL_BIN (make test sets it: the one on PATH, else the pinned
// one `make tools` builds), or the one on PATH.
func TestAlertRulesPassPromtool(t *testing.T) {
	t.Parallel()
	promtool := os.Getenv("TALLY_PROMTOOL_BIN")
	if promtool == "" {
		promtool, _ = exec.LookPath("promtool")
	}
	if promtool == "" {
		t.Fatal("promtool is needed to check deploy/prometheus/alerts.yaml: run the tests with make test (make tools builds it), or put promtool on PATH (apt-get install prometheus)")
	}
	dir := repoFile("deploy/prometheus")
	for _, args := range [][]string{{"check", "rules", "alerts.yaml"}, {"test", "rules", "alerts_test.yaml"}} {
		cmd := exec.Command(promtool, args...)
		cmd.Dir = dir
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("promtool %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	rules, err := os.ReadFile(repoFile("deploy/prometheus/alerts.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	for _, alert := range []string{"TallyStripeEventLagHigh", "TallyPaymentPendingTooLong", "TallyInvariantBreach", "TallyStripeSyncFailing"} {
		if !strings.Contains(string(rules), "alert: "+alert+"\n") {
			t.Errorf("alerts.yaml has no %s", alert)
		}
	}
}

// dashboardPanel is what the test reads of a Grafana panel.
type dashboardPanel struct {
	Type    string `json:"type"`
	Title   string `json:"title"`
	Targets []struct {
		Expr string `json:"expr"`
	} `json:"targets"`
}

var metricName = regexp.MustCompile(`\btally_[a-z_]+\b`)

// Every query of every panel of the Grafana dashboard names only metrics
// that a running tally exports, read from its /metrics after it did the
// things they measure (a payment confirmed by webhook, a sync, a usage
// event delivered, the background verify); and each signal the issue names
// has its panel.
func TestDashboardQueriesNameExportedMetrics(t *testing.T) {
	t.Parallel()
	raw, err := os.ReadFile(repoFile("deploy/grafana/tally.json"))
	if err != nil {
		t.Fatal(err)
	}
	var dash struct {
		Panels []dashboardPanel `json:"panels"`
	}
	if err := json.Unmarshal(raw, &dash); err != nil {
		t.Fatalf("deploy/grafana/tally.json: %v", err)
	}

	fake := stripefake.New(t)
	fake.SetMeter("mtr_api_calls", "api_calls")
	env := syncEnv(t, fake.URL())
	env["TALLY_METER_POLL_INTERVAL"] = "50ms"
	s := startServer(t, env)
	ctx := context.Background()
	pay := checkout(t, s, "signals", "starter", 1)
	paidAtStripe(t, fake, s, pay)
	deliver(t, s, stripeEvent(newEventID(), "payment_intent.succeeded", paymentIntent(pay, "signals", "succeeded", starterAmount, starterAmount, "usd")))
	stripeSync(t, s, future())
	res, err := s.service(t).IngestUsageEventsWithResponse(ctx, nil, client.UsageBatch{Events: []client.UsageEventInput{usageEvent("signals", "signals-1", 1)}})
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "ingest", res.StatusCode(), res.Body, http.StatusAccepted)
	waitUsageStatus(t, s.service(t), "signals-1", client.UsageStatusDelivered)

	exported := map[string]bool{}
	for line := range strings.SplitSeq(metrics(t, s), "\n") {
		if name, ok := strings.CutPrefix(line, "# TYPE "); ok {
			exported[strings.Fields(name)[0]] = true
		}
	}
	known := func(name string) bool {
		if exported[name] {
			return true
		}
		for _, suffix := range []string{"_bucket", "_sum", "_count"} {
			if base, ok := strings.CutSuffix(name, suffix); ok && exported[base] {
				return true
			}
		}
		return false
	}
	used := map[string]bool{}
	queries := 0
	for _, p := range dash.Panels {
		if p.Type == "row" {
			continue
		}
		if len(p.Targets) == 0 {
			t.Errorf("panel %q has no query", p.Title)
		}
		for _, target := range p.Targets {
			queries++
			names := metricName.FindAllString(target.Expr, -1)
			if len(names) == 0 {
				t.Errorf("panel %q: query %q names no tally metric", p.Title, target.Expr)
			}
			for _, n := range names {
				used[n] = true
				if !known(n) {
					t.Errorf("panel %q: %s is not a metric tally exports", p.Title, n)
				}
			}
		}
	}
	// The seeds' signals: latency, anomalies, consistency, usage delivery.
	for _, want := range []string{"tally_stripe_event_lag_seconds_bucket", "tally_stripe_events_total", "tally_stripe_events_parked",
		"tally_invariant_breaches", "tally_payments_pending_oldest_seconds", "tally_stripe_sync_found_total",
		"tally_usage_deliveries_total", "tally_usage_events_pending"} {
		if !used[want] {
			t.Errorf("no panel shows %s", want)
		}
	}
	if queries < 10 {
		t.Fatalf("only %d queries in the dashboard", queries)
	}
}
