package main

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/stripeapi/stripefake"
	"github.com/tallybilling/tally/pkg/client"
)

// Hostile review of the automatic top-up worker's charge (chargeAutoTopUp),
// which holds the top-up's payment row and reads the customer's settings
// FOR SHARE while it calls Stripe: the take-backs, settings changes,
// replicas, slow Stripe and lost answers that meet it.

// heldCharges holds every off-session charge on its way to Stripe until
// release is called: arrived closes when the first one is held, passed
// is when the last held one went on (UnixNano, 0 before).
type heldCharges struct {
	arrived chan struct{}
	release func()
	passed  *atomic.Int64
}

func holdCharges(fake *stripefake.Fake) heldCharges {
	h := heldCharges{arrived: make(chan struct{}), passed: &atomic.Int64{}}
	gate := make(chan struct{})
	var once, rel sync.Once
	h.release = func() { rel.Do(func() { close(gate) }) }
	fake.SetFault(func(r *http.Request) (int, string, bool) {
		if r.Method == http.MethodPost && r.URL.Path == "/v1/payment_intents" {
			once.Do(func() { close(h.arrived) })
			select {
			case <-gate:
			case <-time.After(patience):
			}
			h.passed.Store(time.Now().UnixNano())
		}
		return 0, "", false
	})
	return h
}

// timedAnswer is a webhook delivery's answer and when it came (UnixNano).
type timedAnswer struct {
	status int
	out    []byte
	at     int64
}

// deliverTimed delivers the signed body to s in the background; the
// answer comes on the channel with its time.
func deliverTimed(t *testing.T, s *server, body []byte) <-chan timedAnswer {
	done := make(chan timedAnswer, 1)
	go func() {
		status, out := postWebhook(t, s, body, sign(body, testWebhookSecret, time.Now()))
		done <- timedAnswer{status, out, time.Now().UnixNano()}
	}()
	return done
}

// paymentIntentsOf counts the PaymentIntents Stripe holds for a tally
// customer (by the metadata the worker sets).
func paymentIntentsOf(fake *stripefake.Fake, customer string) int {
	n := 0
	for _, pi := range fake.Sandbox().Objects("payment_intent") {
		if md, ok := pi["metadata"].(map[string]any); ok && md["tally_customer_id"] == customer {
			n++
		}
	}
	return n
}

// takeBack is the refund or the chargeback of an automatic top-up.
func takeBack(kind string, p client.Payment) []byte {
	if kind == "refund" {
		ch := refundedCharge(p.Id, starterAmount, starterAmount)
		ch["payment_intent"] = *p.PaymentIntentId
		return stripeEvent(newEventID(), "charge.refunded", ch)
	}
	d := dispute(p.Id, "dp_"+p.Id, "needs_response", starterAmount)
	d["payment_intent"] = *p.PaymentIntentId
	return disputeEvent("created", d)
}

