package main

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"math/rand/v2"
	"net/http"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/stripeapi/stripefake"
	"github.com/tallybilling/tally/pkg/client"
)

// Hostile review (helper-78) of credits_consume_run (migrations 00058 and
// 00059) with automatic top-up on: a hot customer spent by 64 concurrent
// clients over two servers, so its consumes land in runs, each run
// deferring to the full path at the consume that must start a top-up; the
// fake Stripe charges the card and the test delivers the signed events
// while the load goes on. The ledger is then replayed: a top-up starts at
// exactly the consumes that leave available below the threshold with none
// in flight and the month's limit not reached, never two in flight, each
// credited once; every key spent once or was refused with a 402 that a
// retry after a grant spends; no key is left claimed without an answer.

// hotTopUpConsume consumes and returns the status, transaction id and
// whether it was a replay.
func hotTopUpConsume(c *client.ClientWithResponses, customer, key string, amount int64) (int, string, bool, error) {
	r, err := c.ConsumeCreditsWithResponse(context.Background(), customer, &client.ConsumeCreditsParams{IdempotencyKey: key},
		client.ConsumeRequest{Amount: amount, Reason: "hot top-up"})
	if err != nil {
		return 0, "", false, err
	}
	var tx string
	if r.JSON200 != nil {
		tx = r.JSON200.TransactionId
	}
	return r.StatusCode(), tx, r.HTTPResponse.Header.Get("Idempotent-Replayed") == "true", nil
}

