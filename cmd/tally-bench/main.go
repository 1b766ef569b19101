// Command tally-bench load-tests a running tally server over HTTP and, in the
// same run, raw-SQL baselines of the consume debit and of the balance read on
// the same PostgreSQL, and prints throughput and p50/p95/p99 latency per
// scenario, the service-to-baseline ratios, a PASS/MISS line per performance
// target (targets.go) and the invariant check run after the load. Absolute
// numbers drift on shared machines; the ratios are what to compare between
// runs.
//
// It is measurement, not a test: it asserts nothing about speed. It exits 1
// when a scenario failed or had errors, or when the invariant check after the
// load found a problem or could not run, so that a broken run is never
// mistaken for a slow one. A missed target is reported, not an exit status.
//
// With -seed it loads a large data set into the server's database instead
// (seed.go), so that a later run shows whether costs grow with the data.
//
//	make run                                  # in one shell
//	make bench BENCH_ARGS='-duration 10s'     # in another
//	make bench-seed                           # once, for the large-database run
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"os/signal"
	"runtime/debug"
	"runtime/pprof"
	"strconv"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/tallybilling/tally/internal/db"
)

func main() {
	// The tool shares the machine with the server and PostgreSQL it
	// measures, so its own garbage collection is CPU they do not get. Its
	// heap is small (the latencies of one scenario at a time): collect at
	// five times the live heap rather than twice, unless GOGC says.
	if os.Getenv("GOGC") == "" {
		debug.SetGCPercent(400)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Getenv, os.Stdout, os.Stderr)
	stop()
	switch {
	case err == nil:
	case errors.Is(err, flag.ErrHelp):
	case errors.Is(err, errNotClean):
		os.Exit(1)
	default:
		fmt.Fprintln(os.Stderr, "tally-bench:", err)
		os.Exit(2)
	}
}

// errNotClean reports a run that completed but where something failed; the
// report has the details.
var errNotClean = errors.New("some scenarios failed or had errors")

