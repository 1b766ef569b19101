package credits

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tallybilling/tally/internal/config"
	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/db/dbtest"
	"github.com/tallybilling/tally/internal/errs"
)

// A consume's key held by another transaction that then waits for the
// customer's balance row (db.Once's order: the key, then the money lock):
// a copy of the request on a second server, or another endpoint sent the
// same Idempotency-Key (same scope). The batch must not hold the balance
// row while it waits for that key, or the two deadlock: PostgreSQL breaks
// the cycle only after deadlock_timeout, by aborting the batch (it waited
// first), so every other customer's consume in it waits a second and
// then goes the full path. An end user can do this at will with its own
// keys (scope user:<id>).
func TestABatchDoesNotHoldTheBalanceWhileWaitingForAKey(t *testing.T) {
	t.Parallel()
	// x's consume is one the set applies (it then waits for the key in
	// its own key statement), or one it locks and leaves to the loop (the
	// first grant does not cover it: the loop claims the key with the
	// balance row still held).
	// takeover: the key is there already, past retention, and the other
	// transaction takes it over (db.Once locks its row, then the balance
	// row): the loop's read of the key waits for that row lock.
	for _, c := range []struct{ split, takeover bool }{{false, false}, {true, false}, {false, true}} {
		t.Run(fmt.Sprintf("split=%v,takeover=%v", c.split, c.takeover), func(t *testing.T) {
			t.Parallel()
			testNoDeadlockWithKeyHolder(t, c.split, c.takeover)
		})
	}
}

func testNoDeadlockWithKeyHolder(t *testing.T, split, takeover bool) {
	s, gdb := batchService(t)
	batchGrant(t, s, "x", 100)
	if split {
		in := GrantInput{CustomerID: "x", Amount: 2, Reason: "first", Source: SourceService, Priority: ptr(1)}
		b, _ := json.Marshal(in)
		if _, _, err := s.Grant(context.Background(), in, db.IdempotencyKey{Scope: "customer:x", Key: "g-first", RequestHash: db.HashRequest(b)}); err != nil {
			t.Fatal(err)
		}
	}
	batchGrant(t, s, "y", 100)
	in := ConsumeInput{CustomerID: "x", Amount: 3, Reason: "api call"}
	key := batchKey("x", "k", in)

	// The other transaction: it claims the key as db.Once does.
	other := gdb.Begin()
	defer other.Rollback()
	if err := other.Exec(`SET LOCAL lock_timeout = '5s'`).Error; err != nil {
		t.Fatal(err)
	}
	if takeover {
		if err := gdb.Exec(`INSERT INTO idempotency_keys (scope, key, request_hash, lease_expires_at, result, completed_at, created_at)
			VALUES (?, ?, ?, now() - interval '25 hours', '{}', now() - interval '25 hours', now() - interval '25 hours')`,
			key.Scope, key.Key, key.RequestHash).Error; err != nil {
			t.Fatal(err)
		}
		// db.Once's claim reads the row FOR UPDATE, then takes it over.
		if err := other.Exec(`SELECT 1 FROM idempotency_keys WHERE scope = ? AND key = ? FOR UPDATE`, key.Scope, key.Key).Error; err != nil {
			t.Fatal(err)
		}
	} else if err := other.Exec(`INSERT INTO idempotency_keys (scope, key, request_hash, lease_expires_at) VALUES (?, ?, ?, now() + interval '2 minutes')`,
		key.Scope, key.Key, key.RequestHash).Error; err != nil {
		t.Fatal(err)
	}
	// The batch: x's consume, and y's beside it.
	cx := s.consumeCall(context.Background(), in, key, "{}")
	iny := ConsumeInput{CustomerID: "y", Amount: 2, Reason: "api call"}
	cy := s.consumeCall(context.Background(), iny, batchKey("y", "k", iny), "{}")
	ran := make(chan struct{})
	go func() { s.batch.run([]*batchCall{cx, cy}); close(ran) }()
	// Until the batch waits for the key, or (a poll that missed the
	// batch's 50 ms wait, under a loaded suite) the full path it deferred
	// x's consume to does: the only other transaction here waits for nothing.
	waitFor(t, func() bool {
		var n int64
		gdb.Raw(`SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'`).Scan(&n)
		return n > 0
	})
	// The other transaction now takes x's money lock, as lockAccount does.
	start := time.Now()
	var bal int64
	if err := other.Raw(`SELECT balance FROM credit_balances WHERE customer_id = 'x' FOR UPDATE`).Scan(&bal).Error; err != nil {
		t.Fatalf("the other transaction could not take the balance row: %v", err)
	}
	// It completes the key as a consume of its own would, and commits.
	if err := other.Exec(`UPDATE idempotency_keys SET result = ?, created_at = now(), completed_at = now() WHERE scope = ? AND key = ?`,
		[]byte(`{"transaction_id":"ctx_other","amount":3,"balance":97}`), key.Scope, key.Key).Error; err != nil {
		t.Fatal(err)
	}
	if err := other.Commit().Error; err != nil {
		t.Fatal(err)
	}
	<-ran
	waited := time.Since(start)
	rx, ry := wait(cx), wait(cy)
	if rx.err != nil || !rx.replayed || rx.res.TransactionID != "ctx_other" || balanceOf(t, gdb, "x") != 100+map[bool]int64{true: 2}[split] {
		t.Errorf("x answered %+v, want the other transaction's answer replayed", rx)
	}
	if ry.err != nil || ry.replayed || ry.res.Balance != 98 {
		t.Errorf("y answered %+v", ry)
	}
	// A deadlock costs PostgreSQL's deadlock_timeout (1 s) before one side
	// is aborted (the batch then falls back, or the other transaction
	// fails above). Without one, the wait is the batch's 50 ms lock timeout
	// and the two transactions' work: up to about half a second under the
	// whole suite on a slow two-core machine (it took 520 ms once there
	// with a 500 ms bound and nothing fallen back).
	if n := s.batch.fellBack.Load(); n != 0 || waited > 900*time.Millisecond {
		t.Errorf("the batch fell back for %d consumes after %v: it deadlocked with the key's holder", n, waited)
	}
}

