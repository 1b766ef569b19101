package credits_test

import (
	"context"
	"sync"
	"testing"
	"time"

	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/credits"
	"github.com/tallybilling/tally/internal/db/dbtest"
)

// topUpCalls records what the automatic top-up trigger was called with.
type topUpCalls struct {
	mu        sync.Mutex
	available []int64
}

func (c *topUpCalls) start(_ context.Context, _ *gorm.DB, _ string, available int64, _ time.Time) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.available = append(c.available, available)
	return nil
}

func (c *topUpCalls) got() []int64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]int64(nil), c.available...)
}

// withTopUp is f with a service and a sweeper whose trigger records its
// calls, and customerID's automatic top-up on below threshold with a valid
// card (rows of internal/payments, which the lock statement reads). The
// recorder never marks a top-up in flight, so every lowering change that
// leaves too little available calls it once.
func (f *fixture) withTopUp(customerID string, threshold int64) *topUpCalls {
	f.t.Helper()
	calls := &topUpCalls{}
	logger := dbtest.Logger(f.t)
	f.svc = credits.New(credits.Options{DB: f.db, Config: f.cfg, Now: f.clock.Now, Logger: logger, TopUp: calls.start})
	f.sweep = credits.NewSweeper(credits.SweeperOptions{DB: f.db, Config: f.cfg, Now: f.clock.Now, Logger: logger, TopUp: calls.start})
	now := f.clock.Now()
	if err := f.db.Exec(`INSERT INTO customers (id, metadata, created_at, updated_at) VALUES (?, '{}', ?, ?) ON CONFLICT DO NOTHING`,
		customerID, now, now).Error; err != nil {
		f.t.Fatal(err)
	}
	if err := f.db.Exec(`INSERT INTO customer_payment_methods (customer_id, stripe_payment_method_id, stripe_customer_id, brand, last4, exp_month, exp_year, updated_at)
		VALUES (?, 'pm_test', 'cus_test', 'visa', '4242', 12, ?, ?)`, customerID, now.Year()+2, now).Error; err != nil {
		f.t.Fatal(err)
	}
	if err := f.db.Exec(`INSERT INTO auto_top_up_settings (customer_id, enabled, threshold, item, updated_at) VALUES (?, true, ?, 'starter', ?)`,
		customerID, threshold, now).Error; err != nil {
		f.t.Fatal(err)
	}
	return calls
}

// Every change that lowers what is available runs the top-up trigger, with
// what is available (balance less held and pending), not the balance: a
// consume, a hold, a capture, a negative adjustment, a void, an expiry.
// A capture that leaves too little available starts a top-up.
func TestTopUpTriggerRunsOnEveryLoweringPathWithAvailable(t *testing.T) {
	t.Parallel()
	f := newFixture(t, defaultCfg())
	calls := f.withTopUp("lower", 10_000)
	expires := f.clock.Now().Add(time.Hour)
	f.grant("lower", 1000, nil)
	// Drawn last (priority 100), so it still has its 50 when it expires.
	f.grantWith(credits.GrantInput{CustomerID: "lower", Amount: 50, ExpiresAt: &expires, Priority: ptr(100)})
	voidMe := f.grant("lower", 40, nil)
	// Scheduled credits are pending: not available, so never counted.
	f.grantWith(credits.GrantInput{CustomerID: "lower", Amount: 5000, Reason: "next month", Source: credits.SourceService,
		EffectiveAt: ptr(f.clock.Now().Add(30 * 24 * time.Hour))})
	if got := calls.got(); len(got) != 0 {
		t.Fatalf("grants called the trigger: %v", got)
	}
	want := []int64{}
	check := func(step string, available int64) {
		t.Helper()
		want = append(want, available)
		got := calls.got()
		if len(got) != len(want) || got[len(got)-1] != available {
			t.Fatalf("after %s: trigger calls %v, want %v", step, got, want)
		}
		if b := f.balance("lower"); b.Available != available {
			t.Fatalf("after %s: balance answer has %d available, the trigger saw %d", step, b.Available, available)
		}
	}
	f.mustConsume("lower", 10) // 1080 available
	check("consume", 1080)
	h := f.mustHold("lower", 300, time.Hour) // 780
	check("hold", 780)
	if _, _, err := f.capture("lower", h.HoldID, ptr(int64(200)), freshKey()); err != nil {
		t.Fatal(err)
	}
	check("capture", 880) // 100 of the hold came back
	adj := credits.AdjustInput{CustomerID: "lower", Amount: -30, Reason: "correction"}
	if _, _, err := f.svc.Adjust(f.ctx, adj, key("lower", freshKey(), adj)); err != nil {
		t.Fatal(err)
	}
	check("negative adjustment", 850)
	void := credits.VoidInput{CustomerID: "lower", GrantID: voidMe.GrantID, Reason: "mistake"}
	if _, _, err := f.svc.Void(f.ctx, void, key("lower", freshKey(), void)); err != nil {
		t.Fatal(err)
	}
	check("void", 810)
	f.clock.Set(expires.Add(time.Minute))
	if n, err := f.sweep.SweepOnce(f.ctx); err != nil || n == 0 {
		t.Fatalf("sweep: %d, %v", n, err)
	}
	check("expiry", 760)
	// A release gives credits back: nothing lowered, no call.
	h2 := f.mustHold("lower", 60, time.Hour)
	check("hold", 700)
	if _, err := f.release("lower", h2.HoldID); err != nil {
		t.Fatal(err)
	}
	if got := calls.got(); len(got) != len(want) {
		t.Fatalf("a release called the trigger: %v", got)
	}
	f.mustVerify()
}

