package main

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"math/rand/v2"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/stripeapi/stripefake"
	"github.com/tallybilling/tally/pkg/client"
)

// Hostile review of the consume batch (credits_consume_batch): two
// replicas on one database, a client that sends every request to both.

// revAnswer is what one consume request was answered, and how long it
// took.
type revAnswer struct {
	status   int
	res      client.ConsumeResult
	problem  string // the problem's code, for an answer other than 200
	replayed bool
	took     time.Duration
	err      error
}

func (a revAnswer) String() string {
	if a.err != nil {
		return "error " + a.err.Error()
	}
	if a.status == http.StatusOK {
		return fmt.Sprintf("200 %+v replayed=%t", a.res, a.replayed)
	}
	return fmt.Sprintf("%d %s", a.status, a.problem)
}

// revConsume spends amount of customer's credits under key through c.
func revConsume(c *client.ClientWithResponses, customer, key string, amount int64) revAnswer {
	start := time.Now()
	r, err := c.ConsumeCreditsWithResponse(context.Background(), customer,
		&client.ConsumeCreditsParams{IdempotencyKey: key}, client.ConsumeRequest{Amount: amount, Reason: "api call"})
	a := revAnswer{took: time.Since(start), err: err}
	if err != nil {
		return a
	}
	a.status = r.StatusCode()
	switch {
	case r.JSON200 != nil:
		a.res = *r.JSON200
		a.replayed = r.HTTPResponse.Header.Get("Idempotent-Replayed") == "true"
	case r.ApplicationproblemJSON402 != nil:
		a.problem = string(r.ApplicationproblemJSON402.Code)
	case r.ApplicationproblemJSONDefault != nil:
		a.problem = string(r.ApplicationproblemJSONDefault.Code)
	}
	return a
}

// bothServers sends the same consume to a and b at once, as a client that
// retries against the other replica before the first answered, and returns
// both answers.
func bothServers(a, b *client.ClientWithResponses, customer, key string, amount int64) [2]revAnswer {
	var out [2]revAnswer
	var wg sync.WaitGroup
	for i, c := range []*client.ClientWithResponses{a, b} {
		wg.Go(func() { out[i] = revConsume(c, customer, key, amount) })
	}
	wg.Wait()
	return out
}

// databaseDeadlocks is pg_stat_database.deadlocks of gdb's database.
func databaseDeadlocks(t testing.TB, gdb *gorm.DB) int64 {
	t.Helper()
	return countRows(t, gdb, `SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()`)
}

// deadlocksOnceStopped stops the servers and returns the deadlocks
// PostgreSQL counted in gdb's database. A backend reports its counts when
// it ends a transaction at most once a second, and an idle one only after
// ten; one that exits reports them all. So the servers stop (their
// connections close) and the count is read once no other backend is
// left on the database.
func deadlocksOnceStopped(t testing.TB, gdb *gorm.DB, servers ...*server) int64 {
	t.Helper()
	for _, s := range servers {
		s.shutdown(t)
	}
	waitForWithin(t, "the servers' database connections to close", 30*time.Second, func() bool {
		return countRows(t, gdb, `SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()`) == 0
	})
	return databaseDeadlocks(t, gdb)
}

// logDeadlocks counts what the servers logged of deadlocks: each consume
// batch PostgreSQL aborted to break one is logged as it falls back.
func logDeadlocks(servers ...*server) int {
	n := 0
	for _, s := range servers {
		n += strings.Count(s.logs.String(), "deadlock detected")
	}
	return n
}

// noDeadlocks stops the servers and fails the test if PostgreSQL counted
// more deadlocks in gdb's database than before (see deadlocksOnceStopped).
func noDeadlocks(t testing.TB, gdb *gorm.DB, before int64, servers ...*server) {
	t.Helper()
	if n := deadlocksOnceStopped(t, gdb, servers...) - before; n != 0 {
		t.Errorf("%d deadlocks in the database, want none", n)
	}
}

// revKey is one consume a storm sends: its customer, key and amount.
type revKey struct {
	customer, key string
	amount        int64
}

