package main

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"gorm.io/gorm"

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
// the same; no deadlock happens; no answer waits anywhere near a second.
//
// Not parallel: it times its answers, so it runs while no other test of
// the package does.
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
	// A deadlock costs deadlock_timeout (1 s) before PostgreSQL fails one
	// side: the slowest answers took 1.2 to 2.4 s with them, 0.42 to
	// 0.49 s without (-race, on two cores shared with other work).
	if slowest >= time.Second {
		t.Errorf("the slowest answer took %v, want under a second", slowest)
	}
}
