package metering_test

import (
	"context"
	"math"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/tallybilling/tally/internal/metering"
)

// simClock is a clock a test moves by hand.
type simClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *simClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *simClock) Add(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

func (c *simClock) Set(t time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = t
}

// A Stripe outage of two simulated days, answering 500 and, for a while,
// hanging past the client's timeout while it keeps the events: delivery
// retries by time, not count, far past the old ten attempts, with the
// backoff capped; the event whose timestamp leaves Stripe's window is
// dead-lettered too_old; once Stripe is back the backlog drains, each event
// accepted by Stripe exactly once.
func TestLongOutageRetriesByTimeUntilStripesWindowEnds(t *testing.T) {
	t.Parallel()
	if testing.Short() {
		t.Skip("slow: many rounds or real seconds of pacing (skipped by -short; make test runs it)")
	}
	e := newEnv(t)
	ctx := context.Background()
	clock := &simClock{t: time.Now()}
	svc := metering.New(metering.Options{DB: e.db, Stripe: newClient(t, e.fake, 0), Catalog: testCatalog(), Now: clock.Now})
	link(t, e.db, "vic")
	t0 := clock.Now()
	// "edge" is six hours from the end of the window Stripe accepts.
	edge := t0.Add(-metering.MaxAge + 7*time.Hour)
	ingest(t, svc,
		metering.EventInput{CustomerID: "vic", Meter: testMeter, Value: 3, Identifier: "long-1", Timestamp: new(t0.Add(-time.Hour))},
		metering.EventInput{CustomerID: "vic", Meter: testMeter, Value: 4, Identifier: "long-2", Timestamp: new(t0.Add(-2 * time.Hour))},
		metering.EventInput{CustomerID: "vic", Meter: testMeter, Value: 5, Identifier: "edge", Timestamp: &edge},
	)

	const backoffMax = 10 * time.Minute
	cfg := fastConfig()
	cfg.BackoffMax = backoffMax
	opts := e.workerOptions(t, cfg)
	opts.Now = clock.Now
	opts.Config.SendTimeout = 2 * time.Second
	opts.Stripe = newClient(t, e.fake, 150*time.Millisecond)
	w := metering.NewWorker(opts)

	fail500 := func(r *http.Request) (int, string, bool) {
		return http.StatusInternalServerError, `{"error":{"type":"api_error","message":"Stripe is down."}}`, true
	}
	step := func(d time.Duration) {
		t.Helper()
		clock.Add(d)
		if _, err := w.RunOnce(ctx); err != nil {
			t.Fatal(err)
		}
		var far int64
		e.db.Raw(`SELECT count(*) FROM usage_events WHERE status = 'pending' AND claimed_by IS NULL AND next_attempt_at > ?`,
			clock.Now().Add(backoffMax)).Scan(&far)
		if far > 0 {
			t.Fatalf("%d events scheduled more than %s ahead: the backoff is not capped", far, backoffMax)
		}
	}

	// Day one: 500s.
	e.fake.SetFault(fail500)
	for range 24 * 12 {
		step(5 * time.Minute)
	}
	// Stripe keeps the events but the answers never arrive in time.
	e.fake.SetFault(nil)
	e.fake.SetHang(400 * time.Millisecond)
	for range 3 {
		step(15 * time.Minute)
	}
	time.Sleep(500 * time.Millisecond) // let the hung requests be processed
	e.fake.SetHang(0)
	// Day two: 500s again.
	e.fake.SetFault(fail500)
	for range 24 * 12 {
		step(5 * time.Minute)
	}

	for _, id := range []string{"long-1", "long-2"} {
		got, err := svc.Get(ctx, id)
		if err != nil {
			t.Fatal(err)
		}
		if got.Status != metering.StatusPending || got.Attempts < 150 {
			t.Errorf("%s after two days of outage: %s after %d attempts, want still pending after well over 10 attempts", id, got.Status, got.Attempts)
		}
	}
	edgeEv, err := svc.Get(ctx, "edge")
	if err != nil {
		t.Fatal(err)
	}
	if edgeEv.Status != metering.StatusDead || edgeEv.DeadCode != metering.DeadTooOld {
		t.Errorf("edge event: %s (%q) %q, want dead too_old once its timestamp left Stripe's window", edgeEv.Status, edgeEv.DeadCode, edgeEv.LastError)
	}
	var deadEvents int64
	e.db.Raw(`SELECT count(*) FROM events WHERE type = 'usage.dead' AND data->>'identifier' = 'edge' AND data->>'code' = 'too_old'`).Scan(&deadEvents)
	if deadEvents != 1 {
		t.Errorf("%d usage.dead events with code too_old for edge, want 1", deadEvents)
	}

	// Stripe recovers: the backlog drains; what Stripe kept during the
	// hang is recognised as a duplicate, not sent under another identifier.
	e.fake.SetFault(nil)
	for range 5 {
		step(backoffMax)
	}
	for _, id := range []string{"long-1", "long-2"} {
		got, _ := svc.Get(ctx, id)
		if got.Status != metering.StatusDelivered {
			t.Errorf("%s after Stripe recovered: %s, want delivered", id, got.Status)
		}
		if c := e.fake.Count(id); c != 1 {
			t.Errorf("%s accepted %d times by Stripe, want 1", id, c)
		}
	}
	if c := e.fake.Count("edge"); c != 0 {
		t.Errorf("the too_old event reached Stripe %d times", c)
	}
	if got := len(e.fake.MeterEvents()); got != 2 {
		t.Errorf("Stripe holds %d meter events, want 2", got)
	}
}

// A send whose answer was lost, not confirmed since, is gauged from that
// first send, so that an alert can fire before Stripe's 24 hours of
// deduplication run out and a resend could count the event twice; its
// confirmation (Stripe's "already exists") takes it off.
func TestUnconfirmedSendsAreGaugedFromTheFirstLostAnswer(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ctx := context.Background()
	clock := &simClock{t: time.Now()}
	svc := metering.New(metering.Options{DB: e.db, Stripe: newClient(t, e.fake, 0), Catalog: testCatalog(), Now: clock.Now})
	link(t, e.db, "una")
	ingest(t, svc, metering.EventInput{CustomerID: "una", Meter: testMeter, Value: 7, Identifier: "lost-answer", Timestamp: new(clock.Now().Add(-time.Minute))})
	opts := e.workerOptions(t, fastConfig())
	opts.Now = clock.Now
	reg := prometheus.NewRegistry()
	opts.Registry = reg
	w := metering.NewWorker(opts)
	run := func() {
		t.Helper()
		if _, err := w.RunOnce(ctx); err != nil {
			t.Fatal(err)
		}
	}
	unconfirmed := func() float64 { return gauge(t, reg, "tally_usage_events_unconfirmed_oldest_seconds") }

	// Stripe keeps the event and the answer is lost; then Stripe is down.
	e.fake.DropAnswers(func(*http.Request) bool { return true })
	run()
	e.fake.DropAnswers(nil)
	if got, _ := svc.Get(ctx, "lost-answer"); got.Status != metering.StatusPending || got.MaybeSentAt == nil {
		t.Fatalf("after a lost answer: %+v, want pending and maybe sent", got)
	}
	e.fake.SetFault(func(*http.Request) (int, string, bool) {
		return http.StatusBadGateway, `{"error":{"type":"api_error","message":"down"}}`, true
	})
	for range 3 {
		clock.Add(7 * time.Hour)
		run()
	}
	if got := unconfirmed(); math.Abs(got-(21*time.Hour).Seconds()) > 1 {
		t.Errorf("unconfirmed for %vs, want 21 hours: from the first lost answer, not the last retry", got)
	}
	e.fake.SetFault(nil)
	clock.Add(time.Hour)
	run()
	if got, _ := svc.Get(ctx, "lost-answer"); got.Status != metering.StatusDelivered {
		t.Fatalf("once Stripe answers: %s, want delivered", got.Status)
	}
	clock.Add(2 * time.Second) // the gauges are recounted at most once a second
	run()
	if got := unconfirmed(); got != 0 {
		t.Errorf("unconfirmed gauge %v once delivered, want 0", got)
	}
	if n := len(e.fake.MeterEvents()); n != 1 {
		t.Errorf("Stripe holds %d meter events, want 1", n)
	}
}

// Events of a customer without a Stripe customer wait, visibly: a gauge
// counts them and another gives the age of the oldest timestamp, for an
// alert long before the event leaves Stripe's window. One that does leave
// it is dead-lettered too_old, and reported as such.
func TestWaitingEventsAreGaugedAndExpireTooOld(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ctx := context.Background()
	t0 := time.Now()
	clock := &simClock{t: t0}
	svc := metering.New(metering.Options{DB: e.db, Stripe: newClient(t, e.fake, 0), Catalog: testCatalog(), Now: clock.Now})
	ingest(t, svc,
		metering.EventInput{CustomerID: "wes", Meter: testMeter, Value: 1, Identifier: "wait-old", Timestamp: new(t0.Add(-30 * 24 * time.Hour))},
		metering.EventInput{CustomerID: "wes", Meter: testMeter, Value: 2, Identifier: "wait-new", Timestamp: new(t0.Add(-time.Hour))},
	)
	opts := e.workerOptions(t, fastConfig())
	opts.Now = clock.Now
	reg := prometheus.NewRegistry()
	opts.Registry = reg
	w := metering.NewWorker(opts)
	if _, err := w.RunOnce(ctx); err != nil {
		t.Fatal(err)
	}
	if got := gauge(t, reg, "tally_usage_events_waiting_customer"); got != 2 {
		t.Errorf("waiting gauge %v, want 2", got)
	}
	if got := gauge(t, reg, "tally_usage_events_waiting_customer_oldest_seconds"); math.Abs(got-(30*24*time.Hour).Seconds()) > 1 {
		t.Errorf("oldest waiting %vs, want 30 days", got)
	}

	clock.Add(5 * 24 * time.Hour)
	if _, err := w.RunOnce(ctx); err != nil {
		t.Fatal(err)
	}
	old, _ := svc.Get(ctx, "wait-old")
	if old.Status != metering.StatusDead || old.DeadCode != metering.DeadTooOld || !strings.Contains(old.LastError, "too_old") {
		t.Errorf("wait-old after its timestamp left Stripe's window: %+v, want dead too_old", old)
	}
	if got, _ := svc.Get(ctx, "wait-new"); got.Status != metering.StatusWaitingCustomer {
		t.Errorf("wait-new: %s, want still waiting", got.Status)
	}
	if got := gauge(t, reg, "tally_usage_events_waiting_customer"); got != 1 {
		t.Errorf("waiting gauge %v, want 1", got)
	}
	if got := gauge(t, reg, "tally_usage_events_waiting_customer_oldest_seconds"); math.Abs(got-(5*24*time.Hour+time.Hour).Seconds()) > 1 {
		t.Errorf("oldest waiting %vs, want 5 days and an hour", got)
	}
	var dead int64
	e.db.Raw(`SELECT count(*) FROM events WHERE type = 'usage.dead' AND data->>'identifier' = 'wait-old' AND data->>'code' = 'too_old'`).Scan(&dead)
	if dead != 1 {
		t.Errorf("%d usage.dead events for wait-old with code too_old, want 1", dead)
	}
	if len(e.fake.Requests()) != 0 {
		t.Errorf("Stripe was called for a customer without a Stripe customer")
	}
}
