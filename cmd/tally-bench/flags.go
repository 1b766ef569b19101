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

// The scenarios, in the order they run. consume-many, consume-hot and
// balance are each measured right after their raw-SQL baseline when -db is
// given.
const (
	scenarioConsumeMany     = "consume-many"
	scenarioConsumeHot      = "consume-hot"
	scenarioBalance         = "balance"
	scenarioHTTPFloor       = "http-floor"
	scenarioWebhookCredited = "webhook-credited"
	scenarioUsage           = "usage"
	scenarioHoldCapture     = "hold-capture"
	scenarioWebhookParked   = "webhook-parked"
)

// allScenarios is every scenario in run order; defaultScenarios those a run
// measures unless -scenarios says otherwise: the whole target table and the
// hold-capture slot, and http-floor, which says how far any HTTP endpoint can
// go on the machine the run is on. webhook-parked is asked for by name only, because every
// event it sends stays parked for an operator.
var (
	allScenarios = []string{scenarioConsumeMany, scenarioConsumeHot, scenarioBalance, scenarioHTTPFloor,
		scenarioWebhookCredited, scenarioUsage, scenarioHoldCapture, scenarioWebhookParked}
	defaultScenarios = []string{scenarioConsumeMany, scenarioConsumeHot, scenarioBalance, scenarioHTTPFloor,
		scenarioWebhookCredited, scenarioUsage, scenarioHoldCapture}
)

// How the invariant check runs after the load (-verify).
const (
	verifyAPI = "api" // GET /v1/admin/verify on the server
	verifyDB  = "db"  // the project's verify, in this process, on -db
	verifyOff = "off"
)

// maxUsageBatch is the most events the server takes in one request.
const maxUsageBatch = 1000

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
	usageBatch    int
	payments      int
	pack          string
	verify        string
	json          bool
	randSeed      int64
	// cpuProfile, when set, is where this process's own CPU profile of the
	// whole run goes (runtime/pprof), to see what the load generator costs.
	cpuProfile string
	// cpu names the processes whose CPU each scenario reports (cpu.go).
	cpu []string

	// seed mode: load a large data set into -db instead of measuring.
	seed          bool
	seedCustomers int
	seedLedger    int64
	seedUsage     int64
	seedWorkers   int
}

// has reports whether scenario name was selected.
func (s settings) has(name string) bool {
	return slices.Contains(s.scenarios, name)
}

// paymentsToPrepare is how many pending payments webhook-credited gets
// ready: -payments, or by default enough to credit at twice the target rate
// through the warmup and the measured time.
func (s settings) paymentsToPrepare() int {
	if s.payments > 0 {
		return s.payments
	}
	return int(2 * webhookCreditedTarget * (s.warmup + s.duration).Seconds())
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
			"Load-tests a running tally server over HTTP, compares it with raw-SQL baselines on the same\n"+
			"PostgreSQL and prints a PASS/MISS line per performance target. Scenarios: %s.\n\n"+
			"With -seed it loads a large data set into -db instead (no server needed) and exits.\n\n",
			strings.Join(allScenarios, ", "))
		fs.PrintDefaults()
	}
	fs.StringVar(&s.url, "url", envOr(getenv, "TALLY_BENCH_URL", "http://127.0.0.1:8080"), "tally server base URL (env TALLY_BENCH_URL)")
	fs.StringVar(&s.key, "key", getenv("TALLY_BENCH_API_KEY"), "service API key (env TALLY_BENCH_API_KEY)")
	fs.StringVar(&s.adminKey, "admin-key", getenv("TALLY_BENCH_ADMIN_KEY"), "admin API key, for -verify api (env TALLY_BENCH_ADMIN_KEY)")
	fs.StringVar(&s.webhookSecret, "webhook-secret", getenv("TALLY_BENCH_WEBHOOK_SECRET"), "whsec_ secret the server accepts, to sign webhook payloads (env TALLY_BENCH_WEBHOOK_SECRET)")
	fs.StringVar(&s.webhookType, "webhook-type", "payment_intent.succeeded", "Stripe event type the webhook-parked scenario sends")
	fs.StringVar(&s.db, "db", getenv("TALLY_BENCH_DATABASE_URL"), "the server's PostgreSQL URL: raw-SQL baselines (in a scratch schema dropped afterwards), webhook-credited's checks, -verify db and -seed (env TALLY_BENCH_DATABASE_URL)")
	fs.IntVar(&s.concurrency, "concurrency", 16, "concurrent workers per scenario")
	fs.DurationVar(&s.duration, "duration", 10*time.Second, "measured time per scenario")
	fs.DurationVar(&s.warmup, "warmup", 2*time.Second, "unmeasured time before each scenario")
	fs.StringVar(&scenarios, "scenarios", strings.Join(defaultScenarios, ","), "comma-separated scenarios to run (also: "+scenarioWebhookParked+")")
	fs.IntVar(&s.customers, "customers", 1000, "customers for consume-many, balance, webhook-credited, usage and hold-capture")
	fs.StringVar(&s.meter, "meter", "api_calls", "meter of the usage events (a plan's meter in the server's catalog)")
	fs.IntVar(&s.usageBatch, "usage-batch", maxUsageBatch, "usage events per request")
	fs.IntVar(&s.payments, "payments", 0, "pending payments webhook-credited prepares; 0: twice the target rate over warmup and duration")
	fs.StringVar(&s.pack, "pack", "starter", "catalog credit pack the webhook-credited payments buy")
	fs.StringVar(&s.verify, "verify", verifyAPI, "invariant check after the load: api (GET /v1/admin/verify, needs -admin-key), db (the project's verify in this process on -db, for databases too large for one HTTP request), off")
	fs.BoolVar(&s.json, "json", false, "print the results as JSON instead of a table")
	fs.Int64Var(&s.randSeed, "rand-seed", 1, "random seed for choosing customers and duplicates (ids and keys stay unique per run)")
	fs.StringVar(&s.cpuProfile, "cpuprofile", "", "write a CPU profile of this tool itself (not the server) over the whole run to this file, for go tool pprof")
	var cpu string
	fs.StringVar(&cpu, "cpu", "postgres,tally,tally-bench", "comma-separated command names of this machine's processes whose CPU each scenario reports per operation, "+
		"with how busy the machine was (Linux /proc; off: none)")
	fs.BoolVar(&s.seed, "seed", false, "load -seed-customers, -seed-ledger and -seed-usage rows into -db, then exit (resumable; seeded ids start with "+seedPrefix+")")
	fs.IntVar(&s.seedCustomers, "seed-customers", 1_000_000, "customers -seed loads")
	fs.Int64Var(&s.seedLedger, "seed-ledger", 10_000_000, "ledger entries -seed loads: per customer one grant, the rest consumes of 1 credit")
	fs.Int64Var(&s.seedUsage, "seed-usage", 10_000_000, "delivered usage events -seed loads")
	fs.IntVar(&s.seedWorkers, "seed-workers", 2, "connections -seed loads through in parallel")
	if err := fs.Parse(args); err != nil {
		return settings{}, err
	}
	if fs.NArg() > 0 {
		return settings{}, fmt.Errorf("unexpected arguments: %s", strings.Join(fs.Args(), " "))
	}
	s.scenarios = splitList(scenarios)
	if cpu != "off" {
		s.cpu = splitList(cpu)
	}
	return s, s.validate()
}