// The refund or the chargeback of an automatic top-up arrives, at either
// of two replicas that both run the worker, while the next top-up's
// charge is on its way to Stripe from one of them. The take-back waits for
// that charge (started before it), turns automatic top-up off, and no
// charge reaches Stripe after it: each customer's card is charged exactly
// twice (the first top-up and the one in flight), the one in flight is
// credited once, and a later crossing of the threshold starts nothing.
func TestAutoTopUpTakeBackWaitsForTheChargeInFlightOnEitherReplica(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	s1, s2 := twoServers(t, payEnv(t, fake.URL()))
	evs := &stripeEvents{fake: fake}
	gdb := openDB(t, s1)
	for _, tc := range []struct {
		kind string
		to   *server
	}{{"refund", s1}, {"refund", s2}, {"dispute", s1}, {"dispute", s2}} {
		who := fmt.Sprintf("fly-%s-%s", tc.kind, map[*server]string{s1: "a", s2: "b"}[tc.to])
		first := firstAutoTopUp(t, s1, evs, who)
		held := holdCharges(fake)
		spend(t, s2, who, 400+starterCredits-100, who+"-2")
		select {
		case <-held.arrived:
		case <-time.After(patience):
			t.Fatalf("%s: the second top-up's charge never reached Stripe", who)
		}
		done := deliverTimed(t, tc.to, takeBack(tc.kind, first))
		time.Sleep(500 * time.Millisecond) // the take-back has time to commit, if it does not wait
		held.release()
		a := <-done
		mustStatus(t, who+": take-back delivery", a.status, a.out, http.StatusOK)
		waitFor(t, who+": the held charge to go on", func() bool { return held.passed.Load() != 0 })
		if a.at < held.passed.Load() {
			t.Fatalf("%s: the %s turned automatic top-up off %v before the charge in flight went on to Stripe",
				who, tc.kind, time.Duration(held.passed.Load()-a.at))
		}
		fake.SetFault(nil)
		got := getAutoTopUp(t, s2, who)
		if got.Status != client.AutoTopUpStatusDisabled || got.DisabledReason == nil || !strings.Contains(*got.DisabledReason, tc.kind) {
			t.Fatalf("%s: settings %+v, want disabled by the %s", who, got, tc.kind)
		}
		tops := autoTopUps(t, s1, who)
		if len(tops) != 2 {
			t.Fatalf("%s: %d top-ups, want 2", who, len(tops))
		}
		second := waitCharged(t, s1, tops[1].Id)
		if second.PaymentIntentId == nil {
			t.Fatalf("%s: the charge in flight was not recorded: %+v", who, second)
		}
		evs.deliverNew(t, s2)
		evs.deliverNew(t, s1) // nothing new: only what Stripe sent since
		waitPayment(t, s1, second.Id, client.PaymentStatusSucceeded)
		if n := countRows(t, gdb, `SELECT count(*) FROM credit_grants WHERE payment_id = ?`, second.Id); n != 1 {
			t.Fatalf("%s: %d grants for the top-up in flight, want 1", who, n)
		}
		// Below the threshold again: off, so nothing starts.
		spend(t, s1, who, 50, who+"-3")
		time.Sleep(1500 * time.Millisecond) // more than a round of both workers
		if n := len(autoTopUps(t, s1, who)); n != 2 {
			t.Fatalf("%s: %d top-ups after the %s, want no new one", who, n, tc.kind)
		}
		if n := paymentIntentsOf(fake, who); n != 2 {
			t.Fatalf("%s: Stripe holds %d PaymentIntents of the customer, want 2", who, n)
		}
	}
	receivablesOverHTTP(t, s2)
	assertInvariants(t, s1)
}

// revtWaiting counts the server's backends waiting for a lock on a
// statement containing what.
// saveAtOnce sends n saves of customer's settings at once, each given
// timeout; the channel takes each one's HTTP status (0: no answer).
func saveAtOnce(t testing.TB, s *server, customer string, settings client.AutoTopUpSettings, n int, timeout time.Duration) <-chan int {
	answers := make(chan int, n)
	for range n {
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), timeout)
			defer cancel()
			r, err := s.service(t).PutAutoTopUpWithResponse(ctx, customer, settings)
			if err != nil {
				answers <- 0
				return
			}
			answers <- r.StatusCode()
		}()
	}
	return answers
}

func revtWaiting(t testing.TB, gdb *gorm.DB, what string) int64 {
	t.Helper()
	return countRows(t, gdb, `SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()
		AND pid <> pg_backend_pid() AND wait_event_type = 'Lock' AND query LIKE ?`, "%"+what+"%")
}