func run(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	s, err := parseSettings(args, getenv, stderr)
	if err != nil {
		return err
	}
	progress := func(format string, a ...any) { fmt.Fprintf(stderr, "tally-bench: "+format+"\n", a...) }
	if s.cpuProfile != "" {
		stopProfile, err := startCPUProfile(s.cpuProfile)
		if err != nil {
			return err
		}
		defer func() {
			if err := stopProfile(); err != nil {
				progress("%v", err)
			}
		}()
	}
	if s.seed {
		return runSeed(ctx, s, stdout, progress)
	}

	runID := strconv.FormatInt(time.Now().UnixNano(), 36)
	pop := newPopulation(runID, s.customers)
	svc := newService(s.url, s.key, s.concurrency)
	if err := svc.do(ctx, request{method: http.MethodGet, path: "/healthz", noAuth: true, want: http.StatusOK}).failure("GET /healthz"); err != nil {
		return fmt.Errorf("no tally server answering at %s (start one with `make run`): %w", s.url, err)
	}

	rep := report{
		Machine: describeMachine(s.url, time.Now()),
		Settings: runSettings{
			RunID: runID, Concurrency: s.concurrency, DurationSec: s.duration.Seconds(), WarmupSec: s.warmup.Seconds(),
			Customers: s.customers, RandSeed: s.randSeed, Meter: s.meter, UsageBatch: s.usageBatch, Verify: s.verify,
		},
	}
	if s.has(scenarioWebhookParked) {
		rep.Settings.WebhookType = s.webhookType
	}
	withBaseline := s.has(scenarioConsumeMany) || s.has(scenarioConsumeHot) || s.has(scenarioBalance)
	switch {
	case s.db == "":
		rep.Settings.BaselineNote = "none (no -db): no ratios"
	case !withBaseline:
		rep.Settings.BaselineNote = "not run (no scenario with a baseline selected)"
	}

	var base *baseline
	if s.db != "" && withBaseline {
		base, err = openBaseline(ctx, s.db, runID, s.concurrency)
		if err != nil {
			return err
		}
		defer func() {
			if err := base.close(); err != nil {
				progress("%v", err)
			}
		}()
		if err := base.fund(ctx, append([]string{pop.hot}, pop.customers...), grantPerCustomer); err != nil {
			return err
		}
		rep.Settings.BaselineNote = "raw SQL through pgx on " + redactURL(s.db) + ", scratch schema tally_bench_" + runID + " (dropped afterwards)"
	}
	var pool *pgxpool.Pool // webhook-credited's payments and checks
	if s.has(scenarioWebhookCredited) {
		if pool, err = openPool(ctx, s.db, 4); err != nil {
			return err
		}
		defer pool.Close()
	}

	// Setup through the API, as a real caller would fund its customers.
	var setupMany, setupHot error
	if s.has(scenarioConsumeMany) || s.has(scenarioBalance) || s.has(scenarioWebhookCredited) || s.has(scenarioUsage) || s.has(scenarioHoldCapture) {
		progress("setup: granting %d credits to each of %d customers", grantPerCustomer, s.customers)
		setupMany = grant(ctx, svc, runID, pop.customers, grantPerCustomer, s.concurrency)
	}
	if s.has(scenarioConsumeHot) {
		progress("setup: granting %d credits to the hot customer", grantHot)
		setupHot = grant(ctx, svc, runID, []string{pop.hot}, grantHot, 1)
	}
	if ctx.Err() != nil {
		return ctx.Err()
	}

	probe := newCPUProbe("/proc", s.cpu)
	measure := func(name, kind, what string, setupErr error, do op) scenarioResult {
		if setupErr != nil {
			progress("%s: skipped, setup failed", name)
			return failedScenario(name, kind, what, fmt.Errorf("setup: %w", setupErr))
		}
		progress("%s: %s warmup, then %s measured", name, s.warmup, s.duration)
		return newScenarioResult(name, kind, what, drive(ctx, time.Now, s.concurrency, s.warmup, s.duration, s.randSeed, probe, do))
	}
	// paired measures a scenario right after its baseline, so the two see
	// the machine in as similar a state as possible.
	paired := func(name, what string, setupErr error, do op, sqlWhat string, sqlDo func() op) {
		var sql *scenarioResult
		if base != nil {
			r := measure("sql "+name, "sql", sqlWhat, nil, sqlDo())
			rep.Scenarios = append(rep.Scenarios, r)
			sql = &r
		}
		r := measure(name, "http", what, setupErr, do)
		if sql != nil {
			r.compare(*sql)
		}
		rep.Scenarios = append(rep.Scenarios, r)
	}
	const sqlDebit = "the same debit as one pgx transaction: UPDATE ... SET balance = balance - 1 " +
		"WHERE customer_id = $1 AND balance >= 1 RETURNING balance; INSERT a ledger row; COMMIT"

	perCustomer := fmt.Sprintf("one of %d customers at random", s.customers)
	for _, name := range allScenarios {
		if !s.has(name) || ctx.Err() != nil {
			continue
		}
		switch name {
		case scenarioConsumeMany:
			paired(name, "POST /v1/customers/{id}/credits/consume of 1 credit, a fresh Idempotency-Key each, "+perCustomer,
				setupMany, consumeOp(svc, pop, name, pop.pick),
				sqlDebit, func() op { return base.consumeOp(pop, "sql-"+name, pop.pick) })
		case scenarioConsumeHot:
			hot := func(*worker) string { return pop.hot }
			paired(name, "the same consume, every request on one customer (one contended balance)",
				setupHot, consumeOp(svc, pop, name, hot),
				sqlDebit, func() op { return base.consumeOp(pop, "sql-"+name, hot) })
		case scenarioBalance:
			paired(name, "GET /v1/customers/{id}/balance, "+perCustomer, setupMany, balanceOp(svc, pop),
				"a primary-key SELECT of the balance row through pgx, "+perCustomer, func() op { return base.balanceOp(pop) })
		case scenarioHTTPFloor:
			// No database, no authentication, no body to speak of: what one
			// HTTP round trip costs the tool, the server and the kernel
			// between them. No endpoint can be faster, so its ratio to sql
			// balance is the ceiling of balance's.
			r := measure(name, "http", "GET /healthz: an HTTP round trip that does no work (the ceiling of any endpoint "+
				"on this machine; its ratio is to sql balance of this run)", nil, floorOp(svc))
			if sql := rep.find("sql " + scenarioBalance); sql != nil {
				r.compare(*sql)
			}
			rep.Scenarios = append(rep.Scenarios, r)
		case scenarioWebhookCredited:
			rep.Scenarios = append(rep.Scenarios, measureWebhookCredited(ctx, s, svc, pool, pop, runID, setupMany, progress))
		case scenarioUsage:
			r := measure(name, "http", fmt.Sprintf("POST /v1/usage-events, %d events of meter %q per request, fresh identifiers, %s",
				s.usageBatch, s.meter, perCustomer), setupMany, usageOp(svc, pop, s.meter, s.usageBatch))
			r.Rate, r.RateUnit = float64(r.OK)*float64(s.usageBatch)/s.duration.Seconds(), unitEvents
			rep.Scenarios = append(rep.Scenarios, r)
		case scenarioHoldCapture:
			what := fmt.Sprintf("POST /v1/customers/{id}/credits/holds of %d credits, then POST .../holds/{hold_id}/capture of %d "+
				"(the rest released), each with a fresh Idempotency-Key, %s; one operation is both", holdAmount, captureAmount, perCustomer)
			if setupMany != nil {
				rep.Scenarios = append(rep.Scenarios, failedScenario(name, "http", what, fmt.Errorf("setup: %w", setupMany)))
				continue
			}
			available, why, err := probeHolds(ctx, svc, pop.customers[0], runID)
			switch {
			case err != nil:
				rep.Scenarios = append(rep.Scenarios, failedScenario(name, "http", what, err))
			case !available:
				progress("%s: skipped: %s", name, why)
				rep.Scenarios = append(rep.Scenarios, skippedScenario(name, what, why))
			default:
				// Its baseline is what a hold and its capture write at the
				// least: two debits, each its own transaction.
				paired(name, what, nil, holdCaptureOp(svc, pop), "two of the sql consume-many debits in a row ("+sqlDebit+"), "+perCustomer,
					func() op {
						return inTurn(base.consumeOp(pop, "sql-"+name+"-hold", pop.pick), base.consumeOp(pop, "sql-"+name+"-capture", pop.pick))
					})
			}
		case scenarioWebhookParked:
			rep.Scenarios = append(rep.Scenarios, measure(name, "http",
				"POST /webhooks/stripe: "+s.webhookType+" signed with the whsec_ secret, a fresh event id each; "+
					"the object is a PaymentIntent naming a tally payment that does not exist, so every event is parked", nil,
				webhookParkedOp(svc, pop, s.webhookSecret, s.webhookType)))
		}
	}
	if ctx.Err() != nil {
		return fmt.Errorf("interrupted: %w", ctx.Err())
	}

	progress("verify: checking the invariants after the load (%s)", s.verify)
	var verifyRequested bool
	rep.Verify, verifyRequested = verifyAfterLoad(ctx, s, svc)
	rep.Targets = judgeTargets(rep.Scenarios, s.concurrency)
	for i := range rep.Scenarios {
		rep.Scenarios[i].cpuPerOp(s.duration)
	}
	rep.Machine.LoadAvgEnd = loadAverage("/proc/loadavg")
	if s.json {
		err = rep.writeJSON(stdout)
	} else {
		err = rep.writeText(stdout)
	}
	if err != nil {
		return err
	}
	for _, sc := range rep.Scenarios {
		if sc.Status != statusOK && sc.Status != statusSkipped {
			return errNotClean
		}
	}
	if verifyRequested && !rep.Verify.OK {
		return errNotClean
	}
	return nil
}

