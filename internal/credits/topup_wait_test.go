package credits_test

import (
	"slices"
	"testing"
	"time"

	"github.com/tallybilling/tally/internal/credits"
)

// A change that waited for the balance row's lock decides on an automatic
// top-up from the settings as they are once the wait is over. A top-up's
// confirmation grants its credits (taking the balance lock) and clears the
// in-flight payment in one transaction; a consume that waited for it and
// still leaves too little available must start the next top-up, as it
// would have run after it. (The lock's statement reads the locked row as
// it is once the wait is over, but the settings from the snapshot it
// began with, where a top-up was still in flight: no top-up started,
// though 70 were left below the threshold of 100.)
func TestTopUpIsDecidedAfterTheWaitForTheLock(t *testing.T) {
	t.Parallel()
	f := newFixture(t, defaultCfg())
	calls := f.withTopUp("tuwait", 100)
	if err := f.db.Exec(`UPDATE auto_top_up_settings SET in_flight_payment_id = 'pay_inflight' WHERE customer_id = 'tuwait'`).Error; err != nil {
		t.Fatal(err)
	}
	f.grant("tuwait", 150, nil)
	// The top-up's confirmation: its credits, and nothing in flight any more.
	tx := f.db.Begin()
	defer tx.Rollback()
	if _, err := credits.Grant(f.ctx, tx, f.clock.Now, credits.GrantInput{CustomerID: "tuwait", Amount: 40, Reason: "automatic top-up", Source: credits.SourcePurchase, PaymentID: "pay_inflight"}); err != nil {
		t.Fatal(err)
	}
	if err := tx.Exec(`UPDATE auto_top_up_settings SET in_flight_payment_id = NULL WHERE customer_id = 'tuwait'`).Error; err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		_, err := f.consume("tuwait", 120)
		done <- err
	}()
	// The consume waits for the balance row (the batch defers it to the
	// full path, which waits); then the confirmation commits.
	deadline := time.Now().Add(10 * time.Second)
	for {
		var n int64
		if err := f.db.Raw(`SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'`).Scan(&n).Error; err != nil {
			t.Fatal(err)
		}
		if n > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the consume never waited for the lock")
		}
		time.Sleep(5 * time.Millisecond)
	}
	if err := tx.Commit().Error; err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	// 190 available -> 70, below 100, nothing in flight: one top-up.
	if got := calls.got(); !slices.Equal(got, []int64{70}) {
		t.Fatalf("top-up trigger calls %v, want [70] (190 -> 70 available, below 100, nothing in flight once the lock was held)", got)
	}
	f.mustVerify()
}