// The customer saves its automatic top-up settings several times (a
// settings page saving on each change) just as the worker takes the
// settings for a charge, on a server with the smallest pool it accepts.
// Each save waits for the charge in flight; the charge must not wait for
// a save: the worker read the saved card on a second connection while it
// held the settings, and with every other connection of the pool taken by
// a save waiting for those settings, nobody ever went on.
func TestAutoTopUpSettingsSavesDoNotStarveTheChargeInFlight(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	env := payEnv(t, fake.URL())
	env["TALLY_DB_MAX_OPEN_CONNS"] = "4"
	s := startServer(t, env)
	evs := &stripeEvents{fake: fake}
	gdb := openDB(t, s)
	settings := client.AutoTopUpSettings{Enabled: true, Threshold: 500, Item: "starter"}
	withAutoTopUp(t, s, evs, "saver", topUpCard, 1000, settings)

	// Stripe is down: the top-up stays pending and the worker comes back
	// for it every round.
	fake.SetFault(func(r *http.Request) (int, string, bool) {
		if r.URL.Path == "/v1/payment_intents" {
			return http.StatusServiceUnavailable, `{"error":{"type":"api_error","message":"down"}}`, true
		}
		return 0, "", false
	})
	spend(t, s, "saver", 600, "saver-1")
	tops := autoTopUps(t, s, "saver")
	if len(tops) != 1 {
		t.Fatalf("%d top-ups, want 1", len(tops))
	}
	// A save holds the settings when the worker's next round comes.
	tx := gdb.Begin()
	defer tx.Rollback()
	if err := tx.Exec(`SELECT 1 FROM auto_top_up_settings WHERE customer_id = 'saver' FOR UPDATE`).Error; err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the worker to wait for the settings", func() bool { return revtWaiting(t, gdb, "FOR SHARE") == 1 })
	fake.SetFault(nil)
	const saves = 6
	answers := saveAtOnce(t, s, "saver", settings, saves, 20*time.Second)
	// Every connection of the pool but the worker's is a save waiting.
	waitFor(t, "the saves to take the pool", func() bool { return revtWaiting(t, gdb, `INSERT INTO "auto_top_up_settings"`) >= 2 })
	time.Sleep(300 * time.Millisecond)
	t.Logf("%d saves wait on the database", revtWaiting(t, gdb, `INSERT INTO "auto_top_up_settings"`))
	tx.Rollback() // the first save ends: the worker has the settings, the others wait for it
	start := time.Now()
	for i := range saves {
		if st := <-answers; st != http.StatusOK {
			t.Fatalf("save %d answered %d after %s: the saves and the charge in flight waited for each other", i, st, time.Since(start).Round(time.Millisecond))
		}
	}
	p := waitCharged(t, s, tops[0].Id)
	if p.PaymentIntentId == nil {
		t.Fatalf("top-up %+v, want charged", p)
	}
	evs.deliverNew(t, s)
	waitPayment(t, s, p.Id, client.PaymentStatusSucceeded)
	assertInvariants(t, s)
}

// Stripe charged the next top-up but its answer was lost (as when the
// worker dies before it records the PaymentIntent); before the worker's
// retry, the previous top-up is refunded and automatic top-up turns
// itself off, so the retry fails the top-up without asking Stripe again.
// The card was charged all the same, before the refund: Stripe's
// payment_intent.succeeded for it must credit it (exactly once), not wait
// for a PaymentIntent the worker will never record while the money stays
// at Stripe.
func TestAutoTopUpChargedButLostThenTurnedOffIsStillCredited(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	s := startServer(t, payEnv(t, fake.URL()))
	evs := &stripeEvents{fake: fake}
	gdb := openDB(t, s)
	first := firstAutoTopUp(t, s, evs, "lost")

	fake.DropAnswers(func(r *http.Request) bool { return r.URL.Path == "/v1/payment_intents" })
	spend(t, s, "lost", 400+starterCredits-100, "lost-2")
	tops := autoTopUps(t, s, "lost")
	if len(tops) != 2 {
		t.Fatalf("%d top-ups, want 2", len(tops))
	}
	second := tops[1].Id
	waitFor(t, "Stripe to charge the second top-up", func() bool { return paymentIntentsOf(fake, "lost") == 2 })

	deliver(t, s, takeBack("refund", first))
	fake.DropAnswers(func(*http.Request) bool { return false })
	if p := waitPayment(t, s, second, client.PaymentStatusFailed); p.PaymentIntentId != nil {
		t.Fatalf("second top-up %+v", p)
	}
	var success string
	for _, ev := range evs.deliverNew(t, s) {
		if ev.Type == "payment_intent.succeeded" {
			success = ev.ID
			deliver(t, s, ev.Payload) // and once more: credited once
		}
	}
	if success == "" {
		t.Fatal("Stripe sent no payment_intent.succeeded for the second top-up")
	}
	if status, lastErr := eventStatus(t, gdb, success); status != "processed" {
		t.Fatalf("the second top-up's success is %s (%s): the card was charged and nothing was credited", status, lastErr)
	}
	p := waitPayment(t, s, second, client.PaymentStatusSucceeded)
	if p.PaymentIntentId == nil {
		t.Fatalf("second top-up %+v names no PaymentIntent", p)
	}
	if n := countRows(t, gdb, `SELECT count(*) FROM credit_grants WHERE payment_id = ?`, second); n != 1 {
		t.Fatalf("%d grants for the second top-up, want 1", n)
	}
	if n := paymentIntentsOf(fake, "lost"); n != 2 {
		t.Fatalf("Stripe holds %d PaymentIntents, want 2", n)
	}
	if got := getAutoTopUp(t, s, "lost"); got.Status != client.AutoTopUpStatusDisabled {
		t.Fatalf("settings %+v, want still off after the refund", got)
	}
	assertInvariants(t, s)
}

