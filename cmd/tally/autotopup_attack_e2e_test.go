package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tallybilling/tally/internal/stripeapi/stripefake"
	"github.com/tallybilling/tally/pkg/client"
)

// The self-attack pass on saved cards and automatic top-up, against the
// running binary: other customers' cards and settings, forged and
// duplicated Stripe events, settings changed while consumes race, the
// monthly limit under concurrency, an expired card, hostile input.

// Another customer's token can neither read nor change a customer's
// automatic top-up nor start a card setup for it; a setup session tally
// did not create, or one whose card belongs to another Stripe customer,
// saves nothing; a PaymentIntent tally did not create for a top-up is
// parked and credits nothing.
func TestAutoTopUpAttacksOnAnotherCustomer(t *testing.T) {
	t.Parallel()
	fake, s, evs := cardServer(t)
	saveCard(t, s, evs, "mallory", topUpCard)
	grantOverHTTP(t, s.service(t), "victim", 1000, "grant-victim")

	mallory := s.client(t, userToken(t, "mallory", time.Now().Add(time.Hour)))
	on := client.AutoTopUpSettings{Enabled: true, Threshold: 500, Item: "starter"}
	if r, err := mallory.PutAutoTopUpWithResponse(context.Background(), "victim", on); err != nil || r.StatusCode() != http.StatusForbidden {
		t.Fatalf("mallory's PUT on victim: %v %d", err, r.StatusCode())
	}
	if r, err := mallory.PutAutoTopUpWithResponse(context.Background(), "mallory", on); err != nil || r.StatusCode() != http.StatusForbidden {
		t.Fatalf("an end user configuring auto top-up (service keys only): %v %d", err, r.StatusCode())
	}
	if r, err := mallory.GetAutoTopUpWithResponse(context.Background(), "victim"); err != nil || r.StatusCode() != http.StatusForbidden {
		t.Fatalf("mallory's GET on victim: %v %d", err, r.StatusCode())
	}
	if r, err := mallory.CreatePaymentMethodSetupWithResponse(context.Background(), "victim", client.PaymentMethodSetupCreate{
		SuccessUrl: "https://app.example.com/ok", CancelUrl: "https://app.example.com/no"}); err != nil || r.StatusCode() != http.StatusForbidden {
		t.Fatalf("mallory's setup for victim: %v %d", err, r.StatusCode())
	}

	// Victim starts a setup; the session is completed with mallory's
	// SetupIntent (a card of another Stripe customer): refused.
	r, err := s.service(t).CreatePaymentMethodSetupWithResponse(context.Background(), "victim", client.PaymentMethodSetupCreate{
		SuccessUrl: "https://app.example.com/ok", CancelUrl: "https://app.example.com/no"})
	if err != nil || r.StatusCode() != http.StatusCreated {
		t.Fatalf("victim's setup: %v", err)
	}
	var malloryIntent string
	for _, si := range fake.Sandbox().Objects("setup_intent") {
		malloryIntent, _ = si["id"].(string)
	}
	session := fake.CheckoutSession(r.JSON201.CheckoutSessionId)
	session["status"], session["setup_intent"] = "complete", malloryIntent
	forged := newEventID()
	deliver(t, s, stripeEvent(forged, "checkout.session.completed", session))
	gdb := openDB(t, s)
	if st, lastErr := eventStatus(t, gdb, forged); st != "parked" || !strings.Contains(lastErr, "not to victim") {
		t.Fatalf("a setup completed with another customer's card: %s (%s)", st, lastErr)
	}
	// A setup session tally never created, naming victim in its metadata.
	other := map[string]any{"id": "cs_test_not_ours", "object": "checkout.session", "mode": "setup", "status": "complete",
		"setup_intent": malloryIntent, "livemode": false, "metadata": map[string]string{"tally_customer_id": "victim"}}
	notOurs := newEventID()
	deliver(t, s, stripeEvent(notOurs, "checkout.session.completed", other))
	if st, _ := eventStatus(t, gdb, notOurs); st != "ignored" {
		t.Fatalf("a setup session tally did not create: %s", st)
	}
	if c := customerOverHTTP(t, s, "victim"); c.PaymentMethod != nil {
		t.Fatalf("victim got a card: %+v", c.PaymentMethod)
	}
	if a := putAutoTopUp(t, s, "victim", on); a.Status != client.AutoTopUpStatusNeedsPaymentMethod {
		t.Fatalf("victim without a card: %+v", a)
	}
	if st := spend(t, s, "victim", 600, "victim-1"); st != http.StatusOK {
		t.Fatalf("consume: %d", st)
	}
	if n := len(autoTopUps(t, s, "victim")); n != 0 {
		t.Fatalf("a top-up started without a card: %d", n)
	}

	// Mallory's own top-up: a PaymentIntent tally did not create, with the
	// payment's metadata and amount, is parked; the real one credits.
	grantOverHTTP(t, s.service(t), "mallory", 600, "grant-mallory")
	putAutoTopUp(t, s, "mallory", on)
	spend(t, s, "mallory", 200, "mallory-1")
	tops := autoTopUps(t, s, "mallory")
	if len(tops) != 1 {
		t.Fatalf("%d top-ups", len(tops))
	}
	p := waitCharged(t, s, tops[0].Id)
	fakePI := paymentIntent(p.Id, "mallory", "succeeded", starterAmount, starterAmount, "usd")
	fakePI["id"] = "pi_made_up"
	bogus := newEventID()
	deliver(t, s, stripeEvent(bogus, "payment_intent.succeeded", fakePI))
	if st, _ := eventStatus(t, gdb, bogus); st != "parked" {
		t.Fatalf("a PaymentIntent tally did not create: %s", st)
	}
	if got := balanceOf(t, gdb, "mallory"); got != 400 {
		t.Fatalf("credited by a forged PaymentIntent: %d", got)
	}
	evs.deliverNew(t, s)
	waitPayment(t, s, p.Id, client.PaymentStatusSucceeded)
	if got := balanceOf(t, gdb, "mallory"); got != 400+starterCredits {
		t.Fatalf("balance %d", got)
	}
	assertInvariants(t, s)
}

