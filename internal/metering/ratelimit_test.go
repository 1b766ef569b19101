package metering_test

import (
	"fmt"
	"math"
	"net/http"
	"slices"
	"sync"
	"testing"
	"time"

	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/metering"
	"github.com/tallybilling/tally/internal/stripeapi"
	"github.com/tallybilling/tally/internal/stripeapi/stripefake"
)

// newKeyedClient is newClient with its own secret key, so the fake's fault
// hook can tell which worker sent a request.
func newKeyedClient(t *testing.T, fake *stripefake.Fake, key string) stripeapi.Client {
	t.Helper()
	c, err := stripeapi.New(stripeapi.Config{SecretKey: key, APIURL: fake.URL(), MaxNetworkRetries: -1})
	if err != nil {
		t.Fatalf("stripe client: %v", err)
	}
	return c
}

// Three instances on one database share TALLY_METER_RATE_LIMIT: Stripe
// never sees more than the limit within one second, also while instances
// join one after the other, and every event arrives exactly once.
//
// The rate limit tests run alone (not parallel): their workers' heartbeats
// are short, and beside the package's parallel tests on a loaded machine
// they timed out waiting for the delivery and for a crashed worker to count.
func TestRateLimitHoldsAcrossInstances(t *testing.T) {
	if testing.Short() {
		t.Skip("slow: many rounds or real seconds of pacing (skipped by -short; make test runs it)")
	}
	e := newEnv(t)
	const customers = 30
	for c := range customers {
		link(t, e.db, fmt.Sprintf("shared-%02d", c))
	}
	all := ids("shared", 300)
	var evs []metering.EventInput
	for i, id := range all {
		evs = append(evs, ev(fmt.Sprintf("shared-%02d", i%customers), id, 1))
	}
	ingest(t, e.svc, evs...)

	var mu sync.Mutex
	sentBy := map[string]int{}
	e.fake.SetFault(func(r *http.Request) (int, string, bool) {
		if r.URL.Path == "/v1/billing/meter_events" {
			mu.Lock()
			sentBy[r.Header.Get("Authorization")]++
			mu.Unlock()
		}
		return 0, "", false
	})

	const limit = 20
	cfg := fastConfig()
	cfg.RateLimit, cfg.BatchSize = limit, 40
	for i := range 3 {
		if i > 0 {
			time.Sleep(time.Second) // join while the others are sending
		}
		opts := e.workerOptions(t, cfg)
		opts.Name = fmt.Sprintf("instance-%d", i)
		opts.Stripe = newKeyedClient(t, e.fake, fmt.Sprintf("sk_test_instance_%d", i))
		startWorker(t, metering.NewWorker(opts))
	}
	waitFor(t, "every event delivered", 2*time.Minute, func() bool {
		return countRows(t, e.db, `status = 'delivered'`) == int64(len(all))
	})
	assertDeliveredOnce(t, e, all)
	for id, n := range requestsPerIdentifier(t, e.fake) {
		if n != 1 {
			t.Errorf("%s sent %d times, want once", id, n)
		}
	}
	mu.Lock()
	if len(sentBy) != 3 {
		t.Errorf("requests came from %d instances, want all 3 sending: %v", len(sentBy), sentBy)
	}
	t.Logf("requests per instance: %v", sentBy)
	mu.Unlock()
	assertPaced(t, e.fake, 3, limit)
}