// measureWebhookCredited prepares pending payments, credits them through
// signed webhooks under load and checks each was credited exactly once
// (webhook.go).
func measureWebhookCredited(ctx context.Context, s settings, svc *service, pool *pgxpool.Pool, pop population, runID string,
	setupErr error, progress func(string, ...any)) scenarioResult {
	const name = scenarioWebhookCredited
	what := fmt.Sprintf("POST /webhooks/stripe per pending payment: a signed checkout.session.completed linking its PaymentIntent, "+
		"then a signed payment_intent.succeeded with the payment's amount, currency, livemode and metadata; each delivery "+
		"sent twice at once with odds 1 in %d (copies are 20%% of deliveries); one operation is one payment; credited = "+
		"succeeded with one purchase grant of its credits and one confirmation, checked in the database after the run, "+
		"where payments not driven must be untouched", duplicateOdds)
	if setupErr != nil {
		return failedScenario(name, "http", what, fmt.Errorf("setup: %w", setupErr))
	}
	pk, err := catalogPack(ctx, svc, s.pack)
	if err != nil {
		return failedScenario(name, "http", what, fmt.Errorf("setup: %w", err))
	}
	n := s.paymentsToPrepare()
	progress("%s: setup: %d pending payments of %s", name, n, pk.ID)
	started := time.Now()
	prep, err := preparePayments(ctx, svc, pool, runID, pop.customers, n, pk, s.concurrency)
	if err != nil {
		return failedScenario(name, "http", what, fmt.Errorf("setup: %w", err))
	}
	progress("%s: setup took %s: %s", name, time.Since(started).Round(time.Millisecond), prep.note)
	what += "; " + prep.note

	cr := newCreditRun(svc, s.webhookSecret, prep.payments, s.concurrency)
	progress("%s: %s warmup, then %s measured", name, s.warmup, s.duration)
	lr := drive(ctx, time.Now, s.concurrency, s.warmup, s.duration, s.randSeed, newCPUProbe("/proc", s.cpu), cr.op)
	chk, err := cr.check(ctx, pool, settleTimeout)
	if err != nil {
		return failedScenario(name, "http", what, fmt.Errorf("exactly-once check: %w", err))
	}
	for label, count := range chk.failures {
		key := "check: " + label
		lr.errors[key] += count
		if _, ok := lr.examples[key]; !ok {
			lr.examples[key] = chk.examples[label]
		}
	}
	r := newScenarioResult(name, "http", what, lr)
	r.Rate, r.RateUnit = float64(chk.credited)/s.duration.Seconds(), unitCredited
	return r
}

