package main

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/tallybilling/tally/internal/stripeapi/stripefake"
	"github.com/tallybilling/tally/pkg/client"
)

// delivery is one signed webhook body and whether its id is shared with
// another body (a reused id: either may be the one stored).
type delivery struct {
	id   string
	body []byte
}

// burst posts every delivery copies times, shuffled, spread over servers,
// all at once; every copy must be acknowledged.
func burst(t *testing.T, servers []*server, ds []delivery, copies int, rng *rand.Rand) {
	t.Helper()
	var all []delivery
	for range copies {
		all = append(all, ds...)
	}
	rng.Shuffle(len(all), func(i, j int) { all[i], all[j] = all[j], all[i] })
	var wg sync.WaitGroup
	sem := make(chan struct{}, 24)
	for i, d := range all {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			st, out := postWebhook(t, servers[i%len(servers)], d.body, sign(d.body, testWebhookSecret, time.Now()))
			if st != http.StatusOK {
				t.Errorf("%s: a copy got %d: %s", d.id, st, out)
			}
		})
	}
	wg.Wait()
}

// settled waits until no stored event is left received or failed (every
// acknowledged delivery processed, ignored or parked).
func settled(t *testing.T, s *server) {
	t.Helper()
	gdb := openDB(t, s)
	waitForWithin(t, "every stored event settled", 90*time.Second, func() bool {
		return countRows(t, gdb, `SELECT count(*) FROM stripe_events WHERE status IN ('received', 'failed')`) == 0
	})
}

