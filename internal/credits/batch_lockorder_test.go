package credits

import (
	"context"
	"encoding/json"
	"fmt"
	"testing"
	"time"

	"github.com/tallybilling/tally/internal/db"
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
	for _, split := range []bool{false, true} {
		t.Run(fmt.Sprint("split=", split), func(t *testing.T) {
			t.Parallel()
			testNoDeadlockWithKeyHolder(t, split)
		})
	}
}

func testNoDeadlockWithKeyHolder(t *testing.T, split bool) {
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
	if err := other.Exec(`INSERT INTO idempotency_keys (scope, key, request_hash, lease_expires_at) VALUES (?, ?, ?, now() + interval '2 minutes')`,
		key.Scope, key.Key, key.RequestHash).Error; err != nil {
		t.Fatal(err)
	}
	// The batch: x's consume, and y's beside it.
	cx := s.consumeCall(context.Background(), in, key, "{}")
	iny := ConsumeInput{CustomerID: "y", Amount: 2, Reason: "api call"}
	cy := s.consumeCall(context.Background(), iny, batchKey("y", "k", iny), "{}")
	ran := make(chan struct{})
	go func() { s.batch.run([]*batchCall{cx, cy}); close(ran) }()
	// Until the batch waits for the key.
	waitFor(t, func() bool {
		var n int64
		gdb.Raw(`SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock' AND query LIKE '%credits_consume_batch%'`).Scan(&n)
		return n > 0
	})
	// The other transaction now takes x's money lock, as lockAccount does.
	start := time.Now()
	var bal int64
	if err := other.Raw(`SELECT balance FROM credit_balances WHERE customer_id = 'x' FOR UPDATE`).Scan(&bal).Error; err != nil {
		t.Fatalf("the other transaction could not take the balance row: %v", err)
	}
	// It completes the key as a consume of its own would, and commits.
	if err := other.Exec(`UPDATE idempotency_keys SET result = ?, completed_at = now() WHERE scope = ? AND key = ?`,
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
	if n := s.batch.fellBack.Load(); n != 0 || waited > 500*time.Millisecond {
		t.Errorf("the batch fell back for %d consumes after %v: it deadlocked with the key's holder", n, waited)
	}
}
