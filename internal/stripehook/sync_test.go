package stripehook_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/stripe/stripe-go/v82/webhook"

	"github.com/tallybilling/tally/internal/db/dbtest"
	"github.com/tallybilling/tally/internal/stripeapi"
	"github.com/tallybilling/tally/internal/stripehook"
)

// listingStripe is the part of Stripe a catch-up asks: its event list,
// which holds what the test puts there and can be made to fail. Every
// other call is a programming error here (the embedded nil Client panics).
type listingStripe struct {
	stripeapi.Client
	mu     sync.Mutex
	events []stripeapi.RawEvent
	down   bool
	since  []time.Time // what each listing asked for
	// per, when not 0, is the most one listing returns (the oldest, with
	// more=true), as stripeapi.MaxListedEvents is for Stripe's.
	per int
}

func (s *listingStripe) add(id string, created time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	payload := fmt.Sprintf(`{"id":%q,"object":"event","type":"radar.early_fraud_warning.created","created":%d,"livemode":false,"data":{"object":{"id":"issfr_%s"}}}`,
		id, created.Unix(), id)
	s.events = append(s.events, stripeapi.RawEvent{ID: id, Type: "radar.early_fraud_warning.created", Created: created, Payload: []byte(payload)})
}

// lastSince is what the latest listing asked for.
func (s *listingStripe) lastSince() time.Time {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.since[len(s.since)-1]
}

func (s *listingStripe) ListEvents(_ context.Context, since time.Time, _ []string) ([]stripeapi.RawEvent, bool, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.since = append(s.since, since)
	if s.down {
		return nil, false, errors.New("stripe: 500 api_error (listing events)")
	}
	var out []stripeapi.RawEvent
	for _, e := range s.events {
		if !e.Created.Before(since) {
			out = append(out, e)
		}
	}
	if s.per > 0 && len(out) > s.per {
		return out[:s.per], true, nil
	}
	return out, false, nil
}

// A catch-up that failed (Stripe answering 5xx to the listing, or the
// database going away while the listed events were stored) leaves its
// window to the next one, even when webhooks of newer events arrived in
// between: Stripe gave up on the lost deliveries, so the next default
// catch-up is the only way they can still come in. Before, the default
// window started an hour before the newest stored event, whoever stored
// it, so one late webhook moved it past everything the failed catch-up
// should have listed, and those events were never listed again.
func TestCatchUpAfterAFailedOneListsWhatItMissed(t *testing.T) {
	t.Parallel()
	gdb := dbtest.New(t)
	ctx := context.Background()
	clock := newTestClock()
	now, advance := clock.Now, clock.Advance
	stripe := &listingStripe{}
	o := defaultOptions(t, gdb, "whsec_test")
	o.Now, o.Stripe = now, stripe
	h := stripehook.New(o)
	stored := func(id string) bool {
		var n int64
		if err := gdb.Raw(`SELECT count(*) FROM stripe_events WHERE id = ?`, id).Scan(&n).Error; err != nil {
			t.Fatal(err)
		}
		return n == 1
	}

	// A catch-up that completes.
	stripe.add("evt_before", now().Add(-5*time.Minute))
	if res, err := h.CatchUp(ctx, time.Time{}); err != nil || res.New != 1 {
		t.Fatalf("first catch-up: %+v, %v; want the one event", res, err)
	}

	// An hour later an event's webhook is lost (Stripe gives up on it);
	// two hours after that the next catch-up finds Stripe failing.
	advance(time.Hour)
	lostAt := now()
	stripe.add("evt_lost", lostAt)
	advance(2 * time.Hour)
	stripe.mu.Lock()
	stripe.down = true
	stripe.mu.Unlock()
	if _, err := h.CatchUp(ctx, time.Time{}); err == nil {
		t.Fatal("a catch-up whose listing failed reported success")
	}

	// Meanwhile the webhook of a newer event arrives, as deliveries do.
	stripe.add("evt_new", now())
	body := []byte(fmt.Sprintf(`{"id":"evt_new","object":"event","type":"radar.early_fraud_warning.created","created":%d,"livemode":false,"data":{"object":{"id":"issfr_new"}}}`, now().Unix()))
	if _, err := h.Receive(ctx, body, signed(t, body, "whsec_test", now())); err != nil {
		t.Fatalf("delivery of evt_new: %v", err)
	}

	// Stripe is back: the retried catch-up must still list the lost event.
	stripe.mu.Lock()
	stripe.down = false
	stripe.mu.Unlock()
	res, err := h.CatchUp(ctx, time.Time{})
	if err != nil {
		t.Fatal(err)
	}
	if !stored("evt_lost") {
		t.Fatalf("the retried catch-up (%+v, listing since %v) never stored evt_lost, created %v: it is lost for good",
			res, stripe.lastSince(), lostAt)
	}

	// A completed catch-up moves the window on: the next lists from about
	// the last one's start, not from the beginning again.
	advance(10 * time.Minute)
	if _, err := h.CatchUp(ctx, time.Time{}); err != nil {
		t.Fatal(err)
	}
	last := stripe.lastSince()
	if want := now().Add(-10*time.Minute - time.Hour); !last.Equal(want) {
		t.Fatalf("after a completed catch-up the next lists since %v, want %v (the last one's start less an hour)", last, want)
	}
}