// stormBoth sends every key to both a and b at once (bothServers), from
// workers goroutines that each take the next key, and returns each key's
// two answers by its index in keys.
func stormBoth(a, b *client.ClientWithResponses, workers int, keys []revKey) [][2]revAnswer {
	out := make([][2]revAnswer, len(keys))
	var next atomic.Int64
	var wg sync.WaitGroup
	for range workers {
		wg.Go(func() {
			for i := int(next.Add(1)) - 1; i < len(keys); i = int(next.Add(1)) - 1 {
				k := keys[i]
				out[i] = bothServers(a, b, k.customer, k.key, k.amount)
			}
		})
	}
	wg.Wait()
	return out
}

// spentOnce checks each key's two answers: 200 twice with the same
// answer, one the first and the other a replay, or, where refusals are
// expected, 402 insufficient_credits twice. It returns what the applied
// keys spent per customer, the keys refused and the slowest answer.
func spentOnce(t testing.TB, keys []revKey, answers [][2]revAnswer, mayRefuse bool) (spent map[string]int64, refused []revKey, slowest time.Duration) {
	t.Helper()
	spent = map[string]int64{}
	for i, k := range keys {
		a0, a1 := answers[i][0], answers[i][1]
		slowest = max(slowest, a0.took, a1.took)
		switch {
		case a0.err != nil || a1.err != nil:
			t.Fatalf("%s: answered %v and %v", k.key, a0, a1)
		case a0.status == http.StatusOK && a1.status == http.StatusOK:
			if a0.res != a1.res || a0.res.Amount != k.amount {
				t.Fatalf("%s (%d): the two servers answered %v and %v", k.key, k.amount, a0, a1)
			}
			if a0.replayed == a1.replayed {
				t.Fatalf("%s: answered %v and %v, want one first answer and one replay", k.key, a0, a1)
			}
			spent[k.customer] += k.amount
		case mayRefuse && a0.status == http.StatusPaymentRequired && a1.status == http.StatusPaymentRequired &&
			a0.problem == string(client.ErrorCodeInsufficientCredits) && a1.problem == a0.problem:
			refused = append(refused, k)
		default:
			t.Fatalf("%s (%d): answered %v and %v", k.key, k.amount, a0, a1)
		}
	}
	return spent, refused, slowest
}

// appliedPerCustomer counts, per customer, the keys whose consume was
// answered 200 (spentOnce checked both answers of a key agree).
func appliedPerCustomer(keys []revKey, answers [][2]revAnswer) map[string]int {
	applied := map[string]int{}
	for i, k := range keys {
		if answers[i][0].status == http.StatusOK {
			applied[k.customer]++
		}
	}
	return applied
}

// ledgerSpentOnce checks customer's consume entries: one per applied key,
// adding up to spent.
func ledgerSpentOnce(t testing.TB, gdb *gorm.DB, customer string, keys int, spent int64) {
	t.Helper()
	if n := countRows(t, gdb, `SELECT count(*) FROM credit_ledger WHERE customer_id = ? AND kind = 'consume'`, customer); n != int64(keys) {
		t.Errorf("%s: %d consume entries, want one per applied key: %d", customer, n, keys)
	}
	if n := countRows(t, gdb, `SELECT count(*) - count(DISTINCT idempotency_key) FROM credit_ledger WHERE customer_id = ? AND kind = 'consume'`, customer); n != 0 {
		t.Errorf("%s: %d keys spent more than once", customer, n)
	}
	if n := countRows(t, gdb, `SELECT -COALESCE(sum(amount), 0) FROM credit_ledger WHERE customer_id = ? AND kind = 'consume'`, customer); n != spent {
		t.Errorf("%s: the ledger spent %d, the answers %d", customer, n, spent)
	}
}