func TestHotRunAutoTopUpReplaysFromTheLedger(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	env := payEnv(t, fake.URL())
	env["TALLY_DB_MAX_OPEN_CONNS"] = "8"
	s1 := startServer(t, env)
	s2 := startServer(t, maps.Clone(env))
	evs := &stripeEvents{fake: fake}
	const (
		customer  = "h78-hot"
		threshold = 1500
		limit     = 3
		workers   = 64
		perWorker = 10
		amount    = 10
		initial   = 2500
	)
	lim := limit
	withAutoTopUp(t, s1, evs, customer, topUpCard, initial, client.AutoTopUpSettings{
		Enabled: true, Threshold: threshold, Item: "starter", MonthlyLimit: &lim})
	clients := []*client.ClientWithResponses{hotClient(t, s1.URL), hotClient(t, s2.URL)}

	// Stripe's events, delivered while the load runs, a little late.
	stop := make(chan struct{})
	var delivered sync.WaitGroup
	delivered.Go(func() {
		for {
			select {
			case <-stop:
				return
			case <-time.After(40 * time.Millisecond):
			}
			evs.deliverNew(t, s2)
		}
	})

	type outcome struct {
		status int
		tx     string
	}
	var (
		mu       sync.Mutex
		answers  = map[string]outcome{}
		inflight atomic.Int64
		wg       sync.WaitGroup
	)
	for w := range workers {
		wg.Go(func() {
			c := clients[w%2]
			for i := range perWorker {
				key := fmt.Sprintf("w%02d-%02d", w, i)
				var st int
				var tx string
				for attempt := 0; ; attempt++ {
					var err error
					st, tx, _, err = hotTopUpConsume(c, customer, key, amount)
					if err != nil {
						t.Errorf("consume %s: %v", key, err)
						return
					}
					if st != http.StatusConflict || attempt >= 50 {
						break
					}
					// In flight elsewhere: a retry must end it.
					inflight.Add(1)
					time.Sleep(20 * time.Millisecond)
				}
				mu.Lock()
				answers[key] = outcome{st, tx}
				mu.Unlock()
				if st != http.StatusOK && st != http.StatusPaymentRequired {
					t.Errorf("consume %s: %d", key, st)
				}
			}
		})
	}
	wg.Wait()
	// Every top-up charged is delivered and credited.
	gdb := openDB(t, s1)
	waitFor(t, "every automatic top-up to settle", func() bool {
		return countRows(t, gdb, `SELECT count(*) FROM payments WHERE customer_id = ? AND method = 'auto_top_up' AND status = 'pending'`, customer) == 0
	})
	close(stop)
	delivered.Wait()
	evs.deliverNew(t, s1)

	ok, refused := 0, 0
	for _, a := range answers {
		if a.status == http.StatusOK {
			ok++
		} else {
			refused++
		}
	}
	t.Logf("%d consumes: %d spent, %d refused (402), %d answers in flight retried", len(answers), ok, refused, inflight.Load())
	if len(answers) != workers*perWorker {
		t.Fatalf("%d answers, want %d", len(answers), workers*perWorker)
	}

	// The runs did happen: transactions that wrote more than one of the
	// customer's consumes.
	runs := countRows(t, gdb, `SELECT count(*) FROM (SELECT xmin::text FROM credit_ledger WHERE customer_id = ? AND kind = 'consume'
		GROUP BY 1 HAVING count(*) > 1) r`, customer)
	t.Logf("%d transactions wrote several consumes of the customer", runs)
	if runs == 0 {
		t.Fatal("no consume of the hot customer went in a run")
	}

	// No key is left claimed without an answer, none refused is stored.
	if n := countRows(t, gdb, `SELECT count(*) FROM idempotency_keys WHERE key LIKE 'w%' AND completed_at IS NULL`); n != 0 {
		t.Fatalf("%d consume keys left claimed without an answer", n)
	}

	// Replay the ledger with the top-ups.
	type entry struct {
		Seq            int64
		Kind           string
		Amount         int64
		BalanceAfter   int64
		IdempotencyKey *string
		PaymentID      *string
		X              string
	}
	var entries []entry
	if err := gdb.Raw(`SELECT seq, kind, amount, balance_after, idempotency_key, payment_id, xmin::text AS x
		FROM credit_ledger WHERE customer_id = ? ORDER BY seq`, customer).Scan(&entries).Error; err != nil {
		t.Fatal(err)
	}
	type topUp struct {
		ID, X, Status string
	}
	var tops []topUp
	if err := gdb.Raw(`SELECT p.id, t.xmin::text AS x, p.status FROM payments p
		JOIN payment_transitions t ON t.payment_id = p.id AND t.from_status IS NULL
		WHERE p.customer_id = ? AND p.method = 'auto_top_up' ORDER BY p.created_at, p.id`, customer).Scan(&tops).Error; err != nil {
		t.Fatal(err)
	}
	startedIn := map[string]string{}
	for _, p := range tops {
		if p.Status != "succeeded" {
			t.Errorf("top-up %s is %s", p.ID, p.Status)
		}
		if prev, dup := startedIn[p.X]; dup {
			t.Errorf("top-ups %s and %s started in one transaction", prev, p.ID)
		}
		startedIn[p.X] = p.ID
	}
	if len(tops) != limit {
		t.Errorf("%d top-ups, want the month's limit of %d", len(tops), limit)
	}
	var (
		inFlight  string
		started   int
		credited  = map[string]int{}
		spentKeys = map[string]int{}
		prevBal   int64
		lastX     string
	)
	for i, e := range entries {
		if e.BalanceAfter != prevBal+e.Amount {
			t.Errorf("entry %d (seq %d): balance_after %d after %d%+d", i, e.Seq, e.BalanceAfter, prevBal, e.Amount)
		}
		prevBal = e.BalanceAfter
		switch e.Kind {
		case "consume":
			if e.IdempotencyKey != nil {
				spentKeys[*e.IdempotencyKey]++
			}
			pay, starts := startedIn[e.X]
			if starts && (e.X == lastX || (i+1 < len(entries) && entries[i+1].X == e.X)) {
				t.Errorf("seq %d: the transaction that started top-up %s wrote several entries", e.Seq, pay)
			}
			must := inFlight == "" && started < limit && e.BalanceAfter < threshold
			switch {
			case starts && !must:
				t.Errorf("seq %d: top-up %s started at balance %d with %q in flight, %d started", e.Seq, pay, e.BalanceAfter, inFlight, started)
			case !starts && must:
				t.Errorf("seq %d: balance %d below %d with none in flight (%d started) and no top-up started", e.Seq, e.BalanceAfter, threshold, started)
			}
			if starts && must {
				inFlight = pay
				started++
			}
		case "grant":
			if e.PaymentID != nil {
				credited[*e.PaymentID]++
				if *e.PaymentID != inFlight {
					t.Errorf("seq %d: top-up %s credited while %q was in flight", e.Seq, *e.PaymentID, inFlight)
				}
				inFlight = ""
			}
		}
		lastX = e.X
	}
	for _, p := range tops {
		if credited[p.ID] != 1 {
			t.Errorf("top-up %s credited %d times", p.ID, credited[p.ID])
		}
	}
	if n := len(fake.Sandbox().Objects("payment_intent")); n != len(tops) {
		t.Errorf("Stripe holds %d PaymentIntents for %d top-ups", n, len(tops))
	}
	for key, a := range answers {
		want := 0
		if a.status == http.StatusOK {
			want = 1
		}
		if spentKeys[key] != want {
			t.Errorf("key %s answered %d, spent %d times", key, a.status, spentKeys[key])
		}
	}
	if t.Failed() {
		t.FailNow()
	}

	// Every key answers again what it did: a replay of its spend, or, after
	// a grant, a 402 retried spends once.
	grantOverHTTP(t, s1.service(t), customer, int64(refused*amount), "grant-more-"+customer)
	var retried sync.WaitGroup
	keys := make(chan string)
	for w := range 8 {
		retried.Go(func() {
			for key := range keys {
				a := answers[key]
				st, tx, replayed, err := hotTopUpConsume(clients[w%2], customer, key, amount)
				switch {
				case err != nil:
					t.Errorf("again %s: %v", key, err)
				case a.status == http.StatusOK && (st != http.StatusOK || !replayed || tx != a.tx):
					t.Errorf("again %s: %d %s replayed=%v, first %s", key, st, tx, replayed, a.tx)
				case a.status != http.StatusOK && (st != http.StatusOK || replayed):
					t.Errorf("retry of refused %s: %d replayed=%v", key, st, replayed)
				}
			}
		})
	}
	for key := range answers {
		keys <- key
	}
	close(keys)
	retried.Wait()
	if got, want := balanceOf(t, gdb, customer), int64(initial+limit*starterCredits+refused*amount-workers*perWorker*amount); got != want {
		t.Errorf("balance %d, want %d", got, want)
	}
	if n := len(autoTopUps(t, s1, customer)); n != limit {
		t.Errorf("%d top-ups after the retries", n)
	}
	evs.deliverNew(t, s1)
	assertInvariants(t, s1)
}

