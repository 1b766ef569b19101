package main

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net/http"
	"strings"
	"sync"
	"testing"

	"github.com/tallybilling/tally/internal/stripeapi/stripefake"
	"github.com/tallybilling/tally/pkg/client"
)

// The same customers new to tally, named at once by usage batches (in
// shuffled orders, with repeats), admin imports and credit grants, through
// two servers on one database: every request answers 2xx, every customer
// exists once with exactly one customer.created, and every invariant holds.
func TestRevEnsureManyAcrossPathsAndServers(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	fake.SetMeter("mtr_api_calls", "api_calls")
	env := meteringEnv(t, fake.URL())
	a, b := twoServers(t, env)
	gdb := openDB(t, a)
	var dl0 int64
	if err := gdb.Raw(`SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()`).Scan(&dl0).Error; err != nil {
		t.Fatal(err)
	}
	const n = 150
	names := make([]string, n)
	for i := range names {
		names[i] = fmt.Sprintf("race-%03d", i)
	}
	servers := []*server{a, b}
	ctx := context.Background()
	var wg sync.WaitGroup
	var mu sync.Mutex
	var failures []string
	fail := func(format string, args ...any) {
		mu.Lock()
		defer mu.Unlock()
		failures = append(failures, fmt.Sprintf(format, args...))
	}
	for w := range 6 {
		wg.Go(func() {
			s := servers[w%2]
			r := rand.New(rand.NewPCG(uint64(w), 7))
			order := r.Perm(n)
			evs := make([]client.UsageEventInput, 0, n+10)
			for j, i := range order {
				evs = append(evs, usageEvent(names[i], fmt.Sprintf("rb-%d-%d", w, j), 1))
			}
			for j := range 10 { // repeats of customers in one batch
				evs = append(evs, usageEvent(names[order[j]], fmt.Sprintf("rb-%d-again-%d", w, j), 1))
			}
			key := fmt.Sprintf("rb-key-%d", w)
			res, err := s.service(t).IngestUsageEventsWithResponse(ctx, &client.IngestUsageEventsParams{IdempotencyKey: &key}, client.UsageBatch{Events: evs})
			if err != nil || res.StatusCode()/100 != 2 {
				fail("batch %d: %v %d %s", w, err, res.StatusCode(), res.Body)
			}
		})
	}
	for w := range 2 {
		wg.Go(func() {
			s := servers[w%2]
			var sb strings.Builder
			sb.WriteString("customer_id,meter,value,timestamp,identifier\n")
			for i := range n {
				c := names[(i*7+w*31)%n]
				fmt.Fprintf(&sb, "%s,api_calls,1,2026-01-01T00:00:00Z,imp-%d-%d\n", c, w, i)
			}
			res, err := s.admin(t).ImportUsageWithBodyWithResponse(ctx, &client.ImportUsageParams{}, "text/csv", strings.NewReader(sb.String()))
			if err != nil || res.JSON200 == nil {
				fail("import %d: %v %d %s", w, err, res.StatusCode(), res.Body)
			}
		})
	}
	for w := range 4 {
		wg.Go(func() {
			s := servers[w%2]
			for i := w; i < n; i += 4 {
				r, err := s.service(t).GrantCreditsWithResponse(ctx, names[n-1-i], &client.GrantCreditsParams{IdempotencyKey: fmt.Sprintf("rg-%d", i)},
					client.GrantRequest{Amount: 10, Reason: "welcome"})
				if err != nil || r.StatusCode() != http.StatusCreated {
					fail("grant %s: %v %d %s", names[n-1-i], err, r.StatusCode(), r.Body)
				}
			}
		})
	}
	wg.Wait()
	for _, f := range failures {
		t.Error(f)
	}
	var made, once int64
	if err := gdb.Raw(`SELECT count(*) FROM customers WHERE id LIKE 'race-%'`).Scan(&made).Error; err != nil {
		t.Fatal(err)
	}
	if err := gdb.Raw(`SELECT count(*) FROM (SELECT customer_id FROM events WHERE type = 'customer.created' AND customer_id LIKE 'race-%'
		GROUP BY customer_id HAVING count(*) = 1) c`).Scan(&once).Error; err != nil {
		t.Fatal(err)
	}
	if made != n || once != n {
		t.Errorf("%d customers made, %d announced exactly once; want %d", made, once, n)
	}
	var dl1 int64
	if err := gdb.Raw(`SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()`).Scan(&dl1).Error; err != nil {
		t.Fatal(err)
	}
	t.Logf("deadlocks during the race: %d", dl1-dl0)
	mustVerifyClean(t, a)
}
