package main

import (
	"context"
	"fmt"
	"maps"
	"math/rand/v2"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tallybilling/tally/internal/stripeapi/stripefake"
	"github.com/tallybilling/tally/pkg/client"
)

// TestAttackAutoTopUpTakenBackBeforeItsRecordOnThreeReplicas: three
// replicas on one database, each running the automatic top-up worker and
// the background catch-up every second. Stripe charges every top-up but
// its answers are lost, so no replica records a PaymentIntent; meanwhile
// Stripe's success, and then the refund or the chargeback of each top-up,
// reach tally by webhook (on any replica, some twice) and by the catch-up
// listing them, while Stripe answers lookups slowly and often 503. Then
// Stripe's answers come through: each top-up is credited once and taken
// back once, automatic top-up is off, no event is left failed or waiting,
// each outcome is counted once, and the books verify.
func TestAttackAutoTopUpTakenBackBeforeItsRecordOnThreeReplicas(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	env := syncEnv(t, fake.URL())
	env["TALLY_STRIPE_SYNC_INTERVAL"] = "1s"
	env["TALLY_STRIPE_EVENT_RETRY_INTERVAL"] = "1s"
	env["TALLY_STRIPE_EVENT_LEASE"] = "2s"
	env["TALLY_DB_MAX_OPEN_CONNS"] = "8"
	servers := []*server{startServer(t, env), startServer(t, maps.Clone(env)), startServer(t, maps.Clone(env))}
	s := servers[0]
	gdb := openDB(t, s)
	evs := &stripeEvents{fake: fake}

	const k = 6
	customers := make([]string, k)
	for i := range customers {
		customers[i] = fmt.Sprintf("wake-top-%d", i)
		withAutoTopUp(t, s, evs, customers[i], topUpCard, 600, client.AutoTopUpSettings{Enabled: true, Threshold: 500, Item: "starter"})
	}

	var lost, flaky atomic.Bool
	var dropped, lookups, lookups503, lists503 atomic.Int64
	lost.Store(true)
	flaky.Store(true)
	fake.DropAnswers(func(r *http.Request) bool {
		if lost.Load() && r.Method == http.MethodPost && r.URL.Path == "/v1/payment_intents" {
			dropped.Add(1)
			return true
		}
		return false
	})
	down := `{"error":{"type":"api_error","message":"down"}}`
	fake.SetFault(func(r *http.Request) (int, string, bool) {
		if !flaky.Load() || r.Method != http.MethodGet {
			return 0, "", false
		}
		switch {
		case strings.HasPrefix(r.URL.Path, "/v1/payment_intents/"):
			lookups.Add(1)
			time.Sleep(time.Duration(rand.IntN(800)) * time.Millisecond)
			if rand.IntN(2) == 0 {
				lookups503.Add(1)
				return http.StatusServiceUnavailable, down, true
			}
		case r.URL.Path == "/v1/events":
			time.Sleep(time.Duration(rand.IntN(500)) * time.Millisecond)
			if rand.IntN(4) == 0 {
				lists503.Add(1)
				return http.StatusServiceUnavailable, down, true
			}
		}
		return 0, "", false
	})

	// deliverNew delivers what Stripe sent since the last call, each event
	// to a random replica, a third of them twice, concurrently.
	var sentMu sync.Mutex
	deliverNew := func() {
		sentMu.Lock()
		all := fake.Sandbox().Events()
		news := all[evs.sent:]
		evs.sent = len(all)
		sentMu.Unlock()
		var wg sync.WaitGroup
		for _, ev := range news {
			first := rand.IntN(3)
			for c := range 1 + rand.IntN(3)/2 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					time.Sleep(time.Duration(rand.IntN(500)) * time.Millisecond)
					srv := servers[(first+c)%3]
					status, out := postWebhook(t, srv, ev.Payload, sign(ev.Payload, testWebhookSecret, time.Now()))
					if status != http.StatusOK {
						t.Errorf("delivery of %s: %d %s", ev.Type, status, out)
					}
				}()
			}
		}
		wg.Wait()
	}

	for i, c := range customers {
		if st := spend(t, servers[i%3], c, 200, c+"-1"); st != http.StatusOK {
			t.Fatalf("%s: consume %d", c, st)
		}
	}
	// Stripe charges each card; no replica hears it.
	charged := map[string]string{} // customer -> PaymentIntent
	waitForWithin(t, "Stripe to charge every card", 20*time.Second, func() bool {
		for _, pi := range fake.Sandbox().Objects("payment_intent") {
			md, _ := pi["metadata"].(map[string]any)
			if c, _ := md["tally_customer_id"].(string); strings.HasPrefix(c, "wake-top-") && pi["status"] == "succeeded" {
				charged[c] = pi["id"].(string)
			}
		}
		return len(charged) == k
	})
	deliverNew() // the successes
	for i, c := range customers {
		var err error
		if i%2 == 0 {
			_, err = fake.Sandbox().Refund(context.Background(), charged[c], 0, "requested_by_customer")
		} else {
			_, err = fake.Sandbox().OpenDispute(context.Background(), charged[c], "fraudulent")
		}
		if err != nil {
			t.Fatalf("%s: take-back at Stripe: %v", c, err)
		}
	}
	deliverNew() // the refunds and chargebacks
	for _, c := range customers {
		tops := autoTopUps(t, s, c)
		if len(tops) != 1 || tops[0].PaymentIntentId != nil || tops[0].Status != client.PaymentStatusPending {
			t.Fatalf("%s: top-ups %+v, want one pending without its PaymentIntent", c, tops)
		}
	}
	time.Sleep(1500 * time.Millisecond) // retries, catch-ups, Stripe flapping
	lost.Store(false)                   // the workers hear Stripe again
	time.Sleep(1500 * time.Millisecond)
	flaky.Store(false)

	waitForWithin(t, "every stored event processed or ignored", 40*time.Second, func() bool {
		return countRows(t, gdb, `SELECT count(*) FROM stripe_events WHERE status NOT IN ('processed', 'ignored')`) == 0
	})
	for i, c := range customers {
		tops := autoTopUps(t, s, c)
		if len(tops) != 1 {
			t.Errorf("%s: %d top-ups, want 1", c, len(tops))
			continue
		}
		p := tops[0]
		switch {
		case i%2 == 0 && (p.Status != client.PaymentStatusRefunded || p.AmountRefunded != starterAmount):
			t.Errorf("%s: refunded top-up %s refunded %d", c, p.Status, p.AmountRefunded)
		case i%2 == 1 && (p.Status != client.PaymentStatusDisputed || p.AmountDisputed != starterAmount):
			t.Errorf("%s: disputed top-up %s disputed %d", c, p.Status, p.AmountDisputed)
		}
		if p.PaymentIntentId == nil || *p.PaymentIntentId != charged[c] {
			t.Errorf("%s: top-up records PaymentIntent %v, want %s", c, p.PaymentIntentId, charged[c])
		}
		if b := balanceOf(t, gdb, c); b != 400 {
			t.Errorf("%s: balance %d, want 400 (the top-up credited and taken back)", c, b)
		}
		if n := countRows(t, gdb, `SELECT count(*) FROM credit_grants WHERE payment_id = ?`, p.Id); n != 1 {
			t.Errorf("%s: %d grants for the top-up, want 1", c, n)
		}
		if n := countRows(t, gdb, `SELECT count(*) FROM events WHERE customer_id = ? AND type = 'credits.revoked'`, c); n != 1 {
			t.Errorf("%s: %d credits.revoked, want 1", c, n)
		}
		if n := paymentIntentsOf(fake, c); n != 1 {
			t.Errorf("%s: Stripe holds %d PaymentIntents, want 1", c, n)
		}
		if a := getAutoTopUp(t, s, c); a.Status != client.AutoTopUpStatusDisabled {
			t.Errorf("%s: automatic top-up %s after its top-up was taken back, want disabled", c, a.Status)
		}
	}
	processed, other := processedCounted(t, servers)
	stored := countRows(t, gdb, `SELECT count(*) FROM stripe_events WHERE status = 'processed'`)
	if processed != stored {
		t.Errorf("the replicas counted %d events processed (tally_stripe_events_total), %d are: each once", processed, stored)
	}
	bySource := map[string]int64{}
	for _, src := range []string{"webhook", "sync"} {
		bySource[src] = countRows(t, gdb, `SELECT count(*) FROM stripe_events WHERE source = ?`, src)
	}
	t.Logf("%d top-ups (%d disputed), %d charge answers lost, PaymentIntent lookups %d (%d 503), %d listings 503; events %v by source, %d processed (counted %d), %d other outcomes counted; %d top-ups confirmed by the pending sync",
		k, k/2, dropped.Load(), lookups.Load(), lookups503.Load(), lists503.Load(), bySource, stored, processed, other,
		countRows(t, gdb, `SELECT count(*) FROM payments WHERE method = 'auto_top_up' AND confirmed_by = 'sync'`))
	receivablesOverHTTP(t, s)
	assertInvariants(t, s)
}