// Keys past the idempotency retention, or whose reservation's lease was
// abandoned, reused by consumes that land in one run: each is taken over
// as the full path takes it over (spent anew, not replayed, not in
// flight), whatever body it had.
func TestHotRunTakesOverExpiredAndAbandonedKeys(t *testing.T) {
	t.Parallel()
	s := startServer(t, baseEnv(t))
	const customer = "h78-keys"
	grantOverHTTP(t, s.service(t), customer, 100000, "grant-"+customer)
	gdb := openDB(t, s)
	c := hotClient(t, s.URL)
	// Old answers: spent keys, then aged or their lease lapsed.
	first := map[string]string{}
	for i := range 48 {
		if i >= 24 && i < 36 {
			continue
		}
		key := fmt.Sprintf("old-%02d", i)
		st, tx, _, err := hotTopUpConsume(c, customer, key, 5)
		if err != nil || st != http.StatusOK {
			t.Fatalf("consume %s: %d %v", key, st, err)
		}
		first[key] = tx
	}
	must := func(q string, args ...any) {
		if err := gdb.Exec(q, args...).Error; err != nil {
			t.Fatal(err)
		}
	}
	// 0-23: spent a day and more ago, past retention (the whole history
	// moved back, so verify sees the key's two spends a day apart); 16-23
	// come back with another body. 24-35: a reservation abandoned (never
	// completed, its lease over, no spend). 36-47: their keys fresh, replayed.
	// (The ledger is append-only: its trigger is off for this one change.)
	if err := gdb.Transaction(func(tx *gorm.DB) error {
		if err := tx.Exec(`SET LOCAL session_replication_role = replica`).Error; err != nil {
			return err
		}
		return tx.Exec(`UPDATE credit_ledger SET created_at = created_at - interval '25 hours' WHERE customer_id = ?`, customer).Error
	}); err != nil {
		t.Fatal(err)
	}
	must(`UPDATE credit_grants SET created_at = created_at - interval '25 hours' WHERE customer_id = ?`, customer)
	must(`UPDATE credit_balances SET updated_at = updated_at - interval '25 hours' WHERE customer_id = ?`, customer)
	must(`UPDATE idempotency_keys SET created_at = now() - interval '25 hours', completed_at = now() - interval '25 hours'
		WHERE key >= 'old-00' AND key <= 'old-23'`)
	for i := 24; i < 36; i++ {
		must(`INSERT INTO idempotency_keys (scope, key, request_hash, holder, created_at, lease_expires_at)
			SELECT scope, ?, '\\xdead'::bytea, 'rsv_dead', now() - interval '10 minutes', now() - interval '1 minute'
			FROM idempotency_keys WHERE key = 'old-00'`, fmt.Sprintf("old-%02d", i))
	}
	type task struct {
		key    string
		amount int64
	}
	// The old keys among 480 new ones, 64 clients at once, twice over: the
	// old keys land in runs behind other consumes.
	var tasks []task
	for i := range 48 {
		a := int64(5)
		if i >= 16 && i < 24 {
			a = 7
		}
		tasks = append(tasks, task{fmt.Sprintf("old-%02d", i), a})
	}
	for i := range 480 {
		tasks = append(tasks, task{fmt.Sprintf("new-%03d", i), 3})
	}
	rand.Shuffle(len(tasks), func(i, j int) { tasks[i], tasks[j] = tasks[j], tasks[i] })
	type got struct {
		st       int
		tx       string
		replayed bool
	}
	var (
		mu  sync.Mutex
		res = map[string][]got{}
		wg  sync.WaitGroup
	)
	for range 2 {
		queue := make(chan task)
		for range 64 {
			wg.Go(func() {
				for k := range queue {
					st, tx, rp, err := hotTopUpConsume(c, customer, k.key, k.amount)
					if err != nil {
						t.Errorf("%s: %v", k.key, err)
						continue
					}
					mu.Lock()
					res[k.key] = append(res[k.key], got{st, tx, rp})
					mu.Unlock()
				}
			})
		}
		for _, k := range tasks {
			queue <- k
		}
		close(queue)
		wg.Wait()
	}
	for i := range 480 {
		key := fmt.Sprintf("new-%03d", i)
		rs := res[key]
		if len(rs) != 2 || rs[0].st != http.StatusOK || rs[0].replayed || rs[1].st != http.StatusOK || !rs[1].replayed || rs[0].tx != rs[1].tx {
			t.Errorf("%s: %+v", key, rs)
		}
	}
	runs := countRows(t, gdb, `SELECT count(*) FROM (SELECT xmin::text FROM credit_ledger WHERE customer_id = ? AND kind = 'consume'
		GROUP BY 1 HAVING count(*) > 1) r`, customer)
	t.Logf("%d transactions wrote several consumes of the customer", runs)
	for i := range 48 {
		key := fmt.Sprintf("old-%02d", i)
		rs := res[key]
		if len(rs) != 2 {
			t.Fatalf("%s: %d answers", key, len(rs))
		}
		spent := countRows(t, gdb, `SELECT count(*) FROM credit_ledger WHERE customer_id = ? AND idempotency_key = ?`, customer, key)
		fresh := 0
		for _, r := range rs {
			if r.st != http.StatusOK {
				t.Errorf("%s: %d", key, r.st)
				continue
			}
			if !r.replayed {
				fresh++
			}
		}
		if i < 36 {
			// Taken over once, the other answer its replay.
			if want := map[bool]int64{true: 2, false: 1}[i < 24]; fresh != 1 || spent != want || rs[0].tx == first[key] || rs[0].tx != rs[1].tx {
				t.Errorf("%s (taken over): answers %+v, first %s, %d entries", key, rs, first[key], spent)
			}
		} else if fresh != 0 || spent != 1 || rs[0].tx != first[key] || rs[1].tx != first[key] {
			t.Errorf("%s (fresh): answers %+v, first %s, %d entries", key, rs, first[key], spent)
		}
	}
	if n := countRows(t, gdb, `SELECT count(*) FROM idempotency_keys WHERE completed_at IS NULL AND (key LIKE 'old-%' OR key LIKE 'new-%')`); n != 0 {
		t.Errorf("%d keys left without an answer", n)
	}
	for k := range 16 {
		key := fmt.Sprintf("old-%02d", k+16)
		var hash string
		if err := gdb.Raw(`SELECT encode(result, 'escape') FROM idempotency_keys WHERE key = ?`, key).Scan(&hash).Error; err != nil {
			t.Fatal(err)
		}
		var a struct{ Amount int64 }
		if err := json.Unmarshal([]byte(hash), &a); err != nil {
			t.Fatal(err)
		}
		want := int64(5)
		if k < 8 {
			want = 7
		}
		if a.Amount != want {
			t.Errorf("%s stored an answer for %d, want %d", key, a.Amount, want)
		}
	}
	mustVerifyClean(t, s)
}