// The customer turns automatic top-up off while a top-up that started
// before is still uncharged (Stripe was down when the worker tried). Once
// Stripe answers again, that top-up must not be charged: the card's owner
// withdrew its consent before any charge was made. It fails, naming why.
func TestAutoTopUpTurnedOffByTheCustomerStopsAnUnchargedTopUp(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	s := startServer(t, payEnv(t, fake.URL()))
	evs := &stripeEvents{fake: fake}
	first := firstAutoTopUp(t, s, evs, "off")

	fake.SetFault(func(r *http.Request) (int, string, bool) {
		if r.URL.Path == "/v1/payment_intents" {
			return http.StatusServiceUnavailable, `{"error":{"type":"api_error","message":"down"}}`, true
		}
		return 0, "", false
	})
	spend(t, s, "off", 400+starterCredits-100, "off-2")
	tops := autoTopUps(t, s, "off")
	if len(tops) != 2 || tops[0].Id != first.Id {
		t.Fatalf("%d top-ups after the second crossing, want 2", len(tops))
	}
	second := tops[1].Id
	if got := putAutoTopUp(t, s, "off", client.AutoTopUpSettings{Enabled: false, Threshold: 500, Item: "starter"}); got.Status != client.AutoTopUpStatusDisabled {
		t.Fatalf("settings %+v after turning it off", got)
	}
	fake.SetFault(nil)
	waitFor(t, "the uncharged top-up to settle", func() bool {
		return paymentIntentsOf(fake, "off") > 1 || getPayment(t, s, second).Status != client.PaymentStatusPending
	})
	time.Sleep(1500 * time.Millisecond) // more than a round of the worker
	if n := paymentIntentsOf(fake, "off"); n != 1 {
		t.Fatalf("Stripe holds %d PaymentIntents: the card was charged after its owner turned automatic top-up off", n)
	}
	p := getPayment(t, s, second)
	if p.Status != client.PaymentStatusFailed || p.FailureReason == nil || !strings.Contains(*p.FailureReason, "turned off") {
		t.Fatalf("second top-up %s (%v), want failed because it was turned off", p.Status, deref(p.FailureReason))
	}
	// The card never failed: the count of failures in a row, which turns
	// automatic top-up off by itself at three, does not grow.
	if got := getAutoTopUp(t, s, "off"); got.ConsecutiveFailures != 0 || strings.Contains(deref(got.DisabledReason), "in a row") {
		t.Fatalf("settings %d failures in a row (%v) after a top-up failed because its owner turned it off", got.ConsecutiveFailures, deref(got.DisabledReason))
	}
	// Turned on again, the next crossing charges the card as before.
	putAutoTopUp(t, s, "off", client.AutoTopUpSettings{Enabled: true, Threshold: 500, Item: "starter"})
	spend(t, s, "off", 10, "off-3")
	tops = autoTopUps(t, s, "off")
	if len(tops) != 3 {
		t.Fatalf("%d top-ups after turning it on again, want 3", len(tops))
	}
	waitCharged(t, s, tops[2].Id)
	evs.deliverNew(t, s)
	waitPayment(t, s, tops[2].Id, client.PaymentStatusSucceeded)
	assertInvariants(t, s)
}

