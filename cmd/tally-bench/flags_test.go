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
	if s.concurrency != 16 || s.duration != 10*time.Second || s.warmup != 2*time.Second || s.customers != 1000 || s.meter != "api_calls" {
		t.Errorf("defaults: %+v", s)
	}
	if !slices.Equal(s.scenarios, allScenarios) {
		t.Errorf("scenarios %v, want all %v", s.scenarios, allScenarios)
	}
}

func TestFlagsOverrideTheEnvironment(t *testing.T) {
	s, err := parseSettings([]string{
		"-url", "https://tally.example.com/", "-key", "k2", "-concurrency", "4", "-duration", "3s",
		"-warmup", "0s", "-scenarios", " consume-hot , balance ", "-customers", "10", "-json", "-seed", "42", "-db", "",
	}, env(map[string]string{"TALLY_BENCH_API_KEY": "k1", "TALLY_BENCH_DATABASE_URL": "postgres://x"}), io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if s.url != "https://tally.example.com/" || s.key != "k2" || s.concurrency != 4 || s.duration != 3*time.Second ||
		s.warmup != 0 || s.customers != 10 || !s.json || s.seed != 42 || s.db != "" {
		t.Errorf("flags not applied: %+v", s)
	}
	if !slices.Equal(s.scenarios, []string{"consume-hot", "balance"}) {
		t.Errorf("scenarios %v", s.scenarios)
	}
	// Without the webhook scenario no secret is needed.
}

func TestSettingsReportEveryProblemAtOnce(t *testing.T) {
	_, err := parseSettings([]string{
		"-url", "127.0.0.1:8080", "-concurrency", "0", "-duration", "0s", "-warmup", "-1s",
		"-scenarios", "consume-many,teleport,consume-many", "-customers", "0",
	}, env(nil), io.Discard)
	if err == nil {
		t.Fatal("bad settings accepted")
	}
	for _, want := range []string{"-url", "-concurrency", "-duration", "-warmup", `unknown scenario "teleport"`, `"consume-many" named twice`, "-customers", "-key"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error does not mention %s:\n%v", want, err)
		}
	}
}

func TestWebhookScenarioNeedsTheSecret(t *testing.T) {
	_, err := parseSettings([]string{"-key", "k", "-scenarios", "webhook"}, env(nil), io.Discard)
	if err == nil || !strings.Contains(err.Error(), "-webhook-secret") {
		t.Fatalf("err = %v, want a -webhook-secret problem", err)
	}
	if _, err := parseSettings([]string{"-key", "k", "-scenarios", "webhook", "-webhook-secret", "whsec_a"}, env(nil), io.Discard); err != nil {
		t.Fatalf("valid webhook settings refused: %v", err)
	}
}

func TestStrayArgumentsAreRefused(t *testing.T) {
	if _, err := parseSettings([]string{"-key", "k", "consume-many"}, env(nil), io.Discard); err == nil {
		t.Fatal("a positional argument was silently ignored")
	}
}