// runSeed is -seed mode: load the data set and say how long it took.
func runSeed(ctx context.Context, s settings, stdout io.Writer, progress func(string, ...any)) error {
	gdb, err := db.Open(ctx, s.db, 1, slog.New(slog.DiscardHandler))
	if err != nil {
		return fmt.Errorf("-db: %w", err)
	}
	current, err := db.MigrationsCurrent(ctx, gdb)
	_ = db.Close(gdb)
	if err != nil {
		return fmt.Errorf("-db: %w", err)
	}
	if !current {
		return fmt.Errorf("the database %s is not migrated to this tree's schema: start the server on it once (make run migrates it)", redactURL(s.db))
	}
	pool, err := openPool(ctx, s.db, s.seedWorkers)
	if err != nil {
		return err
	}
	defer pool.Close()
	plan := seedPlan{customers: s.seedCustomers, ledger: s.seedLedger, usage: s.seedUsage, meter: s.meter, workers: s.seedWorkers}
	progress("seed: %d customers, %d ledger entries, %d usage events into %s, %d customers a transaction on %d connections",
		plan.customers, plan.ledger, plan.usage, redactURL(s.db), seedChunk, plan.workers)
	res, err := seed(ctx, pool, plan, time.Now(), progress)
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "seeded %s: %d customers, %d ledger entries and %d usage events loaded in %s, then VACUUM ANALYZE in %s",
		redactURL(s.db), res.customers, res.ledger, res.usage, res.load.Round(time.Millisecond), res.analyze.Round(time.Millisecond))
	if res.skipped > 0 {
		fmt.Fprintf(stdout, " (%d of %d chunks of %d customers were loaded already)", res.skipped, res.chunks, seedChunk)
	}
	fmt.Fprintf(stdout, "\nseeded ids start with %q; the scenarios' own customers start with \"bench-\"\n", seedPrefix)
	return nil
}

// startCPUProfile writes this process's CPU profile to path until the
// returned function is called: what the load generator itself spends,
// which the server and PostgreSQL under test do not get on a shared machine.
func startCPUProfile(path string) (stop func() error, err error) {
	f, err := os.Create(path)
	if err != nil {
		return nil, fmt.Errorf("-cpuprofile: %w", err)
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		f.Close()
		return nil, fmt.Errorf("-cpuprofile: %w", err)
	}
	return func() error {
		pprof.StopCPUProfile()
		if err := f.Close(); err != nil {
			return fmt.Errorf("-cpuprofile: %w", err)
		}
		return nil
	}, nil
}

// benchAppName is the application_name of the tool's connections.
const benchAppName = "tally-bench"

// openPool connects to dbURL with at most conns connections.
func openPool(ctx context.Context, dbURL string, conns int) (*pgxpool.Pool, error) {
	cfg, err := pgxpool.ParseConfig(dbURL)
	if err != nil {
		return nil, fmt.Errorf("-db: %w", err)
	}
	cfg.MaxConns = int32(conns)
	// Named, so that -seed can tell its own connections from a server's.
	cfg.ConnConfig.RuntimeParams["application_name"] = benchAppName
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("-db: %w", err)
	}
	if err := pool.Ping(ctx); err != nil {
		pool.Close()
		return nil, fmt.Errorf("-db %s: %w", redactURL(dbURL), err)
	}
	return pool, nil
}
