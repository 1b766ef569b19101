package main

import (
	"fmt"
	"net/http"
	"sync"
	"testing"

	"github.com/tallybilling/tally/internal/stripeapi/stripefake"
	"github.com/tallybilling/tally/pkg/client"
)

// Automatic top-up beside holds (issues 10 and 14): the trigger compares
// what is available (balance less held and pending), and every change that
// lowers it goes through the one guard, a hold's capture included.

// A capture is a consume: capturing a hold that leaves too little available
// starts exactly one automatic top-up, however many captures race, and the
// top-up is then credited once.
func TestAutoTopUpCaptureBelowThresholdStartsExactlyOne(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	env := payEnv(t, fake.URL())
	s := startServer(t, env)
	evs := &stripeEvents{fake: fake}
	c := s.service(t)

	saveCard(t, s, evs, "capturer", topUpCard)
	grantOverHTTP(t, c, "capturer", 1000, "grant-capturer")
	// Holds taken before automatic top-up is on: available is 1000-700-100.
	holds := []client.HoldCreated{mustHoldOverHTTP(t, c, "capturer", 700, nil), mustHoldOverHTTP(t, c, "capturer", 100, nil)}
	// Saving starts nothing, even though only 200 are available.
	if a := putAutoTopUp(t, s, "capturer", client.AutoTopUpSettings{Enabled: true, Threshold: 500, Item: "starter"}); a.Status != client.AutoTopUpStatusActive {
		t.Fatalf("settings %+v", a)
	}
	if n := len(autoTopUps(t, s, "capturer")); n != 0 {
		t.Fatalf("%d top-ups after saving the settings, want none", n)
	}

	// Both holds captured at once, each by several racing duplicates.
	var wg sync.WaitGroup
	for _, h := range holds {
		for i := range 4 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				r := captureOverHTTP(t, c, "capturer", h.HoldId, nil, fmt.Sprintf("capture-%s-%d", h.HoldId, i%2))
				if st := r.StatusCode(); st != http.StatusOK && st != http.StatusConflict {
					t.Errorf("capture %s: %d %s", h.HoldId, st, r.Body)
				}
			}()
		}
	}
	wg.Wait()
	gdb := openDB(t, s)
	if got := balanceOf(t, gdb, "capturer"); got != 200 {
		t.Fatalf("balance after the captures %d, want 200", got)
	}
	tops := autoTopUps(t, s, "capturer")
	if len(tops) != 1 {
		t.Fatalf("%d automatic top-ups after the captures, want exactly 1", len(tops))
	}
	p := waitCharged(t, s, tops[0].Id)
	if p.PaymentIntentId == nil || p.Method != client.PaymentMethodAutoTopUp {
		t.Fatalf("top-up %+v", p)
	}
	evs.deliverNew(t, s)
	waitPayment(t, s, p.Id, client.PaymentStatusSucceeded)
	if got := balanceOf(t, gdb, "capturer"); got != 200+starterCredits {
		t.Fatalf("balance after the top-up %d, want %d", got, 200+starterCredits)
	}
	// The captures count as consumption for the forecast.
	if n := countRows(t, gdb, `SELECT COALESCE(sum(consumed), 0) FROM credit_consumption_daily WHERE customer_id = 'capturer'`); n != 800 {
		t.Fatalf("the consumption rollup has %d, want the 800 captured", n)
	}
	if n := len(autoTopUps(t, s, "capturer")); n != 1 {
		t.Fatalf("%d top-ups", n)
	}
	assertInvariants(t, s)
	mustVerifyClean(t, s)
}

// Held credits are not available: a consume that leaves the balance well
// above the threshold but what is available below it starts the top-up, and
// credits.low_balance fires on what is available too.
func TestAutoTopUpHeldCreditsMakeAvailableCrossTheThreshold(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	env := payEnv(t, fake.URL())
	s := startServer(t, env)
	evs := &stripeEvents{fake: fake}
	c := s.service(t)

	saveCard(t, s, evs, "holder", topUpCard)
	threshold := int64(500)
	r, err := c.UpsertCustomerWithResponse(t.Context(), "holder", client.CustomerUpsert{LowBalanceThreshold: &threshold})
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "set the low-balance threshold", r.StatusCode(), r.Body, http.StatusOK)
	grantOverHTTP(t, c, "holder", 1000, "grant-holder")
	putAutoTopUp(t, s, "holder", client.AutoTopUpSettings{Enabled: true, Threshold: 500, Item: "starter"})
	mustHoldOverHTTP(t, c, "holder", 450, nil) // available 550: nothing yet
	if n := len(autoTopUps(t, s, "holder")); n != 0 {
		t.Fatalf("%d top-ups with 550 available, want none", n)
	}
	if st := spend(t, s, "holder", 100, "spend-holder"); st != http.StatusOK {
		t.Fatalf("consume: %d", st)
	}
	gdb := openDB(t, s)
	// The balance (900) is above both thresholds; what is available (450) is not.
	if got := balanceOf(t, gdb, "holder"); got != 900 {
		t.Fatalf("balance %d, want 900", got)
	}
	if n := len(autoTopUps(t, s, "holder")); n != 1 {
		t.Fatalf("%d automatic top-ups with 450 of 900 available, want 1", n)
	}
	if n := countRows(t, gdb, `SELECT count(*) FROM events WHERE customer_id = 'holder' AND type = 'credits.low_balance'
		AND (data->>'available')::bigint = 450 AND (data->>'balance')::bigint = 900`); n != 1 {
		t.Fatalf("%d credits.low_balance events for available 450, want 1", n)
	}
	p := waitCharged(t, s, autoTopUps(t, s, "holder")[0].Id)
	evs.deliverNew(t, s)
	waitPayment(t, s, p.Id, client.PaymentStatusSucceeded)
	assertInvariants(t, s)
	mustVerifyClean(t, s)
}
