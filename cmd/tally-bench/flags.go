package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"net/url"
	"slices"
	"strings"
	"time"
)

// The scenarios, in the order they run. Each consume scenario is paired
// with a raw-SQL baseline of the same shape when -db is given.
const (
	scenarioConsumeMany = "consume-many"
	scenarioConsumeHot  = "consume-hot"
	scenarioBalance     = "balance"
	scenarioWebhook     = "webhook"
	scenarioUsage       = "usage"
)

var allScenarios = []string{scenarioConsumeMany, scenarioConsumeHot, scenarioBalance, scenarioWebhook, scenarioUsage}

// settings is everything a run needs, parsed from flags whose defaults come
// from the environment that `make bench` sets.
type settings struct {
	url           string
	key           string
	adminKey      string
	webhookSecret string
	webhookType   string
	db            string
	concurrency   int
	duration      time.Duration
	warmup        time.Duration
	scenarios     []string
	customers     int
	meter         string
	json          bool
	seed          int64
}

// has reports whether scenario name was selected.
func (s settings) has(name string) bool {
	return slices.Contains(s.scenarios, name)
}

// parseSettings reads args (without the program name) with defaults from
// getenv, and reports every problem at once.
func parseSettings(args []string, getenv func(string) string, stderr io.Writer) (settings, error) {
	var s settings
	var scenarios string
	fs := flag.NewFlagSet("tally-bench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintf(stderr, "usage: tally-bench [flags]\n\n"+
			"Load-tests a running tally server over HTTP and compares consume with a raw-SQL\n"+
			"baseline on the same PostgreSQL. Scenarios: %s.\n\n", strings.Join(allScenarios, ", "))
		fs.PrintDefaults()
	}
	fs.StringVar(&s.url, "url", envOr(getenv, "TALLY_BENCH_URL", "http://127.0.0.1:8080"), "tally server base URL (env TALLY_BENCH_URL)")
	fs.StringVar(&s.key, "key", getenv("TALLY_BENCH_API_KEY"), "service API key (env TALLY_BENCH_API_KEY)")
	fs.StringVar(&s.adminKey, "admin-key", getenv("TALLY_BENCH_ADMIN_KEY"), "admin API key; when set, GET /v1/admin/verify runs after the load (env TALLY_BENCH_ADMIN_KEY)")
	fs.StringVar(&s.webhookSecret, "webhook-secret", getenv("TALLY_BENCH_WEBHOOK_SECRET"), "whsec_ secret the server accepts, to sign webhook payloads (env TALLY_BENCH_WEBHOOK_SECRET)")
	fs.StringVar(&s.webhookType, "webhook-type", "payment_intent.succeeded", "Stripe event type for the webhook scenario (payment_intent.succeeded names a payment tally does not know)")
	fs.StringVar(&s.db, "db", getenv("TALLY_BENCH_DATABASE_URL"), "PostgreSQL URL for the raw-SQL baseline, in a scratch schema it drops afterwards; empty: no baseline (env TALLY_BENCH_DATABASE_URL)")
	fs.IntVar(&s.concurrency, "concurrency", 16, "concurrent workers per scenario")
	fs.DurationVar(&s.duration, "duration", 10*time.Second, "measured time per scenario")
	fs.DurationVar(&s.warmup, "warmup", 2*time.Second, "unmeasured time before each scenario")
	fs.StringVar(&scenarios, "scenarios", strings.Join(allScenarios, ","), "comma-separated scenarios to run")
	fs.IntVar(&s.customers, "customers", 1000, "customers for consume-many, balance and usage")
	fs.StringVar(&s.meter, "meter", "api_calls", "meter of the usage events (a plan's meter in the server's catalog)")
	fs.BoolVar(&s.json, "json", false, "print the results as JSON instead of a table")
	fs.Int64Var(&s.seed, "seed", 1, "seed for choosing customers (ids and keys stay unique per run)")
	if err := fs.Parse(args); err != nil {
		return settings{}, err
	}
	if fs.NArg() > 0 {
		return settings{}, fmt.Errorf("unexpected arguments: %s", strings.Join(fs.Args(), " "))
	}
	s.scenarios = splitList(scenarios)
	return s, s.validate()
}

func (s settings) validate() error {
	var problems []error
	if u, err := url.Parse(s.url); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		problems = append(problems, fmt.Errorf("-url %q: want an http:// or https:// base URL", s.url))
	}
	if len(s.scenarios) == 0 {
		problems = append(problems, errors.New("-scenarios: name at least one of "+strings.Join(allScenarios, ", ")))
	}
	seen := map[string]bool{}
	for _, n := range s.scenarios {
		if !slices.Contains(allScenarios, n) {
			problems = append(problems, fmt.Errorf("-scenarios: unknown scenario %q (known: %s)", n, strings.Join(allScenarios, ", ")))
		}
		if seen[n] {
			problems = append(problems, fmt.Errorf("-scenarios: %q named twice", n))
		}
		seen[n] = true
	}
	if s.key == "" {
		problems = append(problems, errors.New("-key: a service API key is required (or TALLY_BENCH_API_KEY)"))
	}
	if s.has(scenarioWebhook) {
		if !strings.HasPrefix(s.webhookSecret, "whsec_") {
			problems = append(problems, errors.New("-webhook-secret: the webhook scenario needs the server's whsec_ secret (or TALLY_BENCH_WEBHOOK_SECRET)"))
		}
		if s.webhookType == "" {
			problems = append(problems, errors.New("-webhook-type: must not be empty"))
		}
	}
	if s.concurrency < 1 || s.concurrency > 10000 {
		problems = append(problems, fmt.Errorf("-concurrency %d: want 1 to 10000", s.concurrency))
	}
	if s.duration <= 0 {
		problems = append(problems, fmt.Errorf("-duration %s: must be positive", s.duration))
	}
	if s.warmup < 0 {
		problems = append(problems, fmt.Errorf("-warmup %s: must not be negative", s.warmup))
	}
	if s.customers < 1 || s.customers > 1000000 {
		problems = append(problems, fmt.Errorf("-customers %d: want 1 to 1000000", s.customers))
	}
	if s.has(scenarioUsage) && s.meter == "" {
		problems = append(problems, errors.New("-meter: the usage scenario needs a meter"))
	}
	return errors.Join(problems...)
}

func envOr(getenv func(string) string, name, fallback string) string {
	if v := getenv(name); v != "" {
		return v
	}
	return fallback
}

func splitList(s string) []string {
	var out []string
	for _, part := range strings.Split(s, ",") {
		if part = strings.TrimSpace(part); part != "" {
			out = append(out, part)
		}
	}
	return out
}
