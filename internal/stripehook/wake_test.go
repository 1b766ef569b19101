package stripehook_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/tallybilling/tally/internal/db/dbtest"
	"github.com/tallybilling/tally/internal/stripehook"
)

// Once a sync lists Stripe's events, events that met Stripe down are made
// due at once, but not one another replica claimed for an attempt in
// flight. The wake reads its clock before its UPDATE runs; a claim made in
// between (due again at its time plus the lease) looked like a backoff
// past one lease from the wake's clock and was made due, and a second
// replica could take it while the first attempt still ran.
func TestAWakeOfEventsThatMetStripeDownLeavesAClaimMadeJustAfterAlone(t *testing.T) {
	t.Parallel()
	gdb := dbtest.New(t)
	ctx := context.Background()
	clock := newTestClock()
	o := defaultOptions(t, gdb, "whsec_test")
	o.Now, o.Stripe = clock.Now, &listingStripe{}
	h := stripehook.New(o)
	syncer := stripehook.NewSyncer(h, stripehook.SyncerOptions{})

	now := clock.Now()
	store := func(id string, next time.Time) {
		t.Helper()
		payload := fmt.Sprintf(`{"id":%q,"object":"event","type":"radar.early_fraud_warning.created","created":%d,"livemode":false,"data":{"object":{"id":"issfr_%s"}}}`,
			id, now.Unix(), id)
		if err := gdb.Exec(`INSERT INTO stripe_events (id, type, livemode, payload, status, attempts, last_error, next_attempt_at, received_at, source, stripe_unreachable)
			VALUES (?, 'radar.early_fraud_warning.created', false, ?, 'failed', 6, 'stripe: 503', ?, ?, 'webhook', true)`,
			id, payload, next, now.Add(-time.Hour)).Error; err != nil {
			t.Fatal(err)
		}
	}
	next := func(id string) time.Time {
		t.Helper()
		var at time.Time
		if err := gdb.Raw(`SELECT next_attempt_at FROM stripe_events WHERE id = ?`, id).Row().Scan(&at); err != nil {
			t.Fatal(err)
		}
		return at
	}
	backedOff := now.Add(40 * time.Minute)
	claimed := now.Add(2 * time.Second).Add(o.Lease) // claimed 2 s after the wake read its clock
	store("evt_backed_off", backedOff)
	store("evt_claimed", claimed)

	if _, err := syncer.Sync(ctx, time.Time{}); err != nil {
		t.Fatal(err)
	}
	if got := next("evt_backed_off"); !got.Equal(now) {
		t.Errorf("event backed off for 40 minutes: next attempt %s after the sync, want now (%s)", got, now)
	}
	if got := next("evt_claimed"); !got.Equal(claimed) {
		t.Errorf("event claimed by an attempt in flight: next attempt %s after the sync, want its lease's end (%s)", got, claimed)
	}
}