// Settings changed while consumes race: never two top-ups in flight, and
// what the settings say is in flight is the pending top-up.
func TestAutoTopUpSettingsRacingConsumes(t *testing.T) {
	t.Parallel()
	_, s, evs := cardServer(t)
	saveCard(t, s, evs, "racer", topUpCard)
	grantOverHTTP(t, s.service(t), "racer", 5000, "grant-racer")

	var wg sync.WaitGroup
	for i := range 30 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			spend(t, s, "racer", 100, fmt.Sprintf("race-%d", i))
		}()
	}
	for i := range 10 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r, err := s.service(t).PutAutoTopUpWithResponse(context.Background(), "racer", client.AutoTopUpSettings{
				Enabled: i%3 != 0, Threshold: int64(2000 + 500*(i%4)), Item: "starter"})
			if err != nil || r.StatusCode() != http.StatusOK {
				t.Errorf("PUT %d: %v", i, err)
			}
		}()
	}
	wg.Wait()
	gdb := openDB(t, s)
	if n := countRows(t, gdb, `SELECT count(*) FROM payments WHERE customer_id = 'racer' AND method = 'auto_top_up' AND status = 'pending'`); n > 1 {
		t.Fatalf("%d top-ups pending at once", n)
	}
	if n := countRows(t, gdb, `SELECT count(*) FROM auto_top_up_settings t WHERE customer_id = 'racer' AND in_flight_payment_id IS NOT NULL
		AND NOT EXISTS (SELECT 1 FROM payments p WHERE p.id = t.in_flight_payment_id)`); n != 0 {
		t.Fatal("the settings name a top-up that does not exist")
	}
	// Settled on: enabled, and one more consume below the threshold starts
	// a top-up unless one is in flight already.
	putAutoTopUp(t, s, "racer", client.AutoTopUpSettings{Enabled: true, Threshold: 3500, Item: "starter"})
	spend(t, s, "racer", 10, "race-last")
	if n := countRows(t, gdb, `SELECT count(*) FROM payments WHERE customer_id = 'racer' AND method = 'auto_top_up' AND status = 'pending'`); n != 1 {
		t.Fatalf("%d top-ups pending after the last consume, want 1", n)
	}
	// Whatever started is charged and credited, unless a save turned
	// automatic top-up off before the worker charged it: then it failed,
	// uncharged.
	for _, p := range autoTopUps(t, s, "racer") {
		if p := waitCharged(t, s, p.Id); p.PaymentIntentId == nil {
			if p.Status != client.PaymentStatusFailed || !strings.Contains(deref(p.FailureReason), "turned off by the customer") {
				t.Fatalf("top-up %s is %s (%s), want charged, or failed because it was turned off", p.Id, p.Status, deref(p.FailureReason))
			}
			continue
		}
		evs.deliverNew(t, s)
		waitPayment(t, s, p.Id, client.PaymentStatusSucceeded)
	}
	assertInvariants(t, s)
}

