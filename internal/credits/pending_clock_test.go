package credits_test

import (
	"slices"
	"testing"
	"time"

	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/credits"
	"github.com/tallybilling/tally/internal/customers"
	"github.com/tallybilling/tally/internal/db/dbtest"
)

// What is pending (scheduled credits not effective yet) is decided at the
// time the change is made, a.now: the clock read once the balance row is
// locked and never earlier than the row's last change. A replica whose
// clock lags another one's makes its changes at the row's time, so a grant
// whose effective_at that time has passed is spendable there (the consume
// draws from it), and it must not count as pending in the available
// balance that the low-balance thresholds (and the automatic top-up)
// compare. Found by helper-70 running two servers on one database, one
// clock 2 s ahead: a consume from 102 to 96 available crossed the
// threshold 100 and fired nothing, because the lagging server counted a
// grant that had become effective as pending.
func TestPendingIsDecidedAtTheTimeOfTheChange(t *testing.T) {
	t.Parallel()
	f := newFixture(t, defaultCfg())
	off := int64(0)
	list := []int64{200, 100}
	if _, _, err := customers.New(customers.Options{DB: f.db, Now: f.clock.Now}).Upsert(f.ctx, customers.UpsertInput{
		ID: "lag", LowBalanceThreshold: &off, LowBalanceThresholds: &list,
	}); err != nil {
		t.Fatal(err)
	}
	t0 := f.clock.Now()
	f.grant("lag", 150, nil)
	at := t0.Add(30 * time.Minute)
	in := credits.GrantInput{CustomerID: "lag", Amount: 100, Reason: "scheduled", Source: credits.SourceService, EffectiveAt: &at}
	if _, _, err := f.svc.Grant(f.ctx, in, key("lag", freshKey(), in)); err != nil {
		t.Fatal(err)
	}
	// A replica whose clock is an hour ahead changes the account: its time
	// is now the row's, and the scheduled grant is effective at it.
	ahead := credits.New(credits.Options{DB: f.db, Config: f.cfg, Now: func() time.Time { return f.clock.Now().Add(time.Hour) }, Logger: dbtest.Logger(t)})
	cin := credits.ConsumeInput{CustomerID: "lag", Amount: 1, Reason: "api call"}
	if _, _, err := ahead.Consume(f.ctx, cin, key("lag", freshKey(), cin)); err != nil {
		t.Fatal(err)
	}
	// 249 available. The lagging replica (clock t0) spends 100: 149 left,
	// below 200 and not below 100.
	r := f.mustConsume("lag", 100)
	if r.Balance != 149 {
		t.Fatalf("balance after the consume %d, want 149", r.Balance)
	}
	got := lowBalanceNotices(t, f, "lag")
	var ths []int64
	for _, g := range got {
		ths = append(ths, g.Threshold)
		if g.Available != 149 {
			t.Errorf("credits.low_balance for %d says %d available, want 149 (nothing is pending at the consume's time)", g.Threshold, g.Available)
		}
	}
	if !slices.Equal(ths, []int64{200}) {
		t.Fatalf("credits.low_balance fired for %v, want [200] (249 -> 149 available)", ths)
	}
	f.mustVerify()
}

// A change that waited for the balance row's lock reads what is pending
// after the wait: a scheduled grant committed by the transaction it waited
// for is pending at its time. (The lock's statement reads the locked row
// as it is once the wait is over, but its other reads from the snapshot
// it began with, which did not have the grant.) Found by helper-70 under
// load: a consume from 100 to 87 available crossed the threshold 100 and
// fired nothing.
func TestPendingIsReadAfterTheWaitForTheLock(t *testing.T) {
	t.Parallel()
	f := newFixture(t, defaultCfg())
	off := int64(0)
	list := []int64{100}
	if _, _, err := customers.New(customers.Options{DB: f.db, Now: f.clock.Now}).Upsert(f.ctx, customers.UpsertInput{
		ID: "wait", LowBalanceThreshold: &off, LowBalanceThresholds: &list,
	}); err != nil {
		t.Fatal(err)
	}
	f.grant("wait", 150, nil)
	at := f.clock.Now().Add(time.Hour)
	tx := f.db.Begin()
	defer tx.Rollback()
	if _, err := credits.Grant(f.ctx, tx, f.clock.Now, credits.GrantInput{CustomerID: "wait", Amount: 40, Reason: "scheduled", Source: credits.SourceService, EffectiveAt: &at}); err != nil {
		t.Fatal(err)
	}
	// The consume waits for the balance row (the batch defers it to the
	// full path, which waits); then the grant commits.
	consumeWhileLocked(t, f, tx, "wait", 60)
	// 150 available (40 pending) -> 90.
	got := lowBalanceNotices(t, f, "wait")
	if len(got) != 1 || got[0].Threshold != 100 || got[0].Available != 90 {
		t.Fatalf("credits.low_balance %+v, want one for 100 with 90 available", got)
	}
	f.mustVerify()
}

// lowBalanceNotice is a credits.low_balance event's threshold and the
// available balance it reported.
type lowBalanceNotice struct {
	Threshold int64
	Available int64
}

// lowBalanceNotices returns customer's low-balance notices, oldest first.
func lowBalanceNotices(t *testing.T, f *fixture, customer string) []lowBalanceNotice {
	t.Helper()
	var got []lowBalanceNotice
	if err := f.db.Raw(`SELECT (data->>'threshold')::bigint AS threshold, (data->>'available')::bigint AS available
		FROM events WHERE type = 'credits.low_balance' AND customer_id = ? ORDER BY id`, customer).Scan(&got).Error; err != nil {
		t.Fatal(err)
	}
	return got
}

// consumeWhileLocked consumes amount of customer's credits while tx, which
// holds the customer's balance row, is open: once the consume waits for
// that row, tx commits, and the consume goes on after the wait.
func consumeWhileLocked(t *testing.T, f *fixture, tx *gorm.DB, customer string, amount int64) {
	t.Helper()
	done := make(chan error, 1)
	go func() {
		_, err := f.consume(customer, amount)
		done <- err
	}()
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
}
