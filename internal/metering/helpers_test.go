package metering_test

import (
	"context"
	"fmt"
	"net/url"
	"sync"
	"testing"
	"time"

	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/catalog"
	"github.com/tallybilling/tally/internal/config"
	"github.com/tallybilling/tally/internal/customers"
	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/db/dbtest"
	"github.com/tallybilling/tally/internal/metering"
	"github.com/tallybilling/tally/internal/stripeapi"
	"github.com/tallybilling/tally/internal/stripeapi/stripefake"
)

const (
	testMeter   = "api_calls"
	testMeterID = "mtr_api_calls"
	otherMeter  = "storage_gb"
	otherID     = "mtr_storage"
)

func testCatalog() catalog.Catalog {
	return catalog.Catalog{Plans: []catalog.Plan{
		{ID: "api", Name: "API usage", StripePrice: "price_api", Meter: testMeter, StripeMeterID: testMeterID},
		{ID: "storage", Name: "Storage", StripePrice: "price_storage", Meter: otherMeter, StripeMeterID: otherID},
	}}
}

// env is one database, one fake Stripe and a Service over them.
type env struct {
	db   *gorm.DB
	fake *stripefake.Fake
	svc  *metering.Service
}

func newEnv(t *testing.T) *env {
	t.Helper()
	gdb := dbtest.New(t)
	fake := stripefake.New(t)
	fake.SetMeter(testMeterID, testMeter)
	fake.SetMeter(otherID, otherMeter)
	return &env{db: gdb, fake: fake, svc: metering.New(metering.Options{DB: gdb, Stripe: newClient(t, fake, 0), Catalog: testCatalog()})}
}

// newClient is a real stripeapi client talking to the fake; timeout 0 is
// stripeapi's default.
func newClient(t *testing.T, fake *stripefake.Fake, timeout time.Duration) stripeapi.Client {
	t.Helper()
	c, err := stripeapi.New(stripeapi.Config{SecretKey: "sk_test_metering", APIURL: fake.URL(), Timeout: timeout, MaxNetworkRetries: -1})
	if err != nil {
		t.Fatalf("stripe client: %v", err)
	}
	return c
}

// fastConfig is the default delivery configuration (config.Default) made
// quick: short polls and backoff, a generous rate limit, larger batches.
func fastConfig() config.MeteringConfig {
	cfg := config.Default().Metering
	cfg.RateLimit = 2000
	cfg.BackoffMax = 100 * time.Millisecond
	cfg.BackoffBase = 5 * time.Millisecond
	cfg.SendTimeout = 5 * time.Second
	cfg.BatchSize = 200
	cfg.PollInterval = 10 * time.Millisecond
	return cfg
}

// workerOptions are a Worker's over e, with cfg and quick timings, sending
// to the fake through a client with stripeapi's default timeout.
func (e *env) workerOptions(t *testing.T, cfg config.MeteringConfig) metering.WorkerOptions {
	return metering.WorkerOptions{
		DB:     e.db,
		Stripe: newClient(t, e.fake, 0),
		Config: cfg,
		Logger: dbtest.Logger(t),
		// Workers that join others wait two heartbeats and about two
		// seconds before sending; keep the heartbeats short.
		HeartbeatInterval: 200 * time.Millisecond,
	}
}

// startWorker runs w until the test ends (or stop is called) and checks it
// returns nil.
func startWorker(t *testing.T, w *metering.Worker) (stop func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			select {
			case err := <-done:
				if err != nil {
					t.Errorf("worker returned %v", err)
				}
			case <-time.After(30 * time.Second):
				t.Errorf("worker did not stop within 30s")
			}
		})
	}
	t.Cleanup(stop)
	return stop
}

// link gives customer id the Stripe customer "cus_"+id.
func link(t *testing.T, gdb *gorm.DB, id string) string {
	t.Helper()
	stripeID := "cus_" + id
	_, _, err := customers.New(customers.Options{DB: gdb}).Upsert(context.Background(), customers.UpsertInput{ID: id, StripeCustomerID: &stripeID})
	if err != nil {
		t.Fatalf("link %s: %v", id, err)
	}
	return stripeID
}

func ev(customer, identifier string, value float64) metering.EventInput {
	return metering.EventInput{CustomerID: customer, Meter: testMeter, Value: value, Identifier: identifier}
}

func ingest(t *testing.T, svc *metering.Service, evs ...metering.EventInput) metering.IntakeResult {
	t.Helper()
	res, _, err := svc.Ingest(context.Background(), evs, db.IdempotencyKey{})
	if err != nil {
		t.Fatalf("ingest: %v", err)
	}
	return res
}

func countRows(t *testing.T, gdb *gorm.DB, where string, args ...any) int64 {
	t.Helper()
	var n int64
	if err := gdb.Raw(`SELECT count(*) FROM usage_events WHERE `+where, args...).Scan(&n).Error; err != nil {
		t.Fatalf("count: %v", err)
	}
	return n
}

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t *testing.T, what string, timeout time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// requestsPerIdentifier counts the v1 meter event requests the fake
// received for each identifier, whatever it answered.
func requestsPerIdentifier(t *testing.T, fake *stripefake.Fake) map[string]int {
	t.Helper()
	out := map[string]int{}
	for _, r := range fake.Requests() {
		if r.Path != "/v1/billing/meter_events" {
			continue
		}
		form, err := url.ParseQuery(r.Body)
		if err != nil {
			t.Fatalf("meter event request body: %v", err)
		}
		out[form.Get("identifier")]++
	}
	return out
}

// assertDeliveredOnce checks invariant 4 for ids: each stored once and
// delivered, accepted by Stripe exactly once, and Stripe holds nothing else.
func assertDeliveredOnce(t *testing.T, e *env, ids []string) {
	t.Helper()
	if n := countRows(t, e.db, `true`); n != int64(len(ids)) {
		t.Errorf("%d usage rows, want %d", n, len(ids))
	}
	if n := countRows(t, e.db, `status = 'delivered'`); n != int64(len(ids)) {
		t.Errorf("%d delivered rows, want %d", n, len(ids))
	}
	for _, id := range ids {
		if c := e.fake.Count(id); c != 1 {
			t.Errorf("identifier %s accepted %d times by Stripe, want 1", id, c)
		}
	}
	if got := len(e.fake.MeterEvents()); got != len(ids) {
		t.Errorf("Stripe holds %d meter events, want %d", got, len(ids))
	}
}

func ids(prefix string, n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = fmt.Sprintf("%s-%05d", prefix, i)
	}
	return out
}