// The monthly limit holds while consumes, grants and Stripe's webhooks
// race: with a limit of 2, at most two top-ups start this month.
func TestAutoTopUpMonthlyLimitUnderConcurrency(t *testing.T) {
	t.Parallel()
	_, s, evs := cardServer(t)
	saveCard(t, s, evs, "busy", topUpCard)
	grantOverHTTP(t, s.service(t), "busy", 600, "grant-busy")
	limit := 2
	putAutoTopUp(t, s, "busy", client.AutoTopUpSettings{Enabled: true, Threshold: 500, Item: "starter", MonthlyLimit: &limit})

	var stop atomic.Bool
	var mu sync.Mutex
	delivered := make(chan struct{})
	go func() { // Stripe's webhooks, as they come
		defer close(delivered)
		for !stop.Load() {
			mu.Lock()
			evs.deliverNew(t, s)
			mu.Unlock()
			time.Sleep(20 * time.Millisecond)
		}
	}()
	var wg sync.WaitGroup
	for i := range 40 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if i%4 == 0 {
				grantOverHTTP(t, s.service(t), "busy", 300, fmt.Sprintf("busy-grant-%d", i))
				return
			}
			spend(t, s, "busy", 150, fmt.Sprintf("busy-%d", i))
			time.Sleep(time.Duration(i) * 30 * time.Millisecond)
		}()
	}
	wg.Wait()
	waitFor(t, "the top-ups to settle", func() bool {
		return countRows(t, openDB(t, s), `SELECT count(*) FROM payments WHERE customer_id = 'busy' AND method = 'auto_top_up' AND status = 'pending'`) == 0
	})
	stop.Store(true)
	<-delivered
	if n := len(autoTopUps(t, s, "busy")); n > 2 || n == 0 {
		t.Fatalf("%d top-ups with a monthly limit of 2", n)
	}
	if got := getAutoTopUp(t, s, "busy"); got.MonthCount > 2 {
		t.Fatalf("month count %d", got.MonthCount)
	}
	assertInvariants(t, s)
}

// A saved card that has expired is not charged: the settings say
// needs_payment_method and a crossing starts nothing; a new card fixes it.
func TestAutoTopUpExpiredCard(t *testing.T) {
	t.Parallel()
	_, s, evs := cardServer(t)
	saveCard(t, s, evs, "expiring", topUpCard)
	gdb := openDB(t, s)
	// Last month (UTC), from the first of this one: a month back from the
	// 29th to the 31st may land in this month (March 31 less a month is
	// March 3), whose card has not expired.
	now := time.Now().UTC()
	last := time.Date(now.Year(), now.Month(), 1, 0, 0, 0, 0, time.UTC).AddDate(0, -1, 0)
	if err := gdb.Exec(`UPDATE customer_payment_methods SET exp_month = ?, exp_year = ? WHERE customer_id = 'expiring'`,
		int(last.Month()), last.Year()).Error; err != nil {
		t.Fatal(err)
	}
	grantOverHTTP(t, s.service(t), "expiring", 600, "grant-exp")
	if a := putAutoTopUp(t, s, "expiring", client.AutoTopUpSettings{Enabled: true, Threshold: 500, Item: "starter"}); a.Status != client.AutoTopUpStatusNeedsPaymentMethod {
		t.Fatalf("with an expired card: %+v", a)
	}
	spend(t, s, "expiring", 200, "exp-1")
	if n := len(autoTopUps(t, s, "expiring")); n != 0 {
		t.Fatalf("an expired card was charged: %d top-ups", n)
	}
	saveCard(t, s, evs, "expiring", "5555555555554444")
	if a := getAutoTopUp(t, s, "expiring"); a.Status != client.AutoTopUpStatusActive {
		t.Fatalf("with a new card: %+v", a)
	}
	spend(t, s, "expiring", 10, "exp-2")
	tops := autoTopUps(t, s, "expiring")
	if len(tops) != 1 {
		t.Fatalf("%d top-ups with the new card", len(tops))
	}
	waitCharged(t, s, tops[0].Id)
	evs.deliverNew(t, s)
	waitPayment(t, s, tops[0].Id, client.PaymentStatusSucceeded)
	assertInvariants(t, s)
}