// TestRevcDuplicatesBothServersNoDeadlock: two replicas on one database,
// every consume sent to both at once (a client that retries against the
// other replica before the first answers), over a few customers, so that
// every batch holds consumes of several customers, in another order on
// each server. A batch claims keys one after another and keeps them to
// its commit; waiting without a bound for a key the other server's batch
// holds, while that batch waits for one this batch holds, is a deadlock,
// which PostgreSQL breaks after deadlock_timeout (1 s) by failing one
// side (migration 00055). Each key spends once and both its answers are
// the same; no deadlock happens (pg_stat_database counts them, also those
// the full path retried without a word).
//
// Not parallel, so that the package's other tests do not starve its
// storm: the deadlock needs both servers' batches running at once.
func TestRevcDuplicatesBothServersNoDeadlock(t *testing.T) {
	env := baseEnv(t)
	env["TALLY_DB_MAX_OPEN_CONNS"] = "10"
	a, b := twoServers(t, env)
	gdb := openDB(t, a)
	ca, cb := a.service(t), b.service(t)
	const grant = 1_000_000
	customers := []string{"rc-dup-0", "rc-dup-1", "rc-dup-2", "rc-dup-3"}
	for _, c := range customers {
		grantOverHTTP(t, ca, c, grant, "rc-grant-"+c)
	}
	keys := make([]revKey, 512)
	for i := range keys {
		keys[i] = revKey{customer: customers[i%len(customers)], key: fmt.Sprintf("rc-dup-%03d", i), amount: int64(1 + i%3)}
	}
	before := databaseDeadlocks(t, gdb)
	start := time.Now()
	answers := stormBoth(ca, cb, 32, keys)
	storm := time.Since(start)

	spent, _, slowest := spentOnce(t, keys, answers, false)
	for _, c := range customers {
		if bal := balanceOverHTTP(t, ca, c); bal.Balance != grant-spent[c] {
			t.Errorf("%s: balance %d, want %d", c, bal.Balance, grant-spent[c])
		}
		ledgerSpentOnce(t, gdb, c, len(keys)/len(customers), spent[c])
	}
	receivablesOverHTTP(t, a)
	fromLogs := logDeadlocks(a, b)
	deadlocks := deadlocksOnceStopped(t, gdb, a, b) - before
	t.Logf("%d keys, each to both servers, in %v: slowest answer %v; %d deadlocks (pg_stat_database), %d logged",
		len(keys), storm.Round(time.Millisecond), slowest.Round(time.Millisecond), deadlocks, fromLogs)
	if deadlocks != 0 || fromLogs != 0 {
		t.Errorf("%d deadlocks in the database (%d in the servers' logs), want none", deadlocks, fromLogs)
	}
	// The deadlocks are the signal, not the time: a deadlock costs
	// deadlock_timeout (1 s) before PostgreSQL fails one side, and the
	// slowest answer (logged above) took 1.2 to 2.4 s with them and 0.25 to
	// 0.49 s without when this test ran alone, but 1.9 s without any in a
	// full make test on two loaded cores.
}

