package main

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tallybilling/tally/internal/stripeapi/stripefake"
	"github.com/tallybilling/tally/pkg/client"
)

// firstAutoTopUp gives customer a saved card, 1,000 credits and automatic
// top-up of a starter pack below 500, spends 600 and returns the top-up
// that started, charged and confirmed.
func firstAutoTopUp(t *testing.T, s *server, evs *stripeEvents, customer string) client.Payment {
	t.Helper()
	saveCard(t, s, evs, customer, topUpCard)
	grantOverHTTP(t, s.service(t), customer, 1000, "grant-"+customer)
	putAutoTopUp(t, s, customer, client.AutoTopUpSettings{Enabled: true, Threshold: 500, Item: "starter"})
	spend(t, s, customer, 600, customer+"-1")
	tops := autoTopUps(t, s, customer)
	if len(tops) != 1 {
		t.Fatalf("%d top-ups after the first crossing, want 1", len(tops))
	}
	waitCharged(t, s, tops[0].Id)
	evs.deliverNew(t, s)
	return waitPayment(t, s, tops[0].Id, client.PaymentStatusSucceeded)
}

// A refunded automatic top-up turns automatic top-up off so that the same
// card is not charged again. A top-up started just before the refund and
// not charged yet (Stripe was down when the worker tried) must not be
// charged once Stripe answers again: it fails, naming why.
func TestAutoTopUpRefundStopsAnUnchargedTopUp(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	s := startServer(t, payEnv(t, fake.URL()))
	evs := &stripeEvents{fake: fake}
	gdb := openDB(t, s)
	first := firstAutoTopUp(t, s, evs, "pend")

	// Stripe is down: the next top-up stays pending, uncharged.
	fake.SetFault(func(r *http.Request) (int, string, bool) {
		if r.URL.Path == "/v1/payment_intents" {
			return http.StatusServiceUnavailable, `{"error":{"type":"api_error","message":"down"}}`, true
		}
		return 0, "", false
	})
	spend(t, s, "pend", 400+starterCredits-100, "pend-2")
	tops := autoTopUps(t, s, "pend")
	if len(tops) != 2 {
		t.Fatalf("%d top-ups after the second crossing, want 2", len(tops))
	}
	var second string
	for _, p := range tops {
		if p.Id != first.Id {
			second = p.Id
		}
	}

	// The first top-up is refunded; then Stripe answers again.
	ch := refundedCharge(first.Id, starterAmount, starterAmount)
	ch["payment_intent"] = *first.PaymentIntentId
	deliver(t, s, stripeEvent(newEventID(), "charge.refunded", ch))
	if got := getAutoTopUp(t, s, "pend"); got.Status != client.AutoTopUpStatusDisabled || got.DisabledReason == nil || !strings.Contains(*got.DisabledReason, "refunded") {
		t.Fatalf("settings %+v, want disabled by the refund", got)
	}
	fake.SetFault(nil)
	waitFor(t, "the uncharged top-up to settle", func() bool {
		return len(fake.Sandbox().Objects("payment_intent")) > 1 || getPayment(t, s, second).Status != client.PaymentStatusPending
	})
	time.Sleep(300 * time.Millisecond)
	if n := len(fake.Sandbox().Objects("payment_intent")); n != 1 {
		t.Fatalf("Stripe holds %d PaymentIntents: the card was charged again after its owner took the top-up back", n)
	}
	if p := getPayment(t, s, second); p.Status != client.PaymentStatusFailed {
		t.Fatalf("second top-up %s, want failed", p.Status)
	}
	if b := balanceOf(t, gdb, "pend"); b != 0 {
		t.Fatalf("balance %d, want 0", b)
	}
	assertInvariants(t, s)
}