// assertPaced checks the meter event requests the fake received against
// what pacing guarantees, not against what a quiet machine happens to
// show. Each of the instances paces its requests as a GCRA with a burst of
// one at share/(1s+JitterMargin) (paced), and the shares add up to the
// limit (share.go). A GCRA with burst b and rate r lets at most b + r·W
// requests leave within any window of W. Requests that arrive within W
// left within W plus the spread of their transit times, which pacing
// leaves JitterMargin for. So within any window of W at most
//
//	instances·1 + limit·(W+JitterMargin)/(1s+JitterMargin)
//
// arrive: the limit plus one per instance for one second, and less than
// the limit per second over longer windows, where a limiter that let each
// of three instances take the whole limit would show three times it.
func assertPaced(t *testing.T, fake *stripefake.Fake, instances int, limit float64) {
	t.Helper()
	var arrivals []time.Time
	for _, r := range fake.Requests() {
		if r.Path == "/v1/billing/meter_events" {
			arrivals = append(arrivals, r.Time)
		}
	}
	const burst = 1
	for _, window := range []time.Duration{time.Second, 3 * time.Second} {
		bound := instances*burst + int(math.Floor(limit*float64(window+metering.JitterMargin)/float64(time.Second+metering.JitterMargin)))
		got := maxWithin(arrivals, window)
		t.Logf("Stripe saw at most %d meter event requests within %s (%d instances, limit %v/s; pacing allows %d)", got, window, instances, limit, bound)
		if got > bound {
			t.Errorf("Stripe saw %d meter event requests within %s from %d instances; pacing at a limit of %v/s allows at most %d",
				got, window, instances, limit, bound)
		}
	}
}

// maxWithin is the largest number of times that fall within any window of
// the given length.
func maxWithin(times []time.Time, window time.Duration) int {
	times = slices.Clone(times)
	slices.SortFunc(times, time.Time.Compare)
	best, lo := 0, 0
	for hi := range times {
		for times[hi].Sub(times[lo]) >= window {
			lo++
		}
		best = max(best, hi-lo+1)
	}
	return best
}

func liveRows(t *testing.T, gdb *gorm.DB) []string {
	t.Helper()
	var out []string
	if err := gdb.Raw(`SELECT id FROM meter_workers ORDER BY id`).Scan(&out).Error; err != nil {
		t.Fatalf("meter_workers: %v", err)
	}
	return out
}

// A worker that stops deletes its row, and the others take over its part
// of the limit; a row nobody refreshes (a crashed worker) stops counting.
func TestStoppedWorkerHandsItsShareBack(t *testing.T) {
	if testing.Short() {
		t.Skip("slow: many rounds or real seconds of pacing (skipped by -short; make test runs it)")
	}
	e := newEnv(t)
	cfg := fastConfig()
	cfg.RateLimit = 20
	workers := make([]*metering.Worker, 3)
	stops := make([]func(), 3)
	for i := range workers {
		opts := e.workerOptions(t, cfg)
		opts.Name = fmt.Sprintf("instance-%d", i)
		workers[i] = metering.NewWorker(opts)
		stops[i] = startWorker(t, workers[i])
	}
	shares := func(ws ...*metering.Worker) []float64 {
		out := make([]float64, len(ws))
		for i, w := range ws {
			out[i] = w.RateShare()
		}
		return out
	}
	waitFor(t, "the limit split three ways", 10*time.Second, func() bool {
		return slices.Equal(shares(workers...), []float64{7, 7, 6})
	})
	if rows := liveRows(t, e.db); !slices.Equal(rows, []string{"instance-0", "instance-1", "instance-2"}) {
		t.Fatalf("meter_workers rows %v, want the three instances", rows)
	}

	stops[0]() // Run has returned when stop does
	if rows := liveRows(t, e.db); slices.Contains(rows, "instance-0") {
		t.Errorf("meter_workers rows %v after instance-0 stopped, want its row deleted", rows)
	}
	waitFor(t, "the two left to share the whole limit", 10*time.Second, func() bool {
		return slices.Equal(shares(workers[1], workers[2]), []float64{10, 10})
	})

	// A worker that died without deleting its row: counted while its
	// heartbeat is fresh, then no longer, and its row is cleared away.
	if err := e.db.Exec(`INSERT INTO meter_workers (id, heartbeat_at) VALUES ('crashed', now())`).Error; err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the crashed worker counted", 10*time.Second, func() bool {
		return slices.Equal(shares(workers[1], workers[2]), []float64{7, 6})
	})
	waitFor(t, "the crashed worker aged out", 10*time.Second, func() bool {
		return slices.Equal(shares(workers[1], workers[2]), []float64{10, 10}) &&
			slices.Equal(liveRows(t, e.db), []string{"instance-1", "instance-2"})
	})

	stops[1]()
	stops[2]()
	if rows := liveRows(t, e.db); len(rows) != 0 {
		t.Errorf("meter_workers rows %v after every worker stopped, want none", rows)
	}
}