// Stripe charged a top-up but its answer was lost, and Stripe's success
// arrives while the top-up is still pending without its PaymentIntent: it
// waits for the worker to record it. Then the customer turns automatic
// top-up off, so the worker's retry fails the top-up without asking Stripe
// and records no PaymentIntent. The card was charged: the waiting success
// now credits it (a failed top-up without a PaymentIntent takes it), and
// must do so at once, not at its next retry (ten minutes here, up to an
// hour in production) while the money sits at Stripe and the customer has
// no credits for it.
func TestAttackAutoTopUpSuccessWaitingWhenItsTopUpFailsUnrecorded(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	env := payEnv(t, fake.URL())
	env["TALLY_DB_MAX_OPEN_CONNS"] = "8"
	s := startServer(t, env)
	evs := &stripeEvents{fake: fake}
	withAutoTopUp(t, s, evs, "unrec", topUpCard, 600, client.AutoTopUpSettings{Enabled: true, Threshold: 500, Item: "starter"})
	// The success waits a long time between retries: only a wake applies it soon.
	s.shutdown(t)
	env["TALLY_STRIPE_EVENT_RETRY_INTERVAL"] = "10m"
	s = startServer(t, env)
	gdb := openDB(t, s)

	fake.DropAnswers(func(r *http.Request) bool { return r.URL.Path == "/v1/payment_intents" })
	spend(t, s, "unrec", 200, "unrec-1")
	tops := autoTopUps(t, s, "unrec")
	if len(tops) != 1 {
		t.Fatalf("%d top-ups, want 1", len(tops))
	}
	waitFor(t, "Stripe to charge the card", func() bool { return paymentIntentsOf(fake, "unrec") == 1 })
	var success string
	for _, ev := range evs.deliverNew(t, s) {
		if ev.Type == "payment_intent.succeeded" {
			success = ev.ID
		}
	}
	if success == "" {
		t.Fatal("Stripe sent no payment_intent.succeeded")
	}
	if st, le := eventStatus(t, gdb, success); st != "failed" {
		t.Fatalf("the success before the PaymentIntent was recorded: %s (%s), want failed (waiting)", st, le)
	}
	putAutoTopUp(t, s, "unrec", client.AutoTopUpSettings{Enabled: false, Threshold: 500, Item: "starter"})
	fake.DropAnswers(nil)
	waitForWithin(t, "the waiting success to credit the charged top-up", 15*time.Second, func() bool {
		st, _ := eventStatus(t, gdb, success)
		return st == "processed"
	})
	p := waitPayment(t, s, tops[0].Id, client.PaymentStatusSucceeded)
	var moves []string
	for _, tr := range p.Transitions {
		moves = append(moves, move(tr))
	}
	if !slices.Equal(moves, []string{">pending", "pending>failed", "failed>succeeded"}) {
		t.Fatalf("top-up moved %v, want failed by the worker, then credited by the waiting success", moves)
	}
	if b := balanceOf(t, gdb, "unrec"); b != 400+starterCredits {
		t.Fatalf("balance %d, want %d", b, 400+starterCredits)
	}
	assertInvariants(t, s)
}