// Two servers on one database; one customer with three paid packs and many
// holds. Releases, captures, the sweeper's expiries, refunds in steps
// (each delivered twice), a dispute won and a dispute lost all race. When
// every hold has ended, nothing refunded or lost is spendable: what the
// customer still has, less what it owes, is exactly what it paid for less
// what it spent and what was taken back; and both verify paths are clean.
func TestHeldCreditsRefundDisputeStormOnTwoServers(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	env := payEnv(t, fake.URL())
	env["TALLY_CREDITS_SWEEP_INTERVAL"] = "200ms"
	s1 := startServer(t, env)
	s2 := startServer(t, env)
	servers := []*server{s1, s2}
	c := s1.wideClient(t)
	gdb := openDB(t, s1)
	const who = "storm"
	pays := []string{buyStarter(t, fake, s1, who), buyStarter(t, fake, s1, who), buyStarter(t, fake, s1, who)}
	short, long := 1, 3600
	var holds []client.HoldCreated
	for i := range 20 {
		exp := &long
		if i >= 10 && i < 15 {
			exp = &short
		}
		holds = append(holds, mustHoldOverHTTP(t, c, who, 100, exp))
	}
	consumeOverHTTP(t, s1, who, 500)

	var wg sync.WaitGroup
	run := func(f func(i int)) {
		for i := range 2 {
			wg.Add(1)
			go func() { defer wg.Done(); f(i) }()
		}
	}
	for i, h := range holds {
		if i >= 10 {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			cl := servers[i%2].service(t)
			if i < 5 {
				mustStatus(t, "release", releaseOverHTTP(t, cl, who, h.HoldId).StatusCode(), nil, http.StatusOK)
				return
			}
			r := captureOverHTTP(t, cl, who, h.HoldId, i64(50), "cap-"+h.HoldId)
			mustStatus(t, "capture", r.StatusCode(), r.Body, http.StatusOK)
		}()
	}
	// P1 refunded in three steps, each delivered to both servers.
	run(func(i int) {
		for _, total := range []int64{300, 600, starterAmount} {
			deliver(t, servers[i], stripeEvent(fmt.Sprintf("evt_r1_%d", total), "charge.refunded", refundedCharge(pays[0], starterAmount, total)))
		}
	})
	// P2 disputed, then won; P3 half refunded and disputed, then lost.
	wg.Add(2)
	go func() {
		defer wg.Done()
		d := dispute(pays[1], "dp_storm_won", "needs_response", starterAmount)
		deliver(t, s1, disputeEvent("created", d))
		d["status"] = "won"
		deliver(t, s2, disputeEvent("closed", d))
	}()
	go func() {
		defer wg.Done()
		deliver(t, s2, stripeEvent(newEventID(), "charge.refunded", refundedCharge(pays[2], starterAmount, 500)))
		d := dispute(pays[2], "dp_storm_lost", "needs_response", starterAmount/2)
		deliver(t, s1, disputeEvent("created", d))
		d["status"] = "lost"
		deliver(t, s1, disputeEvent("closed", d))
	}()
	wg.Wait()
	deadline := time.Now().Add(90 * time.Second)
	for countRows(t, gdb, `SELECT count(*) FROM stripe_events WHERE status IN ('received', 'failed', 'parked')`) != 0 {
		if time.Now().After(deadline) {
			var left []struct{ ID, Type, Status, LastError string }
			gdb.Raw(`SELECT id, type, status, COALESCE(last_error, '') AS last_error FROM stripe_events WHERE status <> 'processed'`).Scan(&left)
			t.Fatalf("Stripe events not processed: %+v", left)
		}
		time.Sleep(50 * time.Millisecond)
	}
	for _, h := range holds[15:] {
		mustStatus(t, "release", releaseOverHTTP(t, c, who, h.HoldId).StatusCode(), nil, http.StatusOK)
	}
	waitFor(t, "the sweeper to expire the short holds", func() bool {
		return countRows(t, gdb, `SELECT count(*) FROM credit_holds WHERE customer_id = ? AND status = 'active'`, who) == 0
	})
	b := balanceOverHTTP(t, c, who)
	if b.Balance < 0 || b.Held != 0 || b.Available != b.Balance {
		t.Fatalf("balance %+v after every hold ended", b)
	}
	r, err := s2.admin(t).VerifyInvariantsWithResponse(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "verify", r.StatusCode(), r.Body, http.StatusOK)
	var owed int64
	for _, rc := range r.JSON200.Receivables {
		if rc.CustomerId == who {
			owed = rc.Shortfall
		}
	}
	// 3,000 bought; 500 consumed and 5×50 captured; P1 refunded (1,000),
	// P3 half refunded and half lost (1,000); P2's dispute won.
	if want := int64(3*starterCredits - 500 - 250 - 2*starterCredits); b.Balance-owed != want {
		t.Fatalf("balance %d, owed %d: net %d, want %d\nverify: %s", b.Balance, owed, b.Balance-owed, want, r.Body)
	}
	if !r.JSON200.Ok {
		t.Fatalf("verify: %s", r.Body)
	}
	assertInvariants(t, s1)
}

