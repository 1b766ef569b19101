package main

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/stripeapi/stripefake"
	"github.com/tallybilling/tally/pkg/client"
)

// TestUnlinkedRefundAttacks (rev-ooo): refunds and disputes of PaymentIntents
// not linked yet, delivered many times at once to two servers on one
// database, then the successes (also many times at once): a PaymentIntent
// whose metadata is forged to name another customer's pending payment must
// not take that customer's credits; a partial then a full refund of our own
// payment take back exactly what was refunded, once.
func TestUnlinkedRefundAttacks(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	env := payEnv(t, fake.URL())
	env["TALLY_STRIPE_EVENT_RETRY_INTERVAL"] = "1s"
	s, s2 := twoServers(t, env)
	gdb := openDB(t, s)

	var mu sync.Mutex
	metadata := map[string]string{}
	slowPI := ""
	live := map[string]bool{}
	fake.SetFault(func(r *http.Request) (int, string, bool) {
		if r.Method != http.MethodGet || !strings.HasPrefix(r.URL.Path, "/v1/payment_intents/") {
			return 0, "", false
		}
		mu.Lock()
		defer mu.Unlock()
		id := strings.TrimPrefix(r.URL.Path, "/v1/payment_intents/")
		if id == slowPI {
			mu.Unlock()
			time.Sleep(700 * time.Millisecond)
			mu.Lock()
		}
		md, ok := metadata[id]
		if !ok {
			md = `{}`
		}
		return http.StatusOK, fmt.Sprintf(`{"id":%q,"object":"payment_intent","status":"succeeded","amount":%d,"amount_received":%d,"currency":"usd","livemode":%t,"metadata":%s}`,
			id, starterAmount, starterAmount, live[id], md), true
	})
	started := func(customer string) string {
		pay := checkout(t, s, customer, "starter", 1)
		mu.Lock()
		metadata[piID(pay)] = fmt.Sprintf(`{"tally_payment_id":%q,"tally_customer_id":%q}`, pay, customer)
		mu.Unlock()
		return pay
	}
	storm := func(bodies ...[]byte) {
		var wg sync.WaitGroup
		for i := 0; i < 4; i++ {
			for j, b := range bodies {
				wg.Add(1)
				go func(srv *server, b []byte) {
					defer wg.Done()
					if code, out := postWebhook(t, srv, b, sign(b, testWebhookSecret, time.Now())); code != http.StatusOK {
						t.Logf("delivery answered %d %s", code, out)
					}
				}([]*server{s, s2}[(i+j)%2], b)
			}
		}
		wg.Wait()
	}
	succeed := func(pay, customer string) {
		p := getPayment(t, s, pay)
		storm(stripeEvent(newEventID(), "checkout.session.completed", checkoutSession(pay, customer, *p.CheckoutSessionId, "complete", "paid", starterAmount)),
			stripeEvent(newEventID(), "payment_intent.succeeded", paymentIntent(pay, customer, "succeeded", starterAmount, starterAmount, "usd")))
	}

	// The attacker's PaymentIntent names the victim's pending payment.
	victim := started("ooo-victim")
	attacker := started("ooo-attacker")
	mu.Lock()
	metadata[piID(attacker)] = fmt.Sprintf(`{"tally_payment_id":%q}`, victim)
	mu.Unlock()
	forgedDispute := stripeEvent(newEventID(), "charge.dispute.created", dispute(attacker, "dp_ooo_forged", "needs_response", starterAmount))
	forgedRefund := stripeEvent(newEventID(), "charge.refunded", refundedCharge(attacker, starterAmount, starterAmount))
	storm(forgedDispute, forgedRefund)

	// Our own payment: a partial refund then a full one, before the link.
	own := started("ooo-own")
	partial := stripeEvent(newEventID(), "charge.refunded", refundedCharge(own, starterAmount, starterAmount/4))
	full := stripeEvent(newEventID(), "charge.refunded", refundedCharge(own, starterAmount, starterAmount))
	storm(partial, full)

	// A refund Stripe created two days ago (redelivered after an outage):
	// parked at once as waiting past its day, still woken by the success.
	late := started("ooo-late")
	var lateEv map[string]any
	if err := json.Unmarshal(stripeEvent(newEventID(), "charge.refunded", refundedCharge(late, starterAmount, starterAmount)), &lateEv); err != nil {
		t.Fatal(err)
	}
	lateEv["created"] = time.Now().Add(-48 * time.Hour).Unix()
	lateBody, _ := json.Marshal(lateEv)
	storm(lateBody)
	if st, le := eventStatus(t, gdb, lateEv["id"].(string)); st != "parked" {
		t.Logf("late refund before its success: %s %q", st, le)
	}
	succeed(late, "ooo-late")
	waitFor(t, "the late refund applied", func() bool {
		p := getPayment(t, s, late)
		return p.Status == client.PaymentStatusRefunded && p.AmountRefunded == starterAmount
	})
	if got := balanceOf(t, gdb, "ooo-late"); got != 0 {
		t.Fatalf("late balance = %d, want 0", got)
	}

	// A chargeback opened, withdrawn and won, all before the link.
	won := started("ooo-won")
	d := dispute(won, "dp_ooo_won", "needs_response", starterAmount)
	opened := disputeEvent("created", d)
	withdrawn := disputeEvent("funds_withdrawn", d)
	dw := dispute(won, "dp_ooo_won", "won", starterAmount)
	closed := disputeEvent("closed", dw)
	storm(opened, withdrawn, closed)

	succeed(victim, "ooo-victim")
	succeed(own, "ooo-own")
	succeed(won, "ooo-won")
	storm(opened, withdrawn, closed)
	storm(forgedDispute, forgedRefund, partial, full)

	// The success lands while the refund's Stripe lookup is in flight.
	inflight := started("ooo-inflight")
	mu.Lock()
	slowPI = piID(inflight)
	mu.Unlock()
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		storm(stripeEvent(newEventID(), "charge.refunded", refundedCharge(inflight, starterAmount, starterAmount)))
	}()
	time.Sleep(200 * time.Millisecond)
	succeed(inflight, "ooo-inflight")
	wg.Wait()
	waitFor(t, "the in-flight refund applied", func() bool {
		p := getPayment(t, s, inflight)
		return p.Status == client.PaymentStatusRefunded && p.AmountRefunded == starterAmount
	})
	if got := balanceOf(t, gdb, "ooo-inflight"); got != 0 {
		t.Fatalf("in-flight balance = %d, want 0", got)
	}

	waitFor(t, "the own payment refunded", func() bool {
		p := getPayment(t, s, own)
		return p.Status == client.PaymentStatusRefunded && p.AmountRefunded == starterAmount
	})
	if p := getPayment(t, s, victim); p.Status != client.PaymentStatusSucceeded {
		t.Logf("victim right after the success storm: %s", p.Status)
		dumpNonCharge(t, gdb)
	}
	waitFor(t, "victim succeeded", func() bool { return getPayment(t, s, victim).Status == client.PaymentStatusSucceeded })
	if p := getPayment(t, s, victim); p.Status != client.PaymentStatusSucceeded || p.AmountRefunded != 0 || p.AmountDisputed != 0 {
		t.Fatalf("victim's payment = %+v, want succeeded, untouched", p)
	}
	if got := balanceOf(t, gdb, "ooo-victim"); got != starterCredits {
		t.Fatalf("victim balance = %d, want %d", got, starterCredits)
	}
	waitFor(t, "the won dispute settled", func() bool {
		var n int64
		gdb.Raw(`SELECT count(*) FROM stripe_events WHERE status NOT IN ('processed','ignored','rejected') AND waiting_for = ?`, piID(won)).Scan(&n)
		return n == 0
	})
	if p := getPayment(t, s, won); p.Status != client.PaymentStatusSucceeded {
		t.Fatalf("won payment = %+v, want succeeded", p)
	}
	if got := balanceOf(t, gdb, "ooo-won"); got != starterCredits {
		t.Fatalf("won balance = %d, want %d", got, starterCredits)
	}
	var rows []struct{ ID, Status, WaitingFor, LastError *string }
	gdb.Raw(`SELECT id, status, waiting_for, last_error FROM stripe_events WHERE type LIKE 'charge.%' ORDER BY received_at`).Scan(&rows)
	for _, r := range rows {
		t.Logf("%v %v %v %v", *r.ID, *r.Status, sv(r.WaitingFor), sv(r.LastError))
	}
	// Another PaymentIntent naming the refunded payment, and one of the
	// other livemode naming a pending one: neither may touch them.
	mu.Lock()
	metadata["pi_ooo_relink"] = fmt.Sprintf(`{"tally_payment_id":%q}`, own)
	pendingOne := ""
	mu.Unlock()
	pendingOne = started("ooo-live")
	mu.Lock()
	metadata["pi_ooo_live"] = fmt.Sprintf(`{"tally_payment_id":%q}`, pendingOne)
	live["pi_ooo_live"] = true
	mu.Unlock()
	relink := refundedCharge("pay_ooo_relink", starterAmount, starterAmount)
	liveCh := refundedCharge("pay_ooo_live", starterAmount, starterAmount)
	storm(stripeEvent(newEventID(), "charge.refunded", relink), stripeEvent(newEventID(), "charge.refunded", liveCh))
	succeed(pendingOne, "ooo-live")
	if got := balanceOf(t, gdb, "ooo-live"); got != starterCredits {
		t.Logf("live-mismatch balance right after the success storm = %d", got)
		dumpNonCharge(t, gdb)
	}
	waitFor(t, "live-mismatch credits", func() bool { return balanceOf(t, gdb, "ooo-live") == starterCredits })
	if got := balanceOf(t, gdb, "ooo-live"); got != starterCredits {
		t.Fatalf("live-mismatch balance = %d, want %d", got, starterCredits)
	}
	if got := balanceOf(t, gdb, "ooo-own"); got != 0 {
		t.Fatalf("own balance = %d, want 0", got)
	}
	var refunds int64
	if err := gdb.Raw(`SELECT count(*) FROM payment_refunds WHERE payment_id = ?`, own).Scan(&refunds).Error; err != nil {
		t.Log(err)
	}
	t.Logf("refund rows of own payment: %d", refunds)
	rows = nil
	gdb.Raw(`SELECT id, status, waiting_for, last_error FROM stripe_events WHERE type LIKE 'charge.%' AND status <> 'processed' ORDER BY received_at`).Scan(&rows)
	for _, r := range rows {
		t.Logf("end: %v %v %v %v", *r.ID, *r.Status, sv(r.WaitingFor), sv(r.LastError))
	}
	assertInvariants(t, s)
	assertInvariants(t, s2)
}

func sv(s *string) string {
	if s == nil {
		return ""
	}
	return *s
}

func dumpNonCharge(t *testing.T, gdb *gorm.DB) {
	var srows []struct{ ID, Type, Status, LastError *string }
	gdb.Raw(`SELECT id, type, status, last_error FROM stripe_events WHERE type NOT LIKE 'charge.%' ORDER BY received_at`).Scan(&srows)
	for _, r := range srows {
		t.Logf("success: %v %v %v %v", *r.ID, *r.Type, *r.Status, sv(r.LastError))
	}
}