// Hostile input to the new endpoints gets a clear 4xx and writes nothing.
func TestAutoTopUpBadInputWritesNothing(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	s := startServer(t, payEnv(t, fake.URL()))
	grantOverHTTP(t, s.service(t), "careful", 10, "grant-careful")
	bad := []string{
		`{"enabled": true, "threshold": 0, "item": "starter"}`,
		`{"enabled": true, "threshold": -5, "item": "starter"}`,
		`{"enabled": true, "threshold": 10000000000000, "item": "starter"}`,
		`{"enabled": true, "threshold": 100, "item": "ebook"}`,
		`{"enabled": true, "threshold": 100, "item": "api"}`,
		`{"enabled": true, "threshold": 100, "item": "nope"}`,
		`{"enabled": true, "threshold": 100, "item": "starter", "quantity": 0}`,
		`{"enabled": true, "threshold": 100, "item": "starter", "quantity": 101}`,
		`{"enabled": true, "threshold": 100, "item": "starter", "monthly_limit": 0}`,
		`{"enabled": "yes", "threshold": 100, "item": "starter"}`,
		`{"enabled": true, "threshold": 100, "item": "starter", "card": "4242"}`,
		`{"enabled": true, "threshold": 100}`,
		`{"enabled": true, "threshold": 100, "item": "starter"`,
	}
	for _, body := range bad {
		st, _, raw := rawPut(t, s.URL+"/v1/customers/careful/auto-top-up", testServiceKey, body)
		if st != http.StatusBadRequest && st != http.StatusUnprocessableEntity {
			t.Errorf("%s: %d %s", body, st, raw)
		}
	}
	if st, _, _ := rawPut(t, s.URL+"/v1/customers/nobody-at-all/auto-top-up", testServiceKey, `{"enabled": true, "threshold": 100, "item": "starter"}`); st != http.StatusNotFound {
		t.Errorf("unknown customer: %d", st)
	}
	gdb := openDB(t, s)
	if n := countRows(t, gdb, `SELECT count(*) FROM auto_top_up_settings`); n != 0 {
		t.Fatalf("%d settings rows written by bad input", n)
	}
	if r, err := s.service(t).GetAutoTopUpWithResponse(context.Background(), "careful"); err != nil || r.StatusCode() != http.StatusNotFound {
		t.Fatalf("never configured: %d", r.StatusCode())
	}
	// save_payment_method is for credit packs; a foreign redirect is refused.
	yes := true
	one := int64(1)
	cr, err := s.service(t).CreateCheckoutSessionWithResponse(context.Background(), &client.CreateCheckoutSessionParams{}, client.CheckoutSessionCreate{
		CustomerId: "careful", Item: "ebook", Quantity: &one, SavePaymentMethod: &yes,
		SuccessUrl: "https://app.example.com/ok", CancelUrl: "https://app.example.com/no"})
	if err != nil || (cr.StatusCode() != http.StatusBadRequest && cr.StatusCode() != http.StatusUnprocessableEntity) {
		t.Fatalf("save_payment_method on a product: %d", cr.StatusCode())
	}
	sr, err := s.service(t).CreatePaymentMethodSetupWithResponse(context.Background(), "careful", client.PaymentMethodSetupCreate{
		SuccessUrl: "https://evil.example.net/steal", CancelUrl: "https://app.example.com/no"})
	if err != nil || (sr.StatusCode() != http.StatusBadRequest && sr.StatusCode() != http.StatusUnprocessableEntity) {
		t.Fatalf("a foreign success_url: %d", sr.StatusCode())
	}
	if n := countRows(t, gdb, `SELECT count(*) FROM payment_method_setups`); n != 0 {
		t.Fatalf("%d setups written by bad input", n)
	}
	if n := len(fake.CheckoutSessions()); n != 0 {
		t.Fatalf("%d Checkout Sessions created for bad input", n)
	}
}