// Syncs on two servers race the top-up's late webhook delivered to both:
// credited once. A top-up whose PaymentIntent Stripe reports canceled is
// failed by the sync, nothing credited, and the next crossing tops up again.
func TestSyncRacingTheLateTopUpWebhookAndACanceledTopUp(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	env := syncEnv(t, fake.URL())
	s1 := startServer(t, env)
	s2 := startServer(t, env)
	evs := &stripeEvents{fake: fake}
	gdb := openDB(t, s1)
	saveCard(t, s1, evs, "late", topUpCard)
	grantOverHTTP(t, s1.service(t), "late", 1000, "grant-late")
	putAutoTopUp(t, s1, "late", client.AutoTopUpSettings{Enabled: true, Threshold: 500, Item: "starter"})
	spend(t, s1, "late", 600, "late-1")
	tops := autoTopUps(t, s1, "late")
	if len(tops) != 1 {
		t.Fatalf("%d top-ups, want 1", len(tops))
	}
	waitCharged(t, s1, tops[0].Id)
	all := fake.Sandbox().Events()
	var wg sync.WaitGroup
	for i := range 6 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s := []*server{s1, s2}[i%2]
			if i < 4 {
				// One sync runs at a time; the others are refused (409).
				r, err := s.admin(t).SyncStripeWithResponse(context.Background(), client.StripeSyncRequest{Since: future()})
				if err != nil || (r.StatusCode() != http.StatusOK && r.StatusCode() != http.StatusConflict) {
					t.Errorf("sync: %v %v", err, r)
				}
				return
			}
			for _, ev := range all[evs.sent:] {
				deliver(t, s, ev.Payload)
			}
		}()
	}
	wg.Wait()
	evs.sent = len(all)
	waitPayment(t, s1, tops[0].Id, client.PaymentStatusSucceeded)
	waitFor(t, "every Stripe event to be processed", func() bool {
		return countRows(t, gdb, `SELECT count(*) FROM stripe_events WHERE status IN ('received', 'failed', 'parked')`) == 0
	})
	if bal := balanceOf(t, gdb, "late"); bal != 400+starterCredits {
		t.Fatalf("balance %d, want %d", bal, 400+starterCredits)
	}
	if n := confirmations(t, gdb, tops[0].Id); n != 1 {
		t.Fatalf("%d confirmations", n)
	}

	// The next top-up's PaymentIntent is canceled at Stripe.
	spend(t, s1, "late", 400+starterCredits-100, "late-2")
	var second string
	for _, p := range autoTopUps(t, s1, "late") {
		if p.Id != tops[0].Id {
			second = p.Id
		}
	}
	got := waitCharged(t, s1, second)
	fake.SetFault(func(r *http.Request) (int, string, bool) {
		if r.Method == http.MethodGet && r.URL.Path == "/v1/payment_intents/"+*got.PaymentIntentId {
			return http.StatusOK, fmt.Sprintf(`{"id":%q,"object":"payment_intent","status":"canceled","amount":%d,"amount_received":0,"currency":"usd","livemode":false,"cancellation_reason":"abandoned","metadata":{"tally_payment_id":%q,"tally_customer_id":"late"}}`,
				*got.PaymentIntentId, starterAmount, second), true
		}
		return 0, "", false
	})
	stripeSync(t, s2, future())
	if p := getPayment(t, s1, second); p.Status != client.PaymentStatusFailed {
		t.Fatalf("the canceled top-up is %s after the sync, want failed", p.Status)
	}
	if bal := balanceOf(t, gdb, "late"); bal != 100 {
		t.Fatalf("balance %d, want 100", bal)
	}
	if a := getAutoTopUp(t, s1, "late"); a.InFlightPaymentId != nil {
		t.Fatalf("settings %+v, want nothing in flight", a)
	}
	fake.SetFault(nil)
	spend(t, s1, "late", 10, "late-3")
	if n := len(autoTopUps(t, s1, "late")); n != 3 {
		t.Fatalf("%d top-ups after the next crossing, want 3", n)
	}
	assertInvariants(t, s1)
}