// TestRevcDrawOrderStormOverTwoServers: grants of one customer in every
// draw position (a low priority number, expiries an hour apart, created out
// of order, one that never expires), spent by a storm over both servers,
// every key to both, in amounts that cross from one grant to the next.
// Replaying the ledger in its order, every consume drew exactly what the
// draw order says from what was left (priority, then soonest expiry, then
// oldest), and the grants end as the draw order leaves them.
func TestRevcDrawOrderStormOverTwoServers(t *testing.T) {
	t.Parallel()
	env := baseEnv(t)
	env["TALLY_DB_MAX_OPEN_CONNS"] = "10"
	a, b := twoServers(t, env)
	gdb := openDB(t, a)
	ca, cb := a.service(t), b.service(t)
	hour := time.Now().Add(time.Hour).Truncate(time.Second)
	// In the order they are granted; rank is the draw order.
	type grantSpec struct {
		amount   int64
		expires  *time.Time
		priority *int
		rank     int
	}
	at := func(h int) *time.Time { x := hour.Add(time.Duration(h-1) * time.Hour); return &x }
	specs := []grantSpec{
		{amount: 40, rank: 4},                                    // never expires
		{amount: 30, expires: at(3), rank: 3},                    // in three hours
		{amount: 30, expires: at(1), rank: 1},                    // in an hour
		{amount: 20, expires: at(2), rank: 2},                    // in two hours
		{amount: 25, expires: at(4), priority: ptr(10), rank: 0}, // first: priority 10 against the default 50
	}
	const customers = 8
	grantIDs := map[string][]string{} // customer -> grant ids by rank
	var keys []revKey
	for c := range customers {
		customer := fmt.Sprintf("rc-draw-%d", c)
		grantIDs[customer] = make([]string, len(specs))
		for i, g := range specs {
			r, err := ca.GrantCreditsWithResponse(context.Background(), customer, &client.GrantCreditsParams{IdempotencyKey: fmt.Sprintf("rc-draw-g%d", i)},
				client.GrantRequest{Amount: g.amount, Reason: "draw order", ExpiresAt: g.expires, Priority: g.priority})
			if err != nil {
				t.Fatal(err)
			}
			mustStatus(t, "grant", r.StatusCode(), r.Body, http.StatusCreated)
			grantIDs[customer][g.rank] = r.JSON201.GrantId
		}
		// 100 of the 145 credits, in amounts of 1 to 7.
		left := int64(100)
		for i := 0; left > 0; i++ {
			amount := min(left, int64(1+(i*5+c)%7))
			keys = append(keys, revKey{customer: customer, key: fmt.Sprintf("rc-draw-%d-%02d", c, i), amount: amount})
			left -= amount
		}
	}
	rand.Shuffle(len(keys), func(i, j int) { keys[i], keys[j] = keys[j], keys[i] })
	before := databaseDeadlocks(t, gdb)
	answers := stormBoth(ca, cb, 32, keys)
	spent, _, _ := spentOnce(t, keys, answers, false)

	for customer, ids := range grantIDs {
		if spent[customer] != 100 {
			t.Fatalf("%s spent %d, want 100", customer, spent[customer])
		}
		left := make([]int64, len(ids))
		for _, g := range specs {
			left[g.rank] = g.amount
		}
		var entries []struct {
			IdempotencyKey string
			Amount         int64
			Draws          string
		}
		if err := gdb.Raw(`SELECT idempotency_key, amount, draws::text AS draws FROM credit_ledger WHERE customer_id = ? AND kind = 'consume' ORDER BY seq`, customer).
			Scan(&entries).Error; err != nil {
			t.Fatal(err)
		}
		for _, e := range entries {
			var draws []struct {
				GrantID string `json:"grant_id"`
				Amount  int64  `json:"amount"`
			}
			if err := json.Unmarshal([]byte(e.Draws), &draws); err != nil {
				t.Fatalf("%s: draws %s: %v", e.IdempotencyKey, e.Draws, err)
			}
			// What the draw order takes for this amount from what is left.
			var want []string
			need := -e.Amount
			for rank := 0; need > 0 && rank < len(left); rank++ {
				if take := min(left[rank], need); take > 0 {
					want = append(want, fmt.Sprintf("%s:%d", ids[rank], take))
					left[rank] -= take
					need -= take
				}
			}
			var got []string
			for _, d := range draws {
				got = append(got, fmt.Sprintf("%s:%d", d.GrantID, d.Amount))
			}
			if !slices.Equal(got, want) {
				t.Fatalf("%s: consume %s of %d drew %v, the draw order takes %v (grants by rank %v)", customer, e.IdempotencyKey, -e.Amount, got, want, ids)
			}
		}
		for rank, id := range ids {
			if n := countRows(t, gdb, `SELECT remaining FROM credit_grants WHERE id = ?`, id); n != left[rank] {
				t.Errorf("%s: grant %d in draw order has %d left, want %d", customer, rank, n, left[rank])
			}
		}
		ledgerSpentOnce(t, gdb, customer, len(entries), 100)
	}
	receivablesOverHTTP(t, a)
	mustVerifyClean(t, b)
	noDeadlocks(t, gdb, before, a, b)
}

// revOp is one request of TestRevcKeyReuseAcrossServersAndEndpoints.
type revOp struct {
	name   string
	status int
	body   string
	code   string // the problem's code
}