// A capture is what leaves too little available when the threshold was
// raised while the hold was out: it starts the top-up, exactly once, and the
// consumption rollup counts what it spent.
func TestCaptureBelowTopUpThresholdStartsTopUp(t *testing.T) {
	t.Parallel()
	f := newFixture(t, defaultCfg())
	calls := f.withTopUp("cap", 1)
	f.grant("cap", 1000, nil)
	h := f.mustHold("cap", 800, time.Hour)
	if got := calls.got(); len(got) != 0 {
		t.Fatalf("trigger called above the threshold: %v", got)
	}
	if err := f.db.Exec(`UPDATE auto_top_up_settings SET threshold = 500 WHERE customer_id = 'cap'`).Error; err != nil {
		t.Fatal(err)
	}
	if _, _, err := f.capture("cap", h.HoldID, nil, freshKey()); err != nil {
		t.Fatal(err)
	}
	if got := calls.got(); len(got) != 1 || got[0] != 200 {
		t.Fatalf("trigger calls after the capture %v, want [200]", got)
	}
	if n := f.count(`SELECT COALESCE(sum(consumed), 0) FROM credit_consumption_daily WHERE customer_id = 'cap'`); n != 800 {
		t.Fatalf("rollup %d, want the 800 captured", n)
	}
	f.mustVerify()
}

// credits.low_balance compares what is available: held credits take it
// below the threshold although the balance stays above it, whether a new
// hold or a consume beside holds crosses it.
func TestLowBalanceComparesAvailable(t *testing.T) {
	t.Parallel()
	f := newFixture(t, defaultCfg())
	f.withTopUp("avail", 1)
	if err := f.db.Exec(`UPDATE customers SET low_balance_threshold = 500, low_balance_thresholds = '{700}' WHERE id = 'avail'`).Error; err != nil {
		t.Fatal(err)
	}
	f.grant("avail", 1000, nil)
	f.mustHold("avail", 450, time.Hour) // available 550: below 700
	f.mustConsume("avail", 100)         // balance 900, available 450: below 500
	var got []struct{ Threshold, Balance, Available int64 }
	if err := f.db.Raw(`SELECT (data->>'threshold')::bigint AS threshold, (data->>'balance')::bigint AS balance,
		(data->>'available')::bigint AS available FROM events WHERE type = 'credits.low_balance' ORDER BY id`).Scan(&got).Error; err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || got[0].Threshold != 700 || got[0].Available != 550 || got[0].Balance != 1000 ||
		got[1].Threshold != 500 || got[1].Available != 450 || got[1].Balance != 900 {
		t.Fatalf("credits.low_balance events %+v", got)
	}
	f.mustVerify()
}

// A new hold that takes what is available below the customer's threshold
// fires credits.low_balance once; its release re-arms it.
func TestHoldCrossingTheThresholdFiresLowBalance(t *testing.T) {
	t.Parallel()
	f := newFixture(t, defaultCfg())
	f.withTopUp("hold-x", 1)
	if err := f.db.Exec(`UPDATE customers SET low_balance_threshold = 500 WHERE id = 'hold-x'`).Error; err != nil {
		t.Fatal(err)
	}
	f.grant("hold-x", 1000, nil)
	h := f.mustHold("hold-x", 600, time.Hour) // available 400
	f.mustHold("hold-x", 10, time.Hour)       // still below: nothing new
	if n := f.countEvents("credits.low_balance"); n != 1 {
		t.Fatalf("%d credits.low_balance after the holds, want 1", n)
	}
	if _, err := f.release("hold-x", h.HoldID); err != nil { // available 990: re-armed
		t.Fatal(err)
	}
	f.mustHold("hold-x", 600, time.Hour) // 390
	if n := f.countEvents("credits.low_balance"); n != 2 {
		t.Fatalf("%d credits.low_balance after falling again, want 2", n)
	}
	f.mustVerify()
}
