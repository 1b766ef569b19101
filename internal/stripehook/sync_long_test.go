package stripehook_test

import (
	"context"
	"sort"
	"testing"
	"time"

	"github.com/tallybilling/tally/internal/db/dbtest"
	"github.com/tallybilling/tally/internal/stripeapi"
	"github.com/tallybilling/tally/internal/stripehook"
)

// hookedStripe is listingStripe with a hook run before each listing (n: 1
// for the first), outside its lock.
type hookedStripe struct {
	*listingStripe
	calls  int
	before func(n int)
}

func (s *hookedStripe) ListEvents(ctx context.Context, since time.Time, types []string) ([]stripeapi.RawEvent, bool, error) {
	s.calls++
	s.before(s.calls)
	return s.listingStripe.ListEvents(ctx, since, types)
}

// An event Stripe lists late, but by less than the catch-up overlap, must
// be listed by the next default catch-up even when the one that missed it
// ran long (a backlog of more than one listing, slow to store and
// process). Tally's and Stripe's clocks agree here. The mark is the
// newest event the catch-up listed, created while it ran: its last
// listing came half an hour after its first, so the next window started
// more than an hour after events its first listing could not see yet.
// Before the mark was on Stripe's clock it was the catch-up's start, and
// the next window covered them.
func TestCatchUpThatRanLongListsAnEventListedLateByLessThanTheOverlap(t *testing.T) {
	t.Parallel()
	gdb := dbtest.New(t)
	ctx := context.Background()
	clock := newTestClock()
	now, advance := clock.Now, clock.Advance
	c0 := now()
	stripe := &hookedStripe{listingStripe: &listingStripe{per: 3}}
	stripe.before = func(n int) {
		if n != 2 {
			return
		}
		// The first listing's events took half an hour to store and
		// process. Meanwhile Stripe created evt_during, and evt_late,
		// created 47 minutes before the first listing, showed up in
		// Stripe's list 55 minutes after its creation: within the
		// overlap.
		advance(30 * time.Minute)
		stripe.add("evt_during", c0.Add(25*time.Minute))
		stripe.add("evt_late", c0.Add(-47*time.Minute))
		stripe.mu.Lock() // listed in order of creation, as Stripe does
		sort.SliceStable(stripe.events, func(i, j int) bool { return stripe.events[i].Created.Before(stripe.events[j].Created) })
		stripe.mu.Unlock()
	}
	o := defaultOptions(t, gdb, "whsec_test")
	o.Now, o.Stripe = now, stripe
	h := stripehook.New(o)

	for i, ago := range []time.Duration{50, 48, 46, 44} {
		stripe.add("evt_backlog_"+string(rune('a'+i)), c0.Add(-ago*time.Minute))
	}
	if res, err := h.CatchUp(ctx, time.Time{}); err != nil || res.New != 5 {
		t.Fatalf("the long catch-up: %+v, %v; want the four of the backlog and evt_during", res, err)
	}
	advance(5 * time.Minute) // the next, as TALLY_STRIPE_SYNC_INTERVAL has it
	if _, err := h.CatchUp(ctx, time.Time{}); err != nil {
		t.Fatal(err)
	}
	if !eventStored(t, gdb, "evt_late") {
		t.Fatalf("evt_late (created %v, listed 55 minutes late) was never stored: the catch-up after the long one listed since %v",
			c0.Add(-47*time.Minute).UTC(), stripe.lastSince().UTC())
	}
}

// With Stripe's clock ahead of tally's, the catch-up's start on tally's
// clock was earlier than anything on Stripe's, and the next window
// reached back that much further: an event Stripe listed later than the
// overlap, by less than the clocks' difference, was still listed. The
// mark on Stripe's clock must not lose what that one found: the window
// starts from the earlier of the two.
func TestCatchUpWithStripesClockAheadStillListsWhatTallysClockWould(t *testing.T) {
	t.Parallel()
	gdb := dbtest.New(t)
	ctx := context.Background()
	const skew = 2 * time.Hour
	stripeClock := newTestClock()
	stripeNow, advance := stripeClock.Now, stripeClock.Advance
	tallyNow := func() time.Time { return stripeNow().Add(-skew) }
	c0 := stripeNow()
	stripe := &listingStripe{}
	o := defaultOptions(t, gdb, "whsec_test")
	o.Now, o.Stripe = tallyNow, stripe
	h := stripehook.New(o)

	stripe.add("evt_ahead_first", c0.Add(-time.Minute))
	if res, err := h.CatchUp(ctx, time.Time{}); err != nil || res.New != 1 {
		t.Fatalf("first catch-up: %+v, %v; want the one event", res, err)
	}
	// evt_ahead_late, created 80 minutes before that catch-up, shows up in
	// Stripe's list 90 minutes after its creation (an incident).
	advance(15 * time.Minute)
	stripe.add("evt_ahead_late", c0.Add(-80*time.Minute))
	stripe.mu.Lock()
	sort.SliceStable(stripe.events, func(i, j int) bool { return stripe.events[i].Created.Before(stripe.events[j].Created) })
	stripe.mu.Unlock()
	if _, err := h.CatchUp(ctx, time.Time{}); err != nil {
		t.Fatal(err)
	}
	if !eventStored(t, gdb, "evt_ahead_late") {
		t.Fatalf("with Stripe's clock %s ahead, evt_ahead_late (created %v, listed 90 minutes late) was never stored: the second catch-up listed since %v",
			skew, c0.Add(-80*time.Minute).UTC(), stripe.lastSince().UTC())
	}
}