// TestRevcKeyReuseAcrossServersAndEndpoints: one Idempotency-Key sent at
// once to both servers on every endpoint that spends or grants: the same
// consume three times, a consume of another amount, a grant and a hold.
// Keys share one space per customer across operations, so exactly one
// request takes effect, its copies replay its answer, and every other one
// is 422 idempotency_key_reused: never a second spend, never a 409 (the
// API answers a duplicate of a database-only operation by waiting for the
// first). Sent again, one by one, each gets the same answer.
func TestRevcKeyReuseAcrossServersAndEndpoints(t *testing.T) {
	t.Parallel()
	env := baseEnv(t)
	a, b := twoServers(t, env)
	gdb := openDB(t, a)
	ca, cb := a.service(t), b.service(t)
	const customers = 12
	// send sends request i (of the six) to server 0 (a) or 1 (b).
	send := func(customer, key string, i, server int) revOp {
		c := []*client.ClientWithResponses{ca, cb}[server]
		var (
			status int
			body   []byte
			prob   *client.Problem
			err    error
		)
		switch i {
		case 0, 1, 2: // the same consume, twice on a and once on b
			var r *client.ConsumeCreditsResponse
			r, err = c.ConsumeCreditsWithResponse(context.Background(), customer, &client.ConsumeCreditsParams{IdempotencyKey: key}, client.ConsumeRequest{Amount: 5, Reason: "api call"})
			if err == nil {
				status, body, prob = r.StatusCode(), r.Body, r.ApplicationproblemJSONDefault
			}
		case 3: // another consume under the key
			var r *client.ConsumeCreditsResponse
			r, err = c.ConsumeCreditsWithResponse(context.Background(), customer, &client.ConsumeCreditsParams{IdempotencyKey: key}, client.ConsumeRequest{Amount: 7, Reason: "api call"})
			if err == nil {
				status, body, prob = r.StatusCode(), r.Body, r.ApplicationproblemJSONDefault
			}
		case 4:
			var r *client.GrantCreditsResponse
			r, err = c.GrantCreditsWithResponse(context.Background(), customer, &client.GrantCreditsParams{IdempotencyKey: key}, client.GrantRequest{Amount: 10, Reason: "same key"})
			if err == nil {
				status, body, prob = r.StatusCode(), r.Body, r.ApplicationproblemJSONDefault
			}
		case 5:
			var r *client.CreateHoldResponse
			r, err = c.CreateHoldWithResponse(context.Background(), customer, &client.CreateHoldParams{IdempotencyKey: key}, client.HoldRequest{Amount: 5, Reason: "same key"})
			if err == nil {
				status, body, prob = r.StatusCode(), r.Body, r.ApplicationproblemJSONDefault
			}
		}
		op := revOp{name: []string{"consume 5 (a)", "consume 5 (b)", "consume 5 (a again)", "consume 7 (b)", "grant 10 (a)", "hold 5 (b)"}[i], status: status, body: string(body)}
		if err != nil {
			op.body = err.Error()
		}
		if prob != nil {
			op.code = string(prob.Code)
		}
		return op
	}
	const ops = 6
	// checkRound finds the one request that took effect and checks every
	// other answer against it; it returns the winner's index.
	checkRound := func(customer string, got []revOp) int {
		t.Helper()
		winner := -1
		for i, op := range got {
			if op.status/100 == 2 {
				same := winner >= 0 && winner <= 2 && i <= 2 // copies of the same consume
				if winner >= 0 && !same {
					t.Fatalf("%s: two requests under one key took effect: %+v and %+v", customer, got[winner], op)
				}
				if winner < 0 {
					winner = i
				}
				if same && op.body != got[winner].body {
					t.Fatalf("%s: copies of one consume answered %s and %s", customer, got[winner].body, op.body)
				}
				continue
			}
			if op.status != http.StatusUnprocessableEntity || op.code != string(client.ErrorCodeIdempotencyKeyReused) {
				t.Fatalf("%s: %s answered %d %s, want a 2xx or 422 idempotency_key_reused", customer, op.name, op.status, op.body)
			}
		}
		if winner < 0 {
			t.Fatalf("%s: no request took effect: %+v", customer, got)
		}
		return winner
	}
	before := databaseDeadlocks(t, gdb)
	winners := map[string]int{}
	firstAnswers := map[string][]revOp{}
	var mu sync.Mutex
	var wg sync.WaitGroup
	for c := range customers {
		customer := fmt.Sprintf("rc-reuse-%02d", c)
		grantOverHTTP(t, ca, customer, 100, "rc-reuse-grant")
		wg.Go(func() {
			got := make([]revOp, ops)
			var inner sync.WaitGroup
			for i := range ops {
				inner.Go(func() { got[i] = send(customer, "rc-reuse-key", i, i%2) })
			}
			inner.Wait()
			mu.Lock()
			defer mu.Unlock()
			firstAnswers[customer] = got
		})
	}
	wg.Wait()
	tally := map[string]int{}
	for customer, got := range firstAnswers {
		w := checkRound(customer, got)
		winners[customer] = w
		tally[got[w].name]++
		// Again, one by one, on the other server: the same answers.
		again := make([]revOp, ops)
		for i := range ops {
			again[i] = send(customer, "rc-reuse-key", i, 1-i%2)
		}
		checkRound(customer, again)
		for i := range ops {
			if again[i].status != got[i].status || (got[i].status/100 == 2 && again[i].body != got[w].body) {
				t.Fatalf("%s: %s answered %d %s, then %d %s", customer, got[i].name, got[i].status, got[i].body, again[i].status, again[i].body)
			}
		}
		// The books: one effect.
		consumes := countRows(t, gdb, `SELECT count(*) FROM credit_ledger WHERE customer_id = ? AND kind = 'consume'`, customer)
		grants := countRows(t, gdb, `SELECT count(*) FROM credit_ledger WHERE customer_id = ? AND kind = 'grant'`, customer) - 1
		holds := countRows(t, gdb, `SELECT count(*) FROM credit_holds WHERE customer_id = ?`, customer)
		bal := balanceOverHTTP(t, ca, customer)
		want := map[int]int64{0: 95, 1: 95, 2: 95, 3: 93, 4: 110, 5: 100}[w]
		if consumes+grants+holds != 1 || bal.Balance != want {
			t.Fatalf("%s: %s won, but %d consumes, %d more grants and %d holds, balance %d (want one effect, balance %d)", customer, got[w].name, consumes, grants, holds, bal.Balance, want)
		}
	}
	t.Logf("what took effect: %v", tally)
	receivablesOverHTTP(t, a)
	mustVerifyClean(t, b)
	noDeadlocks(t, gdb, before, a, b)
}

