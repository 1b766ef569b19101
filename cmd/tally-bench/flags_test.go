package main

import (
	"io"
	"slices"
	"strings"
	"testing"
	"time"
)

func env(vars map[string]string) func(string) string {
	return func(name string) string { return vars[name] }
}

func TestSettingsDefaultsComeFromTheEnvironmentMakeBenchSets(t *testing.T) {
	t.Parallel()
	s, err := parseSettings(nil, env(map[string]string{
		"TALLY_BENCH_URL":            "http://127.0.0.1:18181",
		"TALLY_BENCH_API_KEY":        "svc",
		"TALLY_BENCH_ADMIN_KEY":      "adm",
		"TALLY_BENCH_WEBHOOK_SECRET": "whsec_x",
		"TALLY_BENCH_DATABASE_URL":   "postgres://postgres@127.0.0.1/tally",
	}), io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if s.url != "http://127.0.0.1:18181" || s.key != "svc" || s.adminKey != "adm" || s.webhookSecret != "whsec_x" || s.db != "postgres://postgres@127.0.0.1/tally" {
		t.Errorf("environment not used as defaults: %+v", s)
	}
	if s.concurrency != 16 || s.duration != 10*time.Second || s.warmup != 2*time.Second || s.customers != 1000 || s.meter != "api_calls" ||
		s.usageBatch != 1000 || s.verify != verifyAPI || s.pack != "starter" || s.seed {
		t.Errorf("defaults: %+v", s)
	}
	if !slices.Equal(s.scenarios, defaultScenarios) {
		t.Errorf("scenarios %v, want the defaults %v", s.scenarios, defaultScenarios)
	}
	// Enough payments to credit at twice the target rate for warmup + duration.
	if n := s.paymentsToPrepare(); n != 24000 {
		t.Errorf("payments to prepare = %d, want 2 x 1000/s x 12 s = 24000", n)
	}
}

// Every scenario of the target table runs by default; webhook-parked, which
// leaves parked events behind, only when named.
func TestDefaultScenariosCoverEveryTarget(t *testing.T) {
	t.Parallel()
	for _, tg := range targets {
		for _, name := range []string{tg.Scenario, strings.TrimPrefix(tg.Baseline, "sql ")} {
			if name != "" && !slices.Contains(defaultScenarios, name) {
				t.Errorf("target %q needs %s, which is not a default scenario", tg, name)
			}
		}
	}
	if slices.Contains(defaultScenarios, scenarioWebhookParked) || !slices.Contains(allScenarios, scenarioWebhookParked) {
		t.Errorf("webhook-parked must be known but not run by default: %v", defaultScenarios)
	}
}

func TestFlagsOverrideTheEnvironment(t *testing.T) {
	t.Parallel()
	s, err := parseSettings([]string{
		"-url", "https://tally.example.com/", "-key", "k2", "-concurrency", "4", "-duration", "3s",
		"-warmup", "0s", "-scenarios", " consume-hot , balance ", "-customers", "10", "-json", "-rand-seed", "42", "-db", "",
		"-usage-batch", "250", "-payments", "77", "-pack", "pro", "-verify", "off",
	}, env(map[string]string{"TALLY_BENCH_API_KEY": "k1", "TALLY_BENCH_DATABASE_URL": "postgres://x"}), io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if s.url != "https://tally.example.com/" || s.key != "k2" || s.concurrency != 4 || s.duration != 3*time.Second ||
		s.warmup != 0 || s.customers != 10 || !s.json || s.randSeed != 42 || s.db != "" || s.usageBatch != 250 ||
		s.payments != 77 || s.paymentsToPrepare() != 77 || s.pack != "pro" || s.verify != verifyOff {
		t.Errorf("flags not applied: %+v", s)
	}
	if !slices.Equal(s.scenarios, []string{"consume-hot", "balance"}) {
		t.Errorf("scenarios %v", s.scenarios)
	}
	// Without the webhook scenario no secret is needed.
}

func TestSettingsReportEveryProblemAtOnce(t *testing.T) {
	t.Parallel()
	_, err := parseSettings([]string{
		"-url", "127.0.0.1:8080", "-concurrency", "0", "-duration", "0s", "-warmup", "-1s",
		"-scenarios", "consume-many,teleport,consume-many", "-customers", "0", "-usage-batch", "1001",
		"-payments", "-1", "-verify", "maybe",
	}, env(nil), io.Discard)
	if err == nil {
		t.Fatal("bad settings accepted")
	}
	for _, want := range []string{"-url", "-concurrency", "-duration", "-warmup", `unknown scenario "teleport"`, `"consume-many" named twice`,
		"-customers", "-key", "-usage-batch 1001", "-payments -1", `-verify "maybe"`} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error does not mention %s:\n%v", want, err)
		}
	}
}

