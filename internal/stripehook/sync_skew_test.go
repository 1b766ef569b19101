package stripehook_test

import (
	"context"
	"testing"
	"time"

	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/db/dbtest"
	"github.com/tallybilling/tally/internal/stripehook"
)

// tally's clock running ahead of Stripe's by more than the catch-up
// overlap (a host without NTP, a VM resumed from a snapshot) must not make
// a default catch-up skip events. Every webhook is refused then (its
// signature's timestamp is outside the tolerance), so the catch-up is the
// only way events arrive. Before, the window's start was recorded in
// tally's clock and compared to Stripe's creation times: with tally two
// hours ahead, the next catch-up listed from an hour after the last one
// (in Stripe's time), and an event Stripe created in that hour was never
// listed.
func TestCatchUpWithTallysClockAheadOfStripesListsEveryEvent(t *testing.T) {
	t.Parallel()
	gdb := dbtest.New(t)
	ctx := context.Background()
	const skew = 2 * time.Hour
	stripeClock := newTestClock()
	stripeNow, advance := stripeClock.Now, stripeClock.Advance
	tallyNow := func() time.Time { return stripeNow().Add(skew) }
	stripe := &listingStripe{}
	o := defaultOptions(t, gdb, "whsec_test")
	o.Now, o.Stripe = tallyNow, stripe
	h := stripehook.New(o)

	stripe.add("evt_skew_first", stripeNow().Add(-time.Minute))
	if res, err := h.CatchUp(ctx, time.Time{}); err != nil || res.New != 1 {
		t.Fatalf("first catch-up: %+v, %v; want the one event", res, err)
	}
	// Five minutes later (Stripe's clock) an event is created; its webhook
	// is refused for its timestamp. The next catch-up runs five minutes
	// after that, as TALLY_STRIPE_SYNC_INTERVAL's default has it.
	advance(5 * time.Minute)
	missedAt := stripeNow()
	stripe.add("evt_skew_missed", missedAt)
	advance(5 * time.Minute)
	if _, err := h.CatchUp(ctx, time.Time{}); err != nil {
		t.Fatal(err)
	}
	if !eventStored(t, gdb, "evt_skew_missed") {
		t.Fatalf("with tally's clock %s ahead of Stripe's, the second catch-up listed since %v and never stored evt_skew_missed, created %v",
			skew, stripe.lastSince().UTC(), missedAt.UTC())
	}
}

// A mark a catch-up recorded before it was kept on Stripe's clock (tally's
// clock at the time, two hours ahead of Stripe's) must not hold the next
// window past events Stripe creates meanwhile: the window starts no later
// than an hour before the newest event stored, whose time is Stripe's.
func TestCatchUpAfterAMarkOnTallysClockListsEveryEvent(t *testing.T) {
	t.Parallel()
	gdb := dbtest.New(t)
	ctx := context.Background()
	const skew = 2 * time.Hour
	stripeNow := time.Now().Add(-10 * time.Hour).Truncate(time.Second)
	tallyNow := stripeNow.Add(skew)
	stripe := &listingStripe{}
	o := defaultOptions(t, gdb, "whsec_test")
	o.Now, o.Stripe = func() time.Time { return tallyNow }, stripe
	h := stripehook.New(o)

	stripe.add("evt_legacy_stored", stripeNow.Add(-time.Minute))
	if _, err := h.CatchUp(ctx, time.Time{}); err != nil {
		t.Fatal(err)
	}
	// As the catch-up before the upgrade recorded it: tally's clock.
	if err := gdb.Exec(`UPDATE background_runs SET last_run_at = ? WHERE name = 'stripe catch-up listed'`, tallyNow).Error; err != nil {
		t.Fatal(err)
	}
	missedAt := stripeNow.Add(10 * time.Minute)
	stripe.add("evt_legacy_missed", missedAt)
	tallyNow = tallyNow.Add(15 * time.Minute)
	if _, err := h.CatchUp(ctx, time.Time{}); err != nil {
		t.Fatal(err)
	}
	if !eventStored(t, gdb, "evt_legacy_missed") {
		t.Fatalf("after a mark on tally's clock, %s ahead, the catch-up listed since %v and never stored evt_legacy_missed, created %v",
			skew, stripe.lastSince().UTC(), missedAt.UTC())
	}
}

// eventStored reports whether the event id is stored.
func eventStored(t *testing.T, gdb *gorm.DB, id string) bool {
	t.Helper()
	var n int64
	if err := gdb.Raw(`SELECT count(*) FROM stripe_events WHERE id = ?`, id).Scan(&n).Error; err != nil {
		t.Fatal(err)
	}
	return n == 1
}