// TestHostileWebhookStormToTwoInstances is a hostile storm of real signed
// deliveries to two instances on one database: for each payment its
// session's completion and its PaymentIntent's success in either order,
// refunds and disputes racing the success, refused copies (wrong amount,
// wrong livemode) racing good ones, an event id reused with another body,
// each delivered many times at once. Every payment must be credited at
// most once, exactly once when a good success was delivered, every stored
// event must settle, and tally verify must stay clean.
func TestHostileWebhookStormToTwoInstances(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	envA := payEnv(t, fake.URL())
	a, b := twoServers(t, envA)
	gdb := openDB(t, a)
	rng := rand.New(rand.NewPCG(11, uint64(time.Now().UnixNano())))

	type want struct {
		pay, customer string
		credited      bool  // a good success was delivered
		refunded      int64 // amount refunded (cumulative, last word)
		disputed      bool
	}
	var wants []want
	var ds []delivery
	const n = 8
	for i := range n * 6 {
		kind := i % 6
		customer := fmt.Sprintf("storm-%d-%d", kind, i)
		pay := checkout(t, a, customer, "starter", 1)
		p := getPayment(t, a, pay)
		paidAtStripe(t, fake, a, pay)
		good := paymentIntent(pay, customer, "succeeded", starterAmount, starterAmount, "usd")
		cs := checkoutSession(pay, customer, *p.CheckoutSessionId, "complete", "paid", starterAmount)
		w := want{pay: pay, customer: customer, credited: true}
		add := func(typ string, obj map[string]any) string {
			id := newEventID()
			ds = append(ds, delivery{id, stripeEvent(id, typ, obj)})
			return id
		}
		switch kind {
		case 0: // session and success, both orders at once
			add("checkout.session.completed", cs)
			add("payment_intent.succeeded", good)
		case 1: // success only (Stripe asked for the session), plus a second success event
			add("payment_intent.succeeded", good)
			add("payment_intent.succeeded", good)
		case 2: // a half refund racing the success (its PaymentIntent linked first: before that, a refund names no payment tally knows)
			deliver(t, a, stripeEvent(newEventID(), "checkout.session.completed", cs))
			add("payment_intent.succeeded", good)
			add("charge.refunded", refundedCharge(pay, starterAmount, starterAmount/2))
			w.refunded = starterAmount / 2
		case 3: // a dispute racing the success (linked first, as above)
			deliver(t, a, stripeEvent(newEventID(), "checkout.session.completed", cs))
			add("payment_intent.succeeded", good)
			ds = append(ds, func() delivery {
				d := dispute(pay, "dp_"+pay, "needs_response", starterAmount)
				id := newEventID()
				return delivery{id, stripeEvent(id, "charge.dispute.created", d)}
			}())
			w.disputed = true
		case 4: // refused copies (amount, livemode) racing a good one
			bad := paymentIntent(pay, customer, "succeeded", starterAmount, starterAmount-1, "usd")
			add("payment_intent.succeeded", bad)
			live := paymentIntent(pay, customer, "succeeded", starterAmount, starterAmount, "usd")
			live["livemode"] = true
			add("payment_intent.succeeded", live)
			add("payment_intent.succeeded", good)
			add("checkout.session.completed", cs)
		case 5: // one id, two bodies: the good success and a refused one
			id := newEventID()
			bad := paymentIntent(pay, customer, "succeeded", starterAmount, starterAmount-1, "usd")
			ds = append(ds, delivery{id, stripeEvent(id, "payment_intent.succeeded", good)},
				delivery{id, stripeEvent(id, "payment_intent.succeeded", bad)})
			w.credited = false // decided by which body was stored
		}
		wants = append(wants, w)
	}
	burst(t, []*server{a, b}, ds, 5, rng)
	settled(t, a)

	for _, w := range wants {
		grants := countRows(t, gdb, `SELECT count(*) FROM credit_grants WHERE payment_id = ?`, w.pay)
		confirmations := countRows(t, gdb, `SELECT count(*) FROM payment_confirmations WHERE payment_id = ?`, w.pay)
		succeeded := countRows(t, gdb, `SELECT count(*) FROM events WHERE type = 'payment.succeeded' AND data->>'payment_id' = ?`, w.pay)
		if grants > 1 || confirmations > 1 || succeeded > 1 || grants != confirmations || grants != succeeded {
			t.Errorf("%s: %d grants, %d confirmations, %d payment.succeeded; want the same, at most 1", w.pay, grants, confirmations, succeeded)
		}
		if w.credited && grants != 1 {
			t.Errorf("%s: a good success was acknowledged but the payment has %d grants", w.pay, grants)
		}
		p := getPayment(t, a, w.pay)
		if w.refunded > 0 && p.AmountRefunded != w.refunded {
			t.Errorf("%s: refunded %d, want %d (%+v)", w.pay, p.AmountRefunded, w.refunded, p)
		}
		if w.refunded > 0 {
			if got := balanceOf(t, gdb, w.customer); got != starterCredits-w.refunded {
				t.Errorf("%s: balance %d after half a refund, want %d", w.customer, got, starterCredits-w.refunded)
			}
		}
		if w.disputed && countRows(t, gdb, `SELECT count(*) FROM payment_disputes WHERE payment_id = ?`, w.pay) != 1 {
			t.Errorf("%s: the dispute was not applied", w.pay)
		}
	}
	// Every stored success whose body was the good one is processed and
	// credited; a stored refused body is parked and credited nothing.
	var stored []struct {
		ID, Status string
		Payload    string
	}
	if err := gdb.Raw(`SELECT id, status, payload FROM stripe_events WHERE type = 'payment_intent.succeeded'`).Scan(&stored).Error; err != nil {
		t.Fatal(err)
	}
	for _, e := range stored {
		var ev struct {
			Livemode bool `json:"livemode"`
			Data     struct {
				Object struct {
					AmountReceived int64             `json:"amount_received"`
					Metadata       map[string]string `json:"metadata"`
					Livemode       bool              `json:"livemode"`
				} `json:"object"`
			} `json:"data"`
		}
		if err := json.Unmarshal([]byte(e.Payload), &ev); err != nil {
			t.Fatal(err)
		}
		good := ev.Data.Object.AmountReceived == starterAmount && !ev.Data.Object.Livemode
		pay := ev.Data.Object.Metadata["tally_payment_id"]
		if good && e.Status != "processed" {
			t.Errorf("%s (good body, payment %s) stored %s", e.ID, pay, e.Status)
		}
		grants := countRows(t, gdb, `SELECT count(*) FROM credit_grants WHERE payment_id = ?`, pay)
		if good && grants != 1 {
			t.Errorf("%s (good body, payment %s) stored and processed, but %d grants", e.ID, pay, grants)
		}
		// A refused body is parked, or (after the payment succeeded by
		// another event) a no-op.
		if !good && e.Status != "parked" && !(e.Status == "processed" && grants == 1) {
			t.Errorf("%s (refused body, payment %s) stored %s with %d grants", e.ID, pay, e.Status, grants)
		}
	}
	if t.Failed() {
		var rows []struct {
			ID, Type, Status, LastError string
			Attempts                    int
		}
		gdb.Raw(`SELECT id, type, status, coalesce(last_error, '') AS last_error, attempts FROM stripe_events WHERE type NOT LIKE 'payment_intent%' AND type NOT LIKE 'checkout%'`).Scan(&rows)
		for _, r := range rows {
			t.Logf("%+v", r)
		}
		return
	}
	assertInvariants(t, a)
	mustVerifyClean(t, b)
}

