package credits_test

import (
	"slices"
	"testing"

	"github.com/tallybilling/tally/internal/customers"
)

// Several thresholds: each fires credits.low_balance once as the balance
// falls below it, re-armed when the balance is back at or above it; the
// single threshold keeps working beside them.
func TestSeveralLowBalanceThresholds(t *testing.T) {
	t.Parallel()
	f := newFixture(t, defaultCfg())
	single := int64(300)
	list := []int64{50, 500, 200, 500}
	if _, _, err := customers.New(customers.Options{DB: f.db, Now: f.clock.Now}).Upsert(f.ctx, customers.UpsertInput{
		ID: "tiers", LowBalanceThreshold: &single, LowBalanceThresholds: &list,
	}); err != nil {
		t.Fatal(err)
	}
	c, err := customers.Get(f.ctx, f.db, "tiers")
	if err != nil || !slices.Equal(c.LowBalanceThresholds, []int64{500, 200, 50}) {
		t.Fatalf("stored thresholds %v, %v", c.LowBalanceThresholds, err)
	}
	fired := func() []int64 {
		t.Helper()
		var out []int64
		if err := f.db.Raw(`SELECT (data->>'threshold')::bigint FROM events WHERE type = 'credits.low_balance' AND customer_id = 'tiers' ORDER BY id`).
			Scan(&out).Error; err != nil {
			t.Fatal(err)
		}
		return out
	}
	f.grant("tiers", 1000, nil)
	steps := []struct {
		consume int64
		want    []int64
	}{
		{600, []int64{500}},               // 400
		{50, []int64{500}},                // 350: still above 300
		{100, []int64{500, 300}},          // 250: below the single threshold
		{60, []int64{500, 300, 200}},      // 190
		{150, []int64{500, 300, 200, 50}}, // 40
		{10, []int64{500, 300, 200, 50}},  // 30: nothing new
	}
	for i, s := range steps {
		f.mustConsume("tiers", s.consume)
		if got := fired(); !slices.Equal(got, s.want) {
			t.Fatalf("step %d (consume %d, balance %d): fired %v, want %v", i, s.consume, f.balance("tiers").Balance, got, s.want)
		}
	}
	// Back above every threshold, then down again: each fires again.
	f.grant("tiers", 1000, nil)  // 1030
	f.mustConsume("tiers", 1000) // 30
	want := []int64{500, 300, 200, 50, 300, 500, 200, 50}
	got := fired()
	if len(got) != len(want) {
		t.Fatalf("after re-arming: fired %v", got)
	}
	slices.Sort(got[4:])
	slices.Sort(want[4:])
	if !slices.Equal(got, want) {
		t.Fatalf("after re-arming: fired %v, want %v", got, want)
	}
	f.mustVerify()
}
