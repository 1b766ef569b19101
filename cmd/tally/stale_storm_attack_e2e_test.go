package main

import (
	"context"
	"fmt"
	"maps"
	"math/rand/v2"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tallybilling/tally/internal/stripeapi/stripefake"
	"github.com/tallybilling/tally/pkg/client"
)

// TestAttackStaleAttemptStorm: three servers on one database, retries a
// second apart. Refunds and chargebacks of many payments arrive before
// their successes, while Stripe, asked for their PaymentIntents, is slow
// and often down; the successes then arrive, each twice, on different
// servers, while an operator replays refunds, disputes and successes at
// random. In the end every payment is credited once and taken back once,
// every event is processed, and the books verify.
func TestAttackStaleAttemptStorm(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	env := payEnv(t, fake.URL())
	env["TALLY_STRIPE_EVENT_RETRY_INTERVAL"] = "1s"
	env["TALLY_LOG_LEVEL"] = "info"
	servers := []*server{startServer(t, env), startServer(t, maps.Clone(env)), startServer(t, maps.Clone(env))}
	s := servers[0]
	gdb := openDB(t, s)

	var flaky atomic.Bool
	flaky.Store(true)
	var asked, failedAsks atomic.Int64
	var mu sync.Mutex
	named := map[string]string{}
	fake.SetFault(func(r *http.Request) (int, string, bool) {
		id, ok := strings.CutPrefix(r.URL.Path, "/v1/payment_intents/")
		if r.Method != http.MethodGet || !ok {
			return 0, "", false
		}
		asked.Add(1)
		if flaky.Load() {
			time.Sleep(time.Duration(rand.IntN(1500)) * time.Millisecond)
			if rand.IntN(3) == 0 {
				failedAsks.Add(1)
				return http.StatusServiceUnavailable, `{"error":{"type":"api_error","message":"down"}}`, true
			}
		}
		mu.Lock()
		md := named[id]
		mu.Unlock()
		return http.StatusOK, fmt.Sprintf(`{"id":%q,"object":"payment_intent","status":"requires_payment_method","amount":%d,"amount_received":0,"currency":"usd","livemode":false,"metadata":%s}`,
			id, starterAmount, md), true
	})

	const n = 30
	type buy struct {
		pay, customer string
		disputed      bool
		events        []string // the refund or dispute
		successes     []string
	}
	buys := make([]*buy, n)
	for i := range buys {
		b := &buy{customer: fmt.Sprintf("storm-%d", i), disputed: i%3 == 0}
		b.pay = checkout(t, s, b.customer, "starter", 1)
		mu.Lock()
		named[piID(b.pay)] = fmt.Sprintf(`{"tally_payment_id":%q,"tally_customer_id":%q}`, b.pay, b.customer)
		mu.Unlock()
		buys[i] = b
	}
	post := func(srv *server, body []byte) {
		status, out := postWebhook(t, srv, body, sign(body, testWebhookSecret, time.Now()))
		if status != http.StatusOK {
			t.Errorf("delivery: %d %s", status, out)
		}
	}
	replay := func(srv *server, id string) {
		rep, err := srv.admin(t).ReplayStripeEventWithResponse(context.Background(), id)
		if err != nil {
			t.Errorf("replay %s: %v", id, err)
		} else if rep.StatusCode() != http.StatusOK {
			t.Errorf("replay %s: %d %s", id, rep.StatusCode(), rep.Body)
		}
	}

	// The refunds and chargebacks first, each on a random server.
	var wg sync.WaitGroup
	for _, b := range buys {
		id := newEventID()
		body := stripeEvent(id, "charge.refunded", refundedCharge(b.pay, starterAmount, starterAmount))
		if b.disputed {
			body = stripeEvent(id, "charge.dispute.created", dispute(b.pay, "dp_"+strings.TrimPrefix(b.pay, "pay_"), "needs_response", starterAmount))
		}
		b.events = append(b.events, id)
		wg.Add(1)
		go func() { defer wg.Done(); post(servers[rand.IntN(3)], body) }()
	}
	wg.Wait()
	time.Sleep(1500 * time.Millisecond) // retries under way, asking Stripe

	// The successes, twice each, on different servers, with replays of
	// the refunds and disputes meanwhile.
	for _, b := range buys {
		p := getPayment(t, s, b.pay)
		cs, ok := newEventID(), newEventID()
		csBody := stripeEvent(cs, "checkout.session.completed", checkoutSession(b.pay, b.customer, *p.CheckoutSessionId, "complete", "paid", starterAmount))
		okBody := stripeEvent(ok, "payment_intent.succeeded", paymentIntent(b.pay, b.customer, "succeeded", starterAmount, starterAmount, "usd"))
		b.successes = []string{cs, ok}
		first := rand.IntN(3)
		for copy := range 2 {
			srv := servers[(first+copy)%3]
			wg.Add(1)
			go func() {
				defer wg.Done()
				if copy == 1 {
					time.Sleep(time.Duration(rand.IntN(200)) * time.Millisecond)
				}
				post(srv, csBody)
				post(srv, okBody)
			}()
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			time.Sleep(time.Duration(rand.IntN(300)) * time.Millisecond)
			replay(servers[rand.IntN(3)], b.events[0])
		}()
	}
	wg.Wait()
	// Replays of successes and of applied refunds while Stripe still flaps.
	for _, b := range buys[:n/2] {
		wg.Add(2)
		go func() { defer wg.Done(); replay(servers[rand.IntN(3)], b.successes[1]) }()
		go func() { defer wg.Done(); replay(servers[rand.IntN(3)], b.events[0]) }()
	}
	wg.Wait()
	flaky.Store(false)

	all := func() map[string]int {
		counts := map[string]int{}
		for _, b := range buys {
			for _, id := range append(append([]string{}, b.events...), b.successes...) {
				st, _ := eventStatus(t, gdb, id)
				counts[st]++
			}
		}
		return counts
	}
	waitForWithin(t, "every event processed", 90*time.Second, func() bool { return all()["processed"] == 3*n })
	for _, b := range buys {
		p := getPayment(t, s, b.pay)
		switch {
		case b.disputed && (p.Status != client.PaymentStatusDisputed || p.AmountDisputed != starterAmount):
			t.Errorf("disputed %s: %+v", b.pay, p)
		case !b.disputed && (p.Status != client.PaymentStatusRefunded || p.AmountRefunded != starterAmount):
			t.Errorf("refunded %s: %+v", b.pay, p)
		}
		if got := balanceOf(t, gdb, b.customer); got != 0 {
			t.Errorf("balance of %s = %d, want 0", b.customer, got)
		}
		if n := countRows(t, gdb, `SELECT count(*) FROM credit_grants WHERE payment_id = ?`, b.pay); n != 1 {
			t.Errorf("%s: %d grants, want 1", b.pay, n)
		}
	}
	unrecorded, byOutcome := 0, map[string]int{}
	for _, srv := range servers {
		for line := range strings.SplitSeq(srv.logs.String(), "\n") {
			if !strings.Contains(line, "not recorded over another attempt") {
				continue
			}
			unrecorded++
			for _, o := range []string{"processed", "failed", "parked", "ignored"} {
				if strings.Contains(line, `"outcome":"`+o+`"`) || strings.Contains(line, "outcome="+o) {
					byOutcome[o]++
				}
			}
		}
	}
	t.Logf("outcomes not recorded, by outcome: %v", byOutcome)
	t.Logf("%d payments (%d disputed), %d events, Stripe asked %d times (%d answered 503), %d outcomes not recorded over processed",
		n, (n+2)/3, 3*n, asked.Load(), failedAsks.Load(), unrecorded)
	receivablesOverHTTP(t, s)
	assertInvariants(t, s)
}