// The same request sent to two servers: each server's batch claims the
// keys in its own arrival order and keeps every key it claimed until it
// commits, with no balance row of the waiting item held. Here the other
// server's transaction holds x's first key and, next, claims y's, which
// this batch's set has already written; this batch, meanwhile, claims x's
// keys (two consumes of x: a run, which the loop applies). Waiting for x's
// key without a bound was a deadlock (migration 00055): PostgreSQL failed
// the whole batch after deadlock_timeout. The batch must give up x's wait,
// keep y's consume, and leave x's to the full path.
func TestABatchDoesNotWaitForAKeyWhileHoldingOthers(t *testing.T) {
	t.Parallel()
	s, gdb := batchService(t)
	batchGrant(t, s, "x", 100)
	batchGrant(t, s, "y", 100)
	iny := ConsumeInput{CustomerID: "y", Amount: 2, Reason: "api call"}
	ky := batchKey("y", "k", iny)
	inx := ConsumeInput{CustomerID: "x", Amount: 3, Reason: "api call"}
	kx1, kx2 := batchKey("x", "k1", inx), batchKey("x", "k2", inx)

	// The other server's transaction: x's first key, claimed as a batch
	// (or db.Once) claims it.
	other := gdb.Begin()
	defer other.Rollback()
	if err := other.Exec(`SET LOCAL lock_timeout = '5s'`).Error; err != nil {
		t.Fatal(err)
	}
	if err := other.Exec(`INSERT INTO idempotency_keys (scope, key, request_hash, lease_expires_at) VALUES (?, ?, ?, now() + interval '2 minutes')`,
		kx1.Scope, kx1.Key, kx1.RequestHash).Error; err != nil {
		t.Fatal(err)
	}
	cy := s.consumeCall(context.Background(), iny, ky, "{}")
	cx1 := s.consumeCall(context.Background(), inx, kx1, "{}")
	cx2 := s.consumeCall(context.Background(), inx, kx2, "{}")
	ran := make(chan struct{})
	go func() { s.batch.run([]*batchCall{cy, cx1, cx2}); close(ran) }()
	// Until the batch waits for x's first key or, having waited its 50 ms
	// already, its full path does (run returns only after it).
	waitFor(t, func() bool {
		var n int64
		gdb.Raw(`SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'`).Scan(&n)
		return n > 0
	})
	// The other transaction now claims y's key, as the other server's
	// batch claims its next item's.
	start := time.Now()
	if err := other.Exec(`INSERT INTO idempotency_keys (scope, key, request_hash, lease_expires_at) VALUES (?, ?, ?, now() + interval '2 minutes') ON CONFLICT DO NOTHING`,
		ky.Scope, ky.Key, ky.RequestHash).Error; err != nil {
		t.Fatalf("the other transaction could not claim y's key: %v", err)
	}
	if err := other.Exec(`UPDATE idempotency_keys SET result = ?, completed_at = now() WHERE scope = ? AND key = ?`,
		[]byte(`{"transaction_id":"ctx_other","amount":3,"balance":97}`), kx1.Scope, kx1.Key).Error; err != nil {
		t.Fatal(err)
	}
	if err := other.Commit().Error; err != nil {
		t.Fatal(err)
	}
	<-ran
	waited := time.Since(start)
	ry, rx1, rx2 := wait(cy), wait(cx1), wait(cx2)
	if ry.err != nil || ry.replayed || ry.res.Balance != 98 {
		t.Errorf("y answered %+v (%v), want its consume applied", ry, ry.err)
	}
	if rx1.err != nil || !rx1.replayed || rx1.res.TransactionID != "ctx_other" {
		t.Errorf("x's first key answered %+v (%v), want the other transaction's answer replayed", rx1, rx1.err)
	}
	if rx2.err != nil || rx2.replayed || rx2.res.Balance != 97 {
		t.Errorf("x's second key answered %+v (%v), want its consume applied", rx2, rx2.err)
	}
	if b := balanceOf(t, gdb, "x"); b != 97 {
		t.Errorf("x's balance %d, want 97", b)
	}
	// As above: a deadlock costs deadlock_timeout (1 s); without one this
	// is the batch's 50 ms and the work of both.
	if n := s.batch.fellBack.Load(); n != 0 || waited > 900*time.Millisecond {
		t.Errorf("the batch fell back for %d consumes after %v: it deadlocked with the other server's keys", n, waited)
	}
}