// TestKillMidStormOfBothStrategiesThenRestart: two instances of the real binary
// on one database, one killed (SIGKILL) in the middle of a storm of
// deliveries for payments of both strategies: legacy ones (the session's
// completion is stored under a lease by the link's transaction and
// confirms in a second one) and PaymentIntent ones (whose success may have
// to ask a slow Stripe for the session first). After the restart and
// Stripe's redelivery of what was never acknowledged, every acknowledged
// event is processed, every payment credited exactly once, verify clean.
func TestKillMidStormOfBothStrategiesThenRestart(t *testing.T) {
	t.Parallel()
	bin := buildTally(t)
	fake := stripefake.New(t)
	env := baseEnv(t)
	env["TALLY_STRIPE_API_URL"] = fake.URL()
	env["TALLY_STRIPE_EVENT_RETRY_INTERVAL"] = "100ms"
	env["TALLY_STRIPE_EVENT_LEASE"] = "2s"
	legacy := map[string]string{}
	for k, v := range env {
		legacy[k] = v
	}
	legacy["TALLY_CONFIRM_ON"] = "checkout_session"
	a := startChild(t, bin, legacy)
	b := startChild(t, bin, env)
	srvA := &server{URL: a.URL, DBURL: env["TALLY_DATABASE_URL"], env: legacy}
	srvB := &server{URL: b.URL, DBURL: env["TALLY_DATABASE_URL"], env: env}
	gdb := openDB(t, srvA)

	const perStrategy = 15
	var pays []string
	var events []delivery
	for i := range 2 * perStrategy {
		srv := []*server{srvA, srvB}[i%2]
		customer := fmt.Sprintf("kill-%d", i)
		pay := checkout(t, srv, customer, "starter", 1)
		p := getPayment(t, srv, pay)
		paidAtStripe(t, fake, srv, pay)
		pi, cs := newEventID(), newEventID()
		events = append(events,
			delivery{pi, stripeEvent(pi, "payment_intent.succeeded", paymentIntent(pay, customer, "succeeded", starterAmount, starterAmount, "usd"))},
			delivery{cs, stripeEvent(cs, "checkout.session.completed", checkoutSession(pay, customer, *p.CheckoutSessionId, "complete", "paid", starterAmount))})
		pays = append(pays, pay)
	}
	var all []delivery
	for range 4 {
		all = append(all, events...)
	}
	rand.Shuffle(len(all), func(i, j int) { all[i], all[j] = all[j], all[i] })
	fake.SetHang(150 * time.Millisecond)

	hc := &http.Client{Timeout: 30 * time.Second}
	var (
		mu    sync.Mutex
		acked = map[string]bool{}
		done  int
		wg    sync.WaitGroup
	)
	queue := make(chan delivery, len(all))
	for _, d := range all {
		queue <- d
	}
	close(queue)
	killAt := len(all) / 3
	killed := make(chan struct{})
	for w := range 16 {
		wg.Go(func() {
			for d := range queue {
				url := []string{a.URL, b.URL}[w%2]
				st, err := crashPost(hc, url, d.body)
				mu.Lock()
				if err == nil && st >= 200 && st < 300 {
					acked[d.id] = true
				}
				done++
				if done == killAt {
					close(killed)
				}
				mu.Unlock()
			}
		})
	}
	<-killed
	a.kill()
	wg.Wait()
	fake.SetHang(0)
	a2 := startChild(t, bin, legacy)
	// Stripe redelivers what was never acknowledged.
	for _, d := range events {
		if !acked[d.id] {
			st, err := crashPost(hc, []string{a2.URL, b.URL}[rand.IntN(2)], d.body)
			if err != nil || st != http.StatusOK {
				t.Fatalf("redelivery of %s: %d %v", d.id, st, err)
			}
			acked[d.id] = true
		}
	}
	waitForWithin(t, "every stored event settled", 2*time.Minute, func() bool {
		return countRows(t, gdb, `SELECT count(*) FROM stripe_events WHERE status <> 'processed'`) == 0
	})
	for _, d := range events {
		if n := countRows(t, gdb, `SELECT count(*) FROM stripe_events WHERE id = ? AND status = 'processed'`, d.id); n != 1 {
			t.Errorf("acknowledged event %s is not processed", d.id)
		}
	}
	for _, pay := range pays {
		grants := countRows(t, gdb, `SELECT count(*) FROM credit_grants WHERE payment_id = ?`, pay)
		confirmations := countRows(t, gdb, `SELECT count(*) FROM payment_confirmations WHERE payment_id = ?`, pay)
		succeeded := countRows(t, gdb, `SELECT count(*) FROM events WHERE type = 'payment.succeeded' AND data->>'payment_id' = ?`, pay)
		if grants != 1 || confirmations != 1 || succeeded != 1 {
			t.Errorf("%s: %d grants, %d confirmations, %d payment.succeeded; want 1 each", pay, grants, confirmations, succeeded)
		}
	}
	if t.Failed() {
		t.Logf("killed child:\n%s\nother:\n%s\nrestarted:\n%s", a.tail(30), b.tail(30), a2.tail(30))
		return
	}
	assertInvariants(t, srvB)
}

