package credits_test

import (
	"slices"
	"testing"
	"time"

	"github.com/tallybilling/tally/internal/credits"
	"github.com/tallybilling/tally/internal/db/dbtest"
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
	// The consume waits for the balance row (the batch defers it to the
	// full path, which waits); then the confirmation commits.
	consumeWhileLocked(t, f, tx, "tuwait", 120)
	// 190 available -> 70, below 100, nothing in flight: one top-up.
	if got := calls.got(); !slices.Equal(got, []int64{70}) {
		t.Fatalf("top-up trigger calls %v, want [70] (190 -> 70 available, below 100, nothing in flight once the lock was held)", got)
	}
	f.mustVerify()
}

// A change made at a replica's later time (the row's last change, by a
// replica whose clock is ahead) decides whether its monthly limit allows
// an automatic top-up in the month of that time, the month the change is
// made in and StartAutoTopUp counts in. The lock's statement read the
// settings at the lagging clock, still in the month whose limit was used
// up: a consume dated 1 February left 70 available below the threshold of
// 100 and started no top-up, though February had none yet (the batch,
// which decides at the row's time, deferred it to the full path for that
// top-up).
func TestTopUpMonthlyLimitIsReadInTheMonthOfTheChange(t *testing.T) {
	t.Parallel()
	f := newFixture(t, defaultCfg())
	f.clock.Set(time.Date(2027, 1, 31, 23, 59, 30, 0, time.UTC))
	calls := f.withTopUp("tumonth", 100)
	if err := f.db.Exec(`UPDATE auto_top_up_settings SET monthly_limit = 1, month_count = 1, month_start = '2027-01-01' WHERE customer_id = 'tumonth'`).Error; err != nil {
		t.Fatal(err)
	}
	f.grant("tumonth", 200, nil)
	// A replica a minute ahead spends 10 (190 left, above 100): the row's
	// time is now 00:00:30 on 1 February.
	ahead := credits.New(credits.Options{DB: f.db, Config: f.cfg, Now: func() time.Time { return f.clock.Now().Add(time.Minute) }, Logger: dbtest.Logger(t), TopUp: calls.start})
	cin := credits.ConsumeInput{CustomerID: "tumonth", Amount: 10, Reason: "api call"}
	if _, _, err := ahead.Consume(f.ctx, cin, key("tumonth", freshKey(), cin)); err != nil {
		t.Fatal(err)
	}
	// The lagging replica spends 120 at the row's time: 70 left.
	f.mustConsume("tumonth", 120)
	var at time.Time
	if err := f.db.Raw(`SELECT created_at FROM credit_ledger WHERE customer_id = 'tumonth' ORDER BY seq DESC LIMIT 1`).Scan(&at).Error; err != nil {
		t.Fatal(err)
	}
	if at.UTC().Month() != time.February {
		t.Fatalf("the consume is dated %s, want 1 February (the row's time)", at.UTC())
	}
	if got := calls.got(); !slices.Equal(got, []int64{70}) {
		t.Fatalf("top-up trigger calls %v, want [70] (70 available, below 100, none started in February)", got)
	}
	f.mustVerify()
}