// A dispute finds the credits held, the hold's release pays its claim, and
// then the dispute is won: everything it took comes back, what the hold
// paid included (more than the dispute's own revoke took).
func TestDisputeWonAfterTheHoldPaidItsClaim(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	s := startServer(t, payEnv(t, fake.URL()))
	svc := s.service(t)
	pay := buyStarter(t, fake, s, "won")
	long := 3600
	h := mustHoldOverHTTP(t, svc, "won", 800, &long)
	consumeOverHTTP(t, s, "won", 200)
	d := dispute(pay, "dp_won_held", "needs_response", starterAmount)
	deliver(t, s, disputeEvent("created", d))
	waitPayment(t, s, pay, client.PaymentStatusDisputed)
	mustStatus(t, "release", releaseOverHTTP(t, svc, "won", h.HoldId).StatusCode(), nil, http.StatusOK)
	if b := balanceOverHTTP(t, svc, "won"); b.Balance != 0 {
		t.Fatalf("balance %+v after the release, want the held credits taken by the dispute", b)
	}
	d["status"] = "won"
	deliver(t, s, disputeEvent("closed", d))
	waitPayment(t, s, pay, client.PaymentStatusSucceeded)
	if b := balanceOverHTTP(t, svc, "won"); b.Balance != 800 || b.Available != 800 {
		t.Fatalf("balance %+v after the dispute was won, want the 800 the hold paid back", b)
	}
	assertInvariants(t, s)
}

// The refund of an automatic top-up lands while the worker's charge of the
// next one is on its way to Stripe (it read the settings before the
// refund). The charge must not reach Stripe after the refund turned
// automatic top-up off: the refund waits for the charge in flight, which
// was started before it. Before the worker locked the settings for its
// charge, the refund committed 470 to 480 ms before the held charge went
// on (3 of 3 runs), and TestAutoTopUpRefundStopsAnUnchargedTopUp once saw
// the second PaymentIntent in a loaded make test.
func TestAutoTopUpRefundWaitsForTheChargeInFlight(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	s := startServer(t, payEnv(t, fake.URL()))
	evs := &stripeEvents{fake: fake}
	first := firstAutoTopUp(t, s, evs, "fly")

	// The next charge is held on its way to Stripe until released.
	held := holdCharges(fake)
	spend(t, s, "fly", 400+starterCredits-100, "fly-2")
	select {
	case <-held.arrived:
	case <-time.After(patience):
		t.Fatal("the second top-up's charge never reached Stripe")
	}
	done := deliverTimed(t, s, takeBack("refund", first))
	time.Sleep(500 * time.Millisecond) // the refund has time to commit, if it does not wait
	held.release()
	a := <-done
	mustStatus(t, "refund delivery", a.status, a.out, http.StatusOK)
	waitFor(t, "the held charge to go on to Stripe", func() bool { return held.passed.Load() != 0 })
	if a.at < held.passed.Load() {
		t.Fatalf("the refund turned automatic top-up off %v before the charge in flight went on to Stripe",
			time.Duration(held.passed.Load()-a.at))
	}
	if got := getAutoTopUp(t, s, "fly"); got.Status != client.AutoTopUpStatusDisabled {
		t.Fatalf("settings %+v, want disabled by the refund", got)
	}
	fake.SetFault(nil)
	evs.deliverNew(t, s)
	assertInvariants(t, s)
}