// TestRevcLowBalanceOncePerFallOverTwoServers: a threshold of 50 and a
// further one of 20; storms of consumes of 1 over both servers (every key
// to both) take 100 down to 40 (one fall below 50), a grant brings it back
// to 70 (which re-arms 50), and a second storm takes it to 10 (a second
// fall below 50, the first below 20). credits.low_balance fires exactly
// once per fall, twice for 50 and once for 20, each time by the consume
// that crossed (available 49, or 19), whatever batch and server it went
// through.
func TestRevcLowBalanceOncePerFallOverTwoServers(t *testing.T) {
	t.Parallel()
	env := baseEnv(t)
	env["TALLY_DB_MAX_OPEN_CONNS"] = "10"
	a, b := twoServers(t, env)
	gdb := openDB(t, a)
	ca, cb := a.service(t), b.service(t)
	const customers = 6
	storm := func(round int) {
		t.Helper()
		var keys []revKey
		for c := range customers {
			for i := range 60 {
				keys = append(keys, revKey{customer: fmt.Sprintf("rc-low-%d", c), key: fmt.Sprintf("rc-low-%d-%d-%02d", round, c, i), amount: 1})
			}
		}
		rand.Shuffle(len(keys), func(i, j int) { keys[i], keys[j] = keys[j], keys[i] })
		spentOnce(t, keys, stormBoth(ca, cb, 32, keys), false)
	}
	// fired is what was available in each notice for threshold, in order.
	fired := func(customer string, threshold int64) []int64 {
		t.Helper()
		var avail []int64
		if err := gdb.Raw(`SELECT (data->>'available')::bigint FROM events WHERE type = 'credits.low_balance' AND customer_id = ? AND (data->>'threshold')::bigint = ? ORDER BY id`,
			customer, threshold).Scan(&avail).Error; err != nil {
			t.Fatal(err)
		}
		return avail
	}
	for c := range customers {
		customer := fmt.Sprintf("rc-low-%d", c)
		r, err := ca.UpsertCustomerWithResponse(context.Background(), customer, client.CustomerUpsert{LowBalanceThreshold: i64(50), LowBalanceThresholds: &[]int64{20}})
		if err != nil {
			t.Fatal(err)
		}
		if r.StatusCode()/100 != 2 {
			t.Fatalf("upsert %s: %d %s", customer, r.StatusCode(), r.Body)
		}
		grantOverHTTP(t, ca, customer, 100, "rc-low-grant-1")
	}
	before := databaseDeadlocks(t, gdb)
	storm(1)
	for c := range customers {
		customer := fmt.Sprintf("rc-low-%d", c)
		if f50, f20, bal := fired(customer, 50), fired(customer, 20), balanceOverHTTP(t, ca, customer).Balance; !slices.Equal(f50, []int64{49}) || len(f20) != 0 || bal != 40 {
			t.Fatalf("%s after 100 -> 40: notices for 50 at %v available and for 20 at %v, balance %d; want [49], [] and 40", customer, f50, f20, bal)
		}
		grantOverHTTP(t, cb, customer, 30, "rc-low-grant-2")
	}
	storm(2)
	for c := range customers {
		customer := fmt.Sprintf("rc-low-%d", c)
		if f50, f20, bal := fired(customer, 50), fired(customer, 20), balanceOverHTTP(t, ca, customer).Balance; !slices.Equal(f50, []int64{49, 49}) || !slices.Equal(f20, []int64{19}) || bal != 10 {
			t.Fatalf("%s after 70 -> 10: notices for 50 at %v available and for 20 at %v, balance %d; want [49 49], [19] and 10", customer, f50, f20, bal)
		}
		ledgerSpentOnce(t, gdb, customer, 120, 120)
	}
	receivablesOverHTTP(t, a)
	mustVerifyClean(t, b)
	noDeadlocks(t, gdb, before, a, b)
}