func TestWebhookScenariosNeedTheSecret(t *testing.T) {
	t.Parallel()
	_, err := parseSettings([]string{"-key", "k", "-scenarios", "webhook-parked"}, env(nil), io.Discard)
	if err == nil || !strings.Contains(err.Error(), "-webhook-secret") {
		t.Fatalf("err = %v, want a -webhook-secret problem", err)
	}
	if _, err := parseSettings([]string{"-key", "k", "-scenarios", "webhook-parked", "-webhook-secret", "whsec_a"}, env(nil), io.Discard); err != nil {
		t.Fatalf("valid webhook settings refused: %v", err)
	}
}

// webhook-credited checks its payments in the database, and -verify db
// runs there: both need -db.
func TestDatabaseChecksNeedTheDatabase(t *testing.T) {
	t.Parallel()
	_, err := parseSettings([]string{"-key", "k", "-scenarios", "webhook-credited", "-webhook-secret", "whsec_a", "-verify", "db", "-db", ""}, env(nil), io.Discard)
	if err == nil || !strings.Contains(err.Error(), "webhook-credited checks in the database") || !strings.Contains(err.Error(), "-verify db: needs -db") {
		t.Fatalf("err = %v, want both -db problems", err)
	}
}

// -seed needs only the database: no key, no server.
func TestSeedModeNeedsOnlyTheDatabase(t *testing.T) {
	t.Parallel()
	s, err := parseSettings([]string{"-seed", "-seed-customers", "2000", "-seed-ledger", "20000", "-seed-usage", "5", "-seed-workers", "3"},
		env(map[string]string{"TALLY_BENCH_DATABASE_URL": "postgres://x"}), io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if !s.seed || s.seedCustomers != 2000 || s.seedLedger != 20000 || s.seedUsage != 5 || s.seedWorkers != 3 || s.db != "postgres://x" {
		t.Errorf("seed flags not applied: %+v", s)
	}
	if s, err = parseSettings([]string{"-seed"}, env(map[string]string{"TALLY_BENCH_DATABASE_URL": "postgres://x"}), io.Discard); err != nil ||
		s.seedCustomers != 1_000_000 || s.seedLedger != 10_000_000 || s.seedUsage != 10_000_000 {
		t.Errorf("seed defaults %+v (%v), want 1M customers, 10M ledger entries, 10M usage events", s, err)
	}
	_, err = parseSettings([]string{"-seed", "-db", "", "-seed-customers", "0", "-seed-ledger", "-1", "-seed-workers", "0"}, env(nil), io.Discard)
	if err == nil {
		t.Fatal("bad seed settings accepted")
	}
	for _, want := range []string{"-seed: needs -db", "-seed-customers 0", "-seed-ledger -1", "-seed-workers 0"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error does not mention %s:\n%v", want, err)
		}
	}
	if _, err := parseSettings([]string{"-seed", "-db", "postgres://x", "-seed-customers", "10", "-seed-ledger", "100000"}, env(nil), io.Discard); err == nil ||
		!strings.Contains(err.Error(), "per customer") {
		t.Errorf("err = %v, want the per-customer bound", err)
	}
}

func TestStrayArgumentsAreRefused(t *testing.T) {
	t.Parallel()
	if _, err := parseSettings([]string{"-key", "k", "consume-many"}, env(nil), io.Discard); err == nil {
		t.Fatal("a positional argument was silently ignored")
	}
}