// Stripe hangs on a top-up's charge while, at two replicas, the previous
// top-up's refund arrives three times (one event, redelivered), a bought
// pack's chargeback twice, consumes, balance reads and a save of the
// settings pile up. Nothing deadlocks: once Stripe answers, every request
// is answered, the refund is applied once and the chargeback once, the
// charge in flight is credited once, no charge follows the refund, and
// both verify paths are clean.
func TestAutoTopUpStripeHangsWhileTakeBacksAndConsumesPileUp(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	s1, s2 := twoServers(t, payEnv(t, fake.URL()))
	servers := []*server{s1, s2}
	evs := &stripeEvents{fake: fake}
	gdb := openDB(t, s1)
	const who = "hang"
	first := firstAutoTopUp(t, s1, evs, who) // 1,400 credits
	bought := buyStarter(t, fake, s1, who)   // 2,400
	held := holdCharges(fake)
	spend(t, s2, who, 2000, who+"-cross") // 400: the next top-up starts
	select {
	case <-held.arrived:
	case <-time.After(patience):
		t.Fatal("the second top-up's charge never reached Stripe")
	}
	refund := takeBack("refund", first)
	chargeback := disputeEvent("created", dispute(bought, "dp_hang", "needs_response", starterAmount))
	var wg sync.WaitGroup
	errs := make(chan string, 64)
	// The customer saves its settings first, and the save is seen waiting
	// for the charge in flight before the refund is sent: enabling clears a
	// disabled status (PutAutoTopUp), so a save that reached the settings'
	// lock after the refund would rightly leave them enabled, and the
	// assertion below that the refund disabled them would fail by timing
	// (seen once under the full suite's load).
	wg.Go(func() {
		putAutoTopUp(t, s2, who, client.AutoTopUpSettings{Enabled: true, Threshold: 600, Item: "starter"})
	})
	waitFor(t, "the settings save waiting for the charge in flight", func() bool {
		return revtWaiting(t, gdb, `INSERT INTO "auto_top_up_settings"`) > 0
	})
	// When the first refund delivery that applied it (not a duplicate,
	// which is acknowledged once a copy stored the event) was answered.
	var refundAnswered atomic.Int64
	post := func(s *server, body []byte, what string) {
		defer wg.Done()
		status, out := postWebhook(t, s, body, sign(body, testWebhookSecret, time.Now()))
		if strings.HasPrefix(what, "refund") && !strings.Contains(string(out), `"duplicate":true`) {
			refundAnswered.CompareAndSwap(0, time.Now().UnixNano())
		}
		if status != http.StatusOK {
			errs <- fmt.Sprintf("%s: %d %s", what, status, out)
		}
	}
	for i, s := range []*server{s1, s2, s1} {
		wg.Add(1)
		go post(s, refund, fmt.Sprintf("refund delivery %d", i))
	}
	for i, s := range servers {
		wg.Add(1)
		go post(s, chargeback, fmt.Sprintf("chargeback delivery %d", i))
	}
	var spent atomic.Int64
	for i := range 10 {
		wg.Go(func() {
			switch st := spend(t, servers[i%2], who, 10, fmt.Sprintf("%s-pile-%d", who, i)); st {
			case http.StatusOK:
				spent.Add(10)
			case http.StatusPaymentRequired:
			default:
				errs <- fmt.Sprintf("consume %d: %d", i, st)
			}
		})
		wg.Go(func() { balanceOverHTTP(t, servers[(i+1)%2].service(t), who) })
	}
	time.Sleep(2 * time.Second) // Stripe hangs; everything piles up
	held.release()
	answered := make(chan struct{})
	go func() { wg.Wait(); close(answered) }()
	select {
	case <-answered:
	case <-time.After(patience):
		t.Fatal("requests still unanswered a minute after Stripe answered")
	}
	close(errs)
	for e := range errs {
		t.Error(e)
	}
	if t.Failed() {
		t.FailNow()
	}
	if refundAnswered.Load() == 0 {
		t.Fatal("every refund delivery was answered as a duplicate")
	}
	if refundAnswered.Load() < held.passed.Load() {
		t.Fatalf("a refund delivery was answered %v before the charge in flight went on to Stripe",
			time.Duration(held.passed.Load()-refundAnswered.Load()))
	}
	fake.SetFault(nil)

	tops := autoTopUps(t, s1, who)
	if len(tops) != 2 {
		t.Fatalf("%d top-ups, want 2", len(tops))
	}
	second := waitCharged(t, s1, tops[1].Id)
	if second.PaymentIntentId == nil {
		t.Fatalf("the charge in flight was not recorded: %+v", second)
	}
	evs.deliverNew(t, s2)
	waitPayment(t, s1, second.Id, client.PaymentStatusSucceeded)
	waitPayment(t, s1, first.Id, client.PaymentStatusRefunded)
	waitPayment(t, s1, bought, client.PaymentStatusDisputed)
	if n := countRows(t, gdb, `SELECT count(*) FROM credit_grants WHERE payment_id = ?`, second.Id); n != 1 {
		t.Fatalf("%d grants for the top-up in flight, want 1", n)
	}
	if n := countRows(t, gdb, `SELECT count(*) FROM payment_transitions WHERE payment_id = ? AND to_status = 'refunded' AND applied`, first.Id); n != 1 {
		t.Fatalf("the refund moved the top-up %d times, want once", n)
	}
	if n := countRows(t, gdb, `SELECT count(*) FROM payment_disputes WHERE payment_id = ?`, bought); n != 1 {
		t.Fatalf("%d disputes recorded, want 1", n)
	}
	if got := getAutoTopUp(t, s1, who); got.Status != client.AutoTopUpStatusDisabled {
		t.Fatalf("settings %+v, want disabled by the refund", got)
	}
	time.Sleep(1500 * time.Millisecond) // more than a round of both workers
	if n := paymentIntentsOf(fake, who); n != 2 {
		t.Fatalf("Stripe holds %d PaymentIntents of the customer, want 2", n)
	}
	owed, body := receivablesOverHTTP(t, s2)
	b := balanceOverHTTP(t, s1.service(t), who)
	t.Logf("spent %d while Stripe hung; balance %d, owed %d", spent.Load(), b.Balance, owed[who])
	// 400 after the crossing, less what was spent, less the refunded top-up
	// and the charged-back pack, plus the top-up in flight.
	if want := 400 - spent.Load() - 2*starterCredits + starterCredits; b.Balance-owed[who] != want {
		t.Fatalf("balance %d less %d owed, want %d: %s", b.Balance, owed[who], want, body)
	}
	assertInvariants(t, s1)
}