// signed is the Stripe-Signature header of body signed with secret at at.
func signed(t *testing.T, body []byte, secret string, at time.Time) string {
	t.Helper()
	return webhook.GenerateTestSignedPayload(&webhook.UnsignedPayload{Payload: body, Secret: secret, Timestamp: at}).Header
}

// A backlog longer than one listing holds (a busy account whose webhooks
// were lost for days; Stripe's listing keeps the oldest
// stripeapi.MaxListedEvents) is worked through in one catch-up, from its
// oldest end, listing on from the newest event stored each time; none is
// skipped, and the next catch-up starts after the whole window.
func TestCatchUpWorksThroughABacklogLongerThanOneListing(t *testing.T) {
	t.Parallel()
	gdb := dbtest.New(t)
	ctx := context.Background()
	now := time.Now().Truncate(time.Second)
	stripe := &listingStripe{per: 7}
	const total = 30
	for i := range total {
		// Two events a second: a listing can end inside a second.
		stripe.add(fmt.Sprintf("evt_backlog_%02d", i), now.Add(-48*time.Hour+time.Duration(i/2)*time.Second))
	}
	o := defaultOptions(t, gdb)
	o.Now, o.Stripe = func() time.Time { return now }, stripe
	h := stripehook.New(o)
	res, err := h.CatchUp(ctx, time.Time{})
	if err != nil {
		t.Fatal(err)
	}
	var stored int64
	if err := gdb.Raw(`SELECT count(*) FROM stripe_events WHERE id LIKE 'evt_backlog_%'`).Scan(&stored).Error; err != nil {
		t.Fatal(err)
	}
	if stored != total || res.New != total {
		t.Fatalf("one catch-up stored %d of the %d events of the backlog (%+v, listings since %v)", stored, total, res, stripe.since)
	}
	first := len(stripe.since)
	if _, err := h.CatchUp(ctx, time.Time{}); err != nil {
		t.Fatal(err)
	}
	// From an hour before the newest event listed (Stripe's clock): it
	// lists again at most that hour, not the whole backlog.
	newest := now.Add(-48*time.Hour + time.Duration((total-1)/2)*time.Second)
	if next := stripe.since[first]; !next.Equal(newest.Add(-time.Hour)) {
		t.Fatalf("the next catch-up lists since %v, want %v", next, newest.Add(-time.Hour))
	}
}

// testClock is a clock a test moves by hand, from ten hours ago.
type testClock struct {
	mu sync.Mutex
	t  time.Time
}

func newTestClock() *testClock {
	return &testClock{t: time.Now().Add(-10 * time.Hour).Truncate(time.Second)}
}

func (c *testClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *testClock) Advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}