func (s settings) validate() error {
	if s.seed {
		return s.validateSeed()
	}
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
	if (s.has(scenarioWebhookParked) || s.has(scenarioWebhookCredited)) && !strings.HasPrefix(s.webhookSecret, "whsec_") {
		problems = append(problems, errors.New("-webhook-secret: the webhook scenarios need the server's whsec_ secret (or TALLY_BENCH_WEBHOOK_SECRET)"))
	}
	if s.has(scenarioWebhookParked) && s.webhookType == "" {
		problems = append(problems, errors.New("-webhook-type: must not be empty"))
	}
	if s.has(scenarioWebhookCredited) {
		if s.db == "" {
			problems = append(problems, errors.New("-db: webhook-credited checks in the database that each payment was credited exactly once (or TALLY_BENCH_DATABASE_URL)"))
		}
		if s.pack == "" {
			problems = append(problems, errors.New("-pack: webhook-credited needs a credit pack of the catalog"))
		}
	}
	if s.payments < 0 {
		problems = append(problems, fmt.Errorf("-payments %d: must not be negative", s.payments))
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
	if s.usageBatch < 1 || s.usageBatch > maxUsageBatch {
		problems = append(problems, fmt.Errorf("-usage-batch %d: want 1 to %d", s.usageBatch, maxUsageBatch))
	}
	switch s.verify {
	case verifyAPI, verifyOff:
	case verifyDB:
		if s.db == "" {
			problems = append(problems, errors.New("-verify db: needs -db (or TALLY_BENCH_DATABASE_URL)"))
		}
	default:
		problems = append(problems, fmt.Errorf("-verify %q: want api, db or off", s.verify))
	}
	return errors.Join(problems...)
}

// validateSeed checks the flags of -seed mode, which needs only the
// database.
func (s settings) validateSeed() error {
	var problems []error
	if s.db == "" {
		problems = append(problems, errors.New("-seed: needs -db, the database the server uses (or TALLY_BENCH_DATABASE_URL)"))
	}
	if s.seedCustomers < 1 || s.seedCustomers > maxSeedCustomers {
		problems = append(problems, fmt.Errorf("-seed-customers %d: want 1 to %d", s.seedCustomers, maxSeedCustomers))
	}
	if s.seedLedger < 0 || s.seedUsage < 0 {
		problems = append(problems, fmt.Errorf("-seed-ledger %d, -seed-usage %d: must not be negative", s.seedLedger, s.seedUsage))
	}
	if s.seedCustomers > 0 && (s.seedLedger/int64(s.seedCustomers) > maxSeedPerCustomer || s.seedUsage/int64(s.seedCustomers) > maxSeedPerCustomer) {
		problems = append(problems, fmt.Errorf("-seed-ledger and -seed-usage: at most %d per customer; seed more customers", maxSeedPerCustomer))
	}
	if s.seedWorkers < 1 || s.seedWorkers > 64 {
		problems = append(problems, fmt.Errorf("-seed-workers %d: want 1 to 64", s.seedWorkers))
	}
	if s.meter == "" {
		problems = append(problems, errors.New("-meter: the seeded usage events need a meter"))
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