// TestRevcExhaustionOverTwoServers: consumes of 1 to 3 credits asking for
// twice what each customer has (two grants, one expiring), every key to
// both servers at once. Nothing overdraws: what the answered consumes
// spent is exactly what the balance lost, each refused key is refused by
// both servers, and once a consume of 1 is refused the balance is 0.
func TestRevcExhaustionOverTwoServers(t *testing.T) {
	t.Parallel()
	env := baseEnv(t)
	env["TALLY_DB_MAX_OPEN_CONNS"] = "10"
	a, b := twoServers(t, env)
	gdb := openDB(t, a)
	ca, cb := a.service(t), b.service(t)
	const customers = 6
	expires := time.Now().Add(time.Hour)
	var keys []revKey
	for c := range customers {
		customer := fmt.Sprintf("rc-empty-%d", c)
		grantOverHTTP(t, ca, customer, 60, "rc-empty-grant-1")
		r, err := cb.GrantCreditsWithResponse(context.Background(), customer, &client.GrantCreditsParams{IdempotencyKey: "rc-empty-grant-2"},
			client.GrantRequest{Amount: 40, Reason: "expiring", ExpiresAt: &expires})
		if err != nil {
			t.Fatal(err)
		}
		mustStatus(t, "grant", r.StatusCode(), r.Body, http.StatusCreated)
		for i := range 100 { // 200 credits asked for
			keys = append(keys, revKey{customer: customer, key: fmt.Sprintf("rc-empty-%d-%03d", c, i), amount: int64(1 + (i+c)%3)})
		}
	}
	rand.Shuffle(len(keys), func(i, j int) { keys[i], keys[j] = keys[j], keys[i] })
	before := databaseDeadlocks(t, gdb)
	answers := stormBoth(ca, cb, 32, keys)
	spent, refused, _ := spentOnce(t, keys, answers, true)
	applied := appliedPerCustomer(keys, answers)
	for c := range customers {
		customer := fmt.Sprintf("rc-empty-%d", c)
		bal := balanceOverHTTP(t, ca, customer)
		if bal.Balance < 0 || bal.Balance != 100-spent[customer] {
			t.Errorf("%s: balance %d after the answers spent %d of 100", customer, bal.Balance, spent[customer])
		}
		for _, k := range refused {
			if k.customer == customer && k.amount == 1 && bal.Balance != 0 {
				t.Errorf("%s: a consume of 1 (%s) was refused, yet %d credits are left", customer, k.key, bal.Balance)
				break
			}
		}
		ledgerSpentOnce(t, gdb, customer, applied[customer], spent[customer])
	}
	t.Logf("%d keys: %d refused", len(keys), len(refused))
	receivablesOverHTTP(t, a)
	mustVerifyClean(t, b)
	noDeadlocks(t, gdb, before, a, b)
}