// TestRefundRacingItsSuccessIsWoken: a refund that overtakes its
// payment's success waits for it (payments.Waiting) and is applied as soon
// as the success is processed (wakeWaiting), not at its next backoff: with
// the retry interval as long as production's, each refund racing its
// success must be applied within a few seconds of the success.
func TestRefundRacingItsSuccessIsWoken(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	env := payEnv(t, fake.URL())
	env["TALLY_STRIPE_EVENT_RETRY_INTERVAL"] = "30s"
	a := startServer(t, env)
	gdb := openDB(t, a)
	const n = 12
	var pays []string
	var ds []delivery
	for i := range n {
		customer := fmt.Sprintf("woken-%d", i)
		pay := checkout(t, a, customer, "starter", 1)
		p := getPayment(t, a, pay)
		paidAtStripe(t, fake, a, pay)
		deliver(t, a, stripeEvent(newEventID(), "checkout.session.completed", checkoutSession(pay, customer, *p.CheckoutSessionId, "complete", "paid", starterAmount)))
		pi, rf := newEventID(), newEventID()
		ds = append(ds, delivery{pi, stripeEvent(pi, "payment_intent.succeeded", paymentIntent(pay, customer, "succeeded", starterAmount, starterAmount, "usd"))},
			delivery{rf, stripeEvent(rf, "charge.refunded", refundedCharge(pay, starterAmount, starterAmount/2))})
		pays = append(pays, pay)
	}
	// Each payment's refund and success at once (the refund a moment
	// ahead, so that it usually holds the payment's lock first).
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			rf := ds[2*i+1]
			go deliver(t, a, rf.body)
			time.Sleep(time.Duration(i%4) * time.Millisecond)
			deliver(t, a, ds[2*i].body)
		})
	}
	wg.Wait()
	waitForWithin(t, "every refund racing its success applied", 10*time.Second, func() bool {
		return countRows(t, gdb, `SELECT count(*) FROM payments WHERE id IN ? AND amount_refunded = ?`, pays, starterAmount/2) == n
	})
}