// Two servers on one database (two Services, two batchers): each key sent
// twice to each at once, some customers' first grant too small for the
// amount (the set locks them and leaves them to the loop), and on some
// customers a grant sent with a consume's key (the same scope). Each key
// takes effect once, as a consume or as the grant; every copy of the
// winner answers the same; the books agree.
func TestTwoServersOnOneDatabaseApplyEachKeyOnce(t *testing.T) {
	t.Parallel()
	gdb := dbtest.New(t)
	s1 := New(Options{DB: gdb, Config: config.Default().Credits})
	s2 := New(Options{DB: gdb, Config: config.Default().Credits})
	const customers, keys = 30, 4
	for c := range customers {
		customer := fmt.Sprint("two", c)
		batchGrant(t, s1, customer, 100)
		if c%2 == 1 {
			in := GrantInput{CustomerID: customer, Amount: 1, Reason: "first", Source: SourceService, Priority: ptr(1)}
			b, _ := json.Marshal(in)
			if _, _, err := s1.Grant(context.Background(), in, db.IdempotencyKey{Scope: "customer:" + customer, Key: "g-first", RequestHash: db.HashRequest(b)}); err != nil {
				t.Fatal(err)
			}
		}
	}
	type answer struct {
		key      string
		res      ConsumeResult
		replayed bool
		err      error
		grant    bool
	}
	out := make(chan answer, customers*keys*5)
	var wg sync.WaitGroup
	for k := range keys {
		for c := range customers {
			customer := fmt.Sprint("two", c)
			key := fmt.Sprint("k", k)
			for i := range 4 {
				s := []*Service{s1, s2}[i%2]
				wg.Go(func() {
					in := ConsumeInput{CustomerID: customer, Amount: 3, Reason: "api call"}
					res, replayed, err := s.Consume(context.Background(), in, batchKey(customer, key, in))
					out <- answer{key: customer + "/" + key, res: res, replayed: replayed, err: err}
				})
			}
			if k == 1 && c%3 == 0 {
				wg.Go(func() {
					in := GrantInput{CustomerID: customer, Amount: 5, Reason: "same key", Source: SourceService}
					b, _ := json.Marshal(in)
					_, replayed, err := s2.Grant(context.Background(), in, db.IdempotencyKey{Scope: "customer:" + customer, Key: key, RequestHash: db.HashRequest(b)})
					out <- answer{key: customer + "/" + key, replayed: replayed, err: err, grant: true}
				})
			}
		}
	}
	start := time.Now()
	wg.Wait()
	close(out)
	byKey := map[string][]answer{}
	for a := range out {
		byKey[a.key] = append(byKey[a.key], a)
	}
	spent, granted := map[string]int64{}, map[string]int64{}
	for k, as := range byKey {
		var winner *answer
		for i, a := range as {
			if a.err == nil && !a.replayed {
				if winner != nil {
					t.Fatalf("%s took effect twice: %+v and %+v", k, *winner, a)
				}
				winner = &as[i]
			}
		}
		if winner == nil {
			t.Fatalf("%s took no effect: %+v", k, as)
		}
		for _, a := range as {
			e, _ := errs.As(a.err)
			switch {
			case a.grant == winner.grant:
				if a.err != nil || a.res != winner.res {
					t.Errorf("%s: a copy answered %+v, the winner %+v", k, a, *winner)
				}
			case e == nil || e.Code != errs.IdempotencyKeyReused:
				t.Errorf("%s: the other operation answered %+v", k, a)
			}
		}
		c, _, _ := strings.Cut(k, "/")
		if winner.grant {
			granted[c] += 5
		} else {
			spent[c] += 3
		}
	}
	for c := range customers {
		customer := fmt.Sprint("two", c)
		want := 100 + granted[customer] - spent[customer]
		if c%2 == 1 {
			want++
		}
		if b := balanceOf(t, gdb, customer); b != want {
			t.Errorf("%s: balance %d, want %d", customer, b, want)
		}
	}
	mustVerifyDB(t, gdb)
	t.Logf("%v; fell back: %d and %d, deferred: %d and %d", time.Since(start),
		s1.batch.fellBack.Load(), s2.batch.fellBack.Load(), s1.batch.deferred.Load(), s2.batch.deferred.Load())
}