func rawPut(t testing.TB, url, key, body string) (int, client.Problem, string) {
	t.Helper()
	req, err := http.NewRequest(http.MethodPut, url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Authorization", "Bearer "+key)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var p client.Problem
	var raw json.RawMessage
	_ = json.NewDecoder(resp.Body).Decode(&raw)
	_ = json.Unmarshal(raw, &p)
	return resp.StatusCode, p, string(raw)
}

// A refunded or disputed automatic top-up turns automatic top-up off: the
// revoke leaves the customer below the threshold, and charging the same
// card again at once would repeat what its owner just took back.
func TestAutoTopUpRefundedOrDisputedTurnsItselfOff(t *testing.T) {
	t.Parallel()
	_, s, evs := cardServer(t)
	gdb := openDB(t, s)
	for _, tc := range []struct {
		customer, why string
		takeBack      func(p client.Payment) []byte
	}{
		{"refunded", "refunded", func(p client.Payment) []byte {
			ch := refundedCharge(p.Id, starterAmount, starterAmount)
			ch["payment_intent"] = *p.PaymentIntentId
			return stripeEvent(newEventID(), "charge.refunded", ch)
		}},
		{"disputed", "disputed", func(p client.Payment) []byte {
			d := dispute(p.Id, "dp_"+p.Id, "needs_response", starterAmount)
			d["payment_intent"] = *p.PaymentIntentId
			return disputeEvent("created", d)
		}},
	} {
		withAutoTopUp(t, s, evs, tc.customer, topUpCard, 1000, client.AutoTopUpSettings{Enabled: true, Threshold: 500, Item: "starter"})
		spend(t, s, tc.customer, 600, tc.customer+"-1")
		tops := autoTopUps(t, s, tc.customer)
		if len(tops) != 1 {
			t.Fatalf("%s: %d top-ups after the crossing, want 1", tc.customer, len(tops))
		}
		waitCharged(t, s, tops[0].Id)
		evs.deliverNew(t, s)
		p := waitPayment(t, s, tops[0].Id, client.PaymentStatusSucceeded)

		deliver(t, s, tc.takeBack(p))
		if b := balanceOf(t, gdb, tc.customer); b != 400 {
			t.Fatalf("%s: balance %d after the top-up was taken back, want 400", tc.customer, b)
		}
		got := getAutoTopUp(t, s, tc.customer)
		if got.Status != client.AutoTopUpStatusDisabled || got.DisabledReason == nil || !strings.Contains(*got.DisabledReason, tc.why) {
			t.Fatalf("%s: settings %+v, want disabled because the top-up was %s", tc.customer, got, tc.why)
		}
		spend(t, s, tc.customer, 10, tc.customer+"-2")
		time.Sleep(300 * time.Millisecond)
		if n := len(autoTopUps(t, s, tc.customer)); n != 1 {
			t.Fatalf("%s: %d top-ups, want no new one charged to the same card", tc.customer, n)
		}
		if n := countRows(t, gdb, `SELECT count(*) FROM events WHERE type = 'credits.auto_top_up_disabled' AND customer_id = ?`, tc.customer); n != 1 {
			t.Fatalf("%s: %d credits.auto_top_up_disabled, want 1", tc.customer, n)
		}
		// Turned on again by the customer, it works as before.
		if a := putAutoTopUp(t, s, tc.customer, client.AutoTopUpSettings{Enabled: true, Threshold: 500, Item: "starter"}); a.Status != client.AutoTopUpStatusActive {
			t.Fatalf("%s: re-enabled %+v", tc.customer, a)
		}
	}
	assertInvariants(t, s)
}