// TestSavedCardAndTopUpEventsStormTwoInstances: the deliveries of a
// checkout that saves the card (its success is stored under a lease, the
// card saved in a step after the confirmation, against a slow Stripe) and
// then of the automatic top-up charged on that card, each sent many times
// at once to two instances on one database: each payment credited once,
// the card saved, every stored event processed, verify clean.
func TestSavedCardAndTopUpEventsStormTwoInstances(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	env := payEnv(t, fake.URL())
	a, b := twoServers(t, env)
	gdb := openDB(t, a)
	rng := rand.New(rand.NewPCG(12, uint64(time.Now().UnixNano())))
	sent := 0
	stormNew := func() {
		t.Helper()
		all := fake.Sandbox().Events()
		var ds []delivery
		for _, ev := range all[sent:] {
			ds = append(ds, delivery{ev.ID, ev.Payload})
		}
		sent = len(all)
		fake.SetHang(100 * time.Millisecond)
		burst(t, []*server{a, b}, ds, 6, rng)
		fake.SetHang(0)
		settled(t, a)
	}

	one, save := int64(1), true
	r, err := a.service(t).CreateCheckoutSessionWithResponse(context.Background(), &client.CreateCheckoutSessionParams{}, client.CheckoutSessionCreate{
		CustomerId: "storm-saver", Item: "starter", Quantity: &one, SavePaymentMethod: &save,
		SuccessUrl: "https://app.example.com/ok", CancelUrl: "https://app.example.com/no"})
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "checkout", r.StatusCode(), r.Body, http.StatusCreated)
	if res, err := fake.Sandbox().Pay(context.Background(), r.JSON201.CheckoutSessionId, "5555555555554444", "saver@example.com"); err != nil || res.Outcome != "succeeds" {
		t.Fatalf("pay: %+v %v", res, err)
	}
	stormNew()
	if c := customerOverHTTP(t, a, "storm-saver"); c.PaymentMethod == nil || c.PaymentMethod.Last4 != "4444" {
		t.Fatalf("saved card %+v", c.PaymentMethod)
	}
	if got := balanceOf(t, gdb, "storm-saver"); got != starterCredits {
		t.Fatalf("balance %d after the purchase, want %d", got, starterCredits)
	}

	putAutoTopUp(t, a, "storm-saver", client.AutoTopUpSettings{Enabled: true, Threshold: 500, Item: "starter"})
	spend(t, a, "storm-saver", 600, "storm-saver-1")
	tops := autoTopUps(t, a, "storm-saver")
	if len(tops) != 1 {
		t.Fatalf("%d top-ups", len(tops))
	}
	waitCharged(t, a, tops[0].Id)
	stormNew()
	waitPayment(t, b, tops[0].Id, client.PaymentStatusSucceeded)
	if got := balanceOf(t, gdb, "storm-saver"); got != starterCredits-600+starterCredits {
		t.Fatalf("balance %d after the top-up, want %d", got, 2*starterCredits-600)
	}
	for _, pay := range []string{r.JSON201.PaymentId, tops[0].Id} {
		if n := countRows(t, gdb, `SELECT count(*) FROM credit_grants WHERE payment_id = ?`, pay); n != 1 {
			t.Fatalf("%s: %d grants", pay, n)
		}
	}
	if n := countRows(t, gdb, `SELECT count(*) FROM stripe_events WHERE status <> 'processed' AND status <> 'ignored'`); n != 0 {
		t.Fatalf("%d stored events neither processed nor ignored", n)
	}
	assertInvariants(t, a)
}
