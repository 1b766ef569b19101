// Command tally-bench load-tests a running tally server over HTTP and, in the
// same run, a raw-SQL baseline of the consume debit on the same PostgreSQL,
// and prints throughput and p50/p95/p99 latency per scenario with the
// service-to-baseline ratios. Absolute numbers drift on shared machines; the
// ratios are what to compare between runs.
//
// It is measurement, not a test: it asserts nothing about speed. It exits 1
// when a scenario failed or had errors, or when the invariant check after the
// load found a problem, so that a broken run is never mistaken for a slow one.
//
//	make run                                  # in one shell
//	make bench BENCH_ARGS='-duration 10s'     # in another
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"
)

func main() {
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
			Customers: s.customers, Seed: s.seed, Meter: s.meter, UsageBatch: usageBatchSize, WebhookType: s.webhookType,
		},
	}
	switch {
	case s.db == "":
		rep.Settings.BaselineNote = "none (no -db): no ratios"
	case !s.has(scenarioConsumeMany) && !s.has(scenarioConsumeHot):
		rep.Settings.BaselineNote = "not run (no consume scenario selected)"
	}

	var base *baseline
	if s.db != "" && (s.has(scenarioConsumeMany) || s.has(scenarioConsumeHot)) {
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

	// Setup through the API, as a real caller would fund its customers.
	var setupMany, setupHot error
	if s.has(scenarioConsumeMany) || s.has(scenarioBalance) {
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

	measure := func(name, kind, what string, setupErr error, do op) scenarioResult {
		if setupErr != nil {
			progress("%s: skipped, setup failed", name)
			return failedScenario(name, kind, what, fmt.Errorf("setup: %w", setupErr))
		}
		progress("%s: %s warmup, then %s measured", name, s.warmup, s.duration)
		return newScenarioResult(name, kind, what, drive(ctx, time.Now, s.concurrency, s.warmup, s.duration, s.seed, do))
	}
	// consume measures a consume scenario right after its baseline, so the
	// two see the machine in as similar a state as possible.
	consume := func(name, what string, setupErr error, pick func(*worker) string) {
		var sql *scenarioResult
		if base != nil {
			r := measure("sql "+name, "sql", "the same debit as one pgx transaction: UPDATE ... SET balance = balance - 1 "+
				"WHERE customer_id = $1 AND balance >= 1 RETURNING balance; INSERT a ledger row; COMMIT", nil, base.consumeOp(pop, "sql-"+name, pick))
			rep.Scenarios = append(rep.Scenarios, r)
			sql = &r
		}
		r := measure(name, "http", what, setupErr, consumeOp(svc, pop, name, pick))
		if sql != nil {
			r.compare(*sql)
		}
		rep.Scenarios = append(rep.Scenarios, r)
	}

	perCustomer := fmt.Sprintf("one of %d customers at random", s.customers)
	for _, name := range allScenarios {
		if !s.has(name) || ctx.Err() != nil {
			continue
		}
		switch name {
		case scenarioConsumeMany:
			consume(name, "POST /v1/customers/{id}/credits/consume of 1 credit, a fresh Idempotency-Key each, "+perCustomer,
				setupMany, pop.pick)
		case scenarioConsumeHot:
			consume(name, "the same consume, every request on one customer (one contended balance)",
				setupHot, func(*worker) string { return pop.hot })
		case scenarioBalance:
			rep.Scenarios = append(rep.Scenarios, measure(name, "http",
				"GET /v1/customers/{id}/balance, "+perCustomer, setupMany, balanceOp(svc, pop)))
		case scenarioWebhook:
			rep.Scenarios = append(rep.Scenarios, measure(name, "http",
				"POST /webhooks/stripe: "+s.webhookType+" signed with the whsec_ secret, a fresh event id each; "+
					"the object is a PaymentIntent naming a tally payment that does not exist", nil,
				webhookOp(svc, pop, s.webhookSecret, s.webhookType)))
		case scenarioUsage:
			rep.Scenarios = append(rep.Scenarios, measure(name, "http",
				fmt.Sprintf("POST /v1/usage-events, %d events of meter %q per request (events/s = %d x req/s), fresh identifiers, %s",
					usageBatchSize, s.meter, usageBatchSize, perCustomer), nil, usageOp(svc, pop, s.meter)))
		}
	}
	if ctx.Err() != nil {
		return fmt.Errorf("interrupted: %w", ctx.Err())
	}

	rep.Verify = verify(ctx, svc, s.adminKey)
	if s.json {
		err = rep.writeJSON(stdout)
	} else {
		err = rep.writeText(stdout)
	}
	if err != nil {
		return err
	}
	for _, sc := range rep.Scenarios {
		if sc.Status != statusOK {
			return errNotClean
		}
	}
	if s.adminKey != "" && !rep.Verify.OK {
		return errNotClean
	}
	return nil
}

// verify asks the server to check its invariants after the load: fast
// numbers from a service that lost a credit are worth nothing.
func verify(ctx context.Context, svc *service, adminKey string) verifyReport {
	if adminKey == "" {
		return verifyReport{Summary: "not run (no -admin-key)"}
	}
	var got struct {
		OK               bool  `json:"ok"`
		CustomersChecked int64 `json:"customers_checked"`
		PaymentsChecked  int64 `json:"payments_checked"`
		Problems         []any `json:"problems"`
	}
	admin := &service{base: svc.base, key: adminKey, client: svc.client}
	out := admin.do(ctx, request{
		method:  http.MethodGet,
		path:    "/v1/admin/verify",
		want:    http.StatusOK,
		timeout: 5 * time.Minute,
		decode: func(body []byte) outcome {
			if err := json.Unmarshal(body, &got); err != nil {
				return outcome{errLabel: "bad 200 body", errDetail: snippet(body)}
			}
			return outcome{ok: true}
		},
	})
	if err := out.failure("GET /v1/admin/verify"); err != nil {
		return verifyReport{Summary: "could not run: " + err.Error()}
	}
	r := verifyReport{Checked: true, OK: got.OK, Problems: got.Problems}
	if got.OK {
		r.Summary = fmt.Sprintf("ok (%d customers, %d payments checked)", got.CustomersChecked, got.PaymentsChecked)
	} else {
		r.Summary = fmt.Sprintf("FAILED: %d problems (%d customers, %d payments checked)", len(got.Problems), got.CustomersChecked, got.PaymentsChecked)
	}
	return r
}