// TestRevcKillOneOfTwoServersMidStorm: two replicas, every key sent to
// both; one is killed (SIGKILL: no shutdown, its transactions cut off
// wherever they were) while batches run on both. The client then retries
// every key on the survivor: an answered key replays its answer, whichever
// server gave it, and every key is applied exactly once.
func TestRevcKillOneOfTwoServersMidStorm(t *testing.T) {
	t.Parallel()
	bin := buildTally(t)
	fake := stripefake.New(t)
	env := baseEnv(t)
	env["TALLY_STRIPE_API_URL"] = fake.URL()
	env["TALLY_DB_MAX_OPEN_CONNS"] = "10"
	run := &crashRun{t: t}
	doomed := startChild(t, bin, env)
	run.children = append(run.children, doomed)
	b := startServer(t, maps.Clone(env))
	gdb := openDB(t, b)
	// The doomed server's client: errors are expected once it is gone.
	ca, err := client.NewClientWithResponses(doomed.URL, client.WithHTTPClient(&http.Client{Timeout: 30 * time.Second}),
		client.WithRequestEditorFn(func(ctx context.Context, req *http.Request) error {
			req.Header.Set("Authorization", "Bearer "+testServiceKey)
			return nil
		}))
	if err != nil {
		t.Fatal(err)
	}
	cb := b.service(t)

	const grant = 1_000_000
	customers := []string{"rc-kill-a", "rc-kill-b", "rc-kill-c", "rc-kill-d"}
	for i := range 20 {
		customers = append(customers, fmt.Sprintf("rc-kill-m%02d", i))
	}
	for _, c := range customers {
		grantOverHTTP(t, cb, c, grant, "rc-kill-grant")
	}
	keys := make([]revKey, 2000) // the kill comes long before they are sent
	for i := range keys {
		c := customers[i%4]
		if i%2 == 1 {
			c = customers[4+(i/2)%20]
		}
		keys[i] = revKey{customer: c, key: fmt.Sprintf("rc-kill-%04d", i), amount: int64(1 + i%3)}
	}

	before := databaseDeadlocks(t, gdb)
	var (
		mu     sync.Mutex
		acked  = map[string]client.ConsumeResult{}
		oks    atomic.Int64
		next   atomic.Int64
		killed atomic.Bool
		wg     sync.WaitGroup
	)
	for range 24 {
		wg.Go(func() {
			for !killed.Load() {
				i := int(next.Add(1)) - 1
				if i >= len(keys) {
					return
				}
				k := keys[i]
				got := bothServers(ca, cb, k.customer, k.key, k.amount)
				mu.Lock()
				for _, x := range got {
					switch {
					case x.err != nil: // the kill
					case x.status != http.StatusOK:
						t.Errorf("%s: answered %v", k.key, x)
					default:
						if prev, ok := acked[k.key]; ok && prev != x.res {
							t.Errorf("%s: answered %+v and %+v", k.key, prev, x.res)
						}
						acked[k.key] = x.res
						oks.Add(1)
					}
				}
				mu.Unlock()
			}
		})
	}
	killAt := int64(300 + rand.IntN(600))
	for oks.Load() < killAt && next.Load() < int64(len(keys)) {
		time.Sleep(time.Millisecond)
	}
	time.Sleep(rand.N(20 * time.Millisecond))
	doomed.kill()
	killed.Store(true)
	wg.Wait()
	sent := next.Load()
	t.Logf("SIGKILL after %d answers (%d keys answered), %d keys sent", oks.Load(), len(acked), sent)
	if sent >= int64(len(keys)) {
		run.fatalf("every key was sent before the kill: the kill came too late")
	}

	// The client retries every key on the survivor.
	var failures []string
	retry := make(chan revKey, len(keys))
	for _, k := range keys {
		retry <- k
	}
	close(retry)
	var rg sync.WaitGroup
	for range 16 {
		rg.Go(func() {
			for k := range retry {
				x := revConsume(cb, k.customer, k.key, k.amount)
				mu.Lock()
				prev, wasAcked := acked[k.key]
				switch {
				case x.err != nil || x.status != http.StatusOK:
					failures = append(failures, fmt.Sprintf("%s: %v", k.key, x))
				case wasAcked && (x.res != prev || !x.replayed):
					failures = append(failures, fmt.Sprintf("%s: answered %+v, the retry %v", k.key, prev, x))
				}
				mu.Unlock()
			}
		})
	}
	rg.Wait()
	if len(failures) > 0 {
		run.fatalf("%d retries on the survivor went wrong, first: %v", len(failures), failures[:min(len(failures), 10)])
	}
	want := map[string]int64{}
	n := map[string]int{}
	for _, k := range keys {
		want[k.customer] += k.amount
		n[k.customer]++
	}
	for _, c := range customers {
		if bal := balanceOf(t, gdb, c); bal != grant-want[c] {
			run.fatalf("%s: balance %d, want %d", c, bal, grant-want[c])
		}
		ledgerSpentOnce(t, gdb, c, n[c], want[c])
	}
	receivablesOverHTTP(t, b)
	mustVerifyClean(t, b)
	noDeadlocks(t, gdb, before, b)
}