// The customer saves its settings while a top-up's charge is on its way to
// Stripe, and again right after the charge was recorded, before Stripe's
// success arrives. A save turning automatic top-up off waits for the
// charge in flight (it started before) and, once answered, no charge
// follows; the top-up in flight is credited once whatever the settings
// say by then. A save changing the pack or the threshold while a top-up
// is charged leaves that top-up as it was (its amount was fixed when it
// started) and applies from the next crossing.
func TestAutoTopUpSettingsSavedWhileAChargeIsInFlight(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	s := startServer(t, payEnv(t, fake.URL()))
	evs := &stripeEvents{fake: fake}
	gdb := openDB(t, s)
	const who = "saving"
	firstAutoTopUp(t, s, evs, who) // 1,400 credits

	// Turned off while the next charge is held on its way.
	held := holdCharges(fake)
	spend(t, s, who, 1000, who+"-2") // 400
	select {
	case <-held.arrived:
	case <-time.After(patience):
		t.Fatal("the second top-up's charge never reached Stripe")
	}
	saved := make(chan int64, 1)
	go func() {
		putAutoTopUp(t, s, who, client.AutoTopUpSettings{Enabled: false, Threshold: 500, Item: "starter"})
		saved <- time.Now().UnixNano()
	}()
	time.Sleep(500 * time.Millisecond) // the save has time to commit, if it does not wait
	held.release()
	at := <-saved
	waitFor(t, "the held charge to go on", func() bool { return held.passed.Load() != 0 })
	if at < held.passed.Load() {
		t.Fatalf("the save turning automatic top-up off answered %v before the charge in flight went on",
			time.Duration(held.passed.Load()-at))
	}
	fake.SetFault(nil)
	tops := autoTopUps(t, s, who)
	if len(tops) != 2 {
		t.Fatalf("%d top-ups, want 2", len(tops))
	}
	second := waitCharged(t, s, tops[1].Id)
	if second.PaymentIntentId == nil || second.Amount != starterAmount {
		t.Fatalf("the charge in flight: %+v", second)
	}
	evs.deliverNew(t, s)
	waitPayment(t, s, second.Id, client.PaymentStatusSucceeded) // 1,400
	if got := getAutoTopUp(t, s, who); got.Status != client.AutoTopUpStatusDisabled || got.InFlightPaymentId != nil {
		t.Fatalf("settings %+v, want off with nothing in flight", got)
	}
	spend(t, s, who, 1000, who+"-3") // 400: off, nothing starts
	time.Sleep(1500 * time.Millisecond)
	if n := paymentIntentsOf(fake, who); n != 2 || len(autoTopUps(t, s, who)) != 2 {
		t.Fatalf("Stripe holds %d PaymentIntents after automatic top-up was turned off, want 2", n)
	}

	// On again; the next top-up is charged, and right after the charge was
	// recorded (its success not delivered yet) the customer switches to the
	// pro pack below a higher threshold.
	putAutoTopUp(t, s, who, client.AutoTopUpSettings{Enabled: true, Threshold: 500, Item: "starter"})
	spend(t, s, who, 10, who+"-4") // 390: a starter pack starts
	tops = autoTopUps(t, s, who)
	if len(tops) != 3 {
		t.Fatalf("%d top-ups after turning it on, want 3", len(tops))
	}
	third := waitCharged(t, s, tops[2].Id)
	if third.PaymentIntentId == nil {
		t.Fatalf("third top-up %+v", third)
	}
	putAutoTopUp(t, s, who, client.AutoTopUpSettings{Enabled: true, Threshold: 2000, Item: "pro"})
	evs.deliverNew(t, s)
	third = waitPayment(t, s, third.Id, client.PaymentStatusSucceeded) // 1,390
	if third.Item != "starter" || third.Amount != starterAmount {
		t.Fatalf("third top-up %+v, want the starter pack it started as", third)
	}
	if n := countRows(t, gdb, `SELECT count(*) FROM credit_grants WHERE payment_id = ?`, third.Id); n != 1 {
		t.Fatalf("%d grants for the third top-up", n)
	}
	spend(t, s, who, 10, who+"-5") // 1,380 < 2,000: a pro pack starts
	tops = autoTopUps(t, s, who)
	if len(tops) != 4 || tops[3].Item != "pro" {
		t.Fatalf("top-ups %+v, want a fourth, of the pro pack", tops)
	}
	waitCharged(t, s, tops[3].Id)
	evs.deliverNew(t, s)
	waitPayment(t, s, tops[3].Id, client.PaymentStatusSucceeded)
	if b := balanceOf(t, gdb, who); b != 1380+6000 {
		t.Fatalf("balance %d, want %d", b, 1380+6000)
	}
	if n := paymentIntentsOf(fake, who); n != 4 {
		t.Fatalf("Stripe holds %d PaymentIntents, want 4", n)
	}
	assertInvariants(t, s)
}
