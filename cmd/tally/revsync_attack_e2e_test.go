package main

import (
	"fmt"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tallybilling/tally/internal/stripeapi/stripefake"
	"github.com/tallybilling/tally/pkg/client"
)

// Hostile review of "a success found by a sync wakes the refunds and
// disputes waiting for it".

// metadataStripe answers GET /v1/payment_intents/{id} with tally's
// metadata for the PaymentIntents a test names (as Checkout puts it there),
// so a refund of a payment nothing linked yet finds its payment.
type metadataStripe struct {
	mu       sync.Mutex
	metadata map[string]string // PaymentIntent -> metadata JSON
}

func newMetadataStripe(fake *stripefake.Fake) *metadataStripe {
	m := &metadataStripe{metadata: map[string]string{}}
	fake.SetFault(func(r *http.Request) (int, string, bool) {
		id, ok := strings.CutPrefix(r.URL.Path, "/v1/payment_intents/")
		if r.Method != http.MethodGet || !ok {
			return 0, "", false
		}
		m.mu.Lock()
		defer m.mu.Unlock()
		md, ok := m.metadata[id]
		if !ok {
			return 0, "", false
		}
		return http.StatusOK, fmt.Sprintf(`{"id":%q,"object":"payment_intent","status":"succeeded","amount":%d,"amount_received":%d,"currency":"usd","livemode":false,"metadata":%s}`,
			id, starterAmount, starterAmount, md), true
	})
	return m
}

// pendingPaidAtStripe checks a starter pack out for customer and pays it at
// Stripe, with no webhook of the success delivered.
func (m *metadataStripe) pendingPaidAtStripe(t *testing.T, fake *stripefake.Fake, s *server, customer string) string {
	t.Helper()
	pay := checkout(t, s, customer, "starter", 1)
	m.mu.Lock()
	m.metadata[piID(pay)] = fmt.Sprintf(`{"tally_payment_id":%q,"tally_customer_id":%q}`, pay, customer)
	m.mu.Unlock()
	paidAtStripe(t, fake, s, pay)
	return pay
}

// TestRevSyncManyParkedEventsAllApply: more than one claim's worth (20) of
// refunds and disputes park waiting for one payment's success (a buyer
// refunded in many parts during an outage, Stripe redelivering days
// later). The sync that finds the success must apply every one of them:
// a parked event left behind is applied by nothing (no retry), so its
// refund stays unapplied however long one waits.
func TestRevSyncManyParkedEventsAllApply(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	env := syncEnv(t, fake.URL())
	env["TALLY_STRIPE_EVENT_RETRY_INTERVAL"] = "10m"
	s := startServer(t, env)
	gdb := openDB(t, s)
	m := newMetadataStripe(fake)
	pay := m.pendingPaidAtStripe(t, fake, s, "rs-many")

	// 25 partial refunds of 40 each, cumulative; Stripe created them two
	// days ago, so each parks at once.
	const parts, each = 25, starterAmount / 25
	var ids []string
	for i := 1; i <= parts; i++ {
		id := newEventID()
		deliver(t, s, stripeEventCreated(id, "charge.refunded", time.Now().Add(-48*time.Hour), refundedCharge(pay, starterAmount, int64(i)*each)))
		if st, le := eventStatus(t, gdb, id); st != "parked" {
			t.Fatalf("refund %d: %s %q, want parked", i, st, le)
		}
		ids = append(ids, id)
	}
	stripeSync(t, s, future())
	for deadline := time.Now().Add(15 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		if countRows(t, gdb, `SELECT count(*) FROM stripe_events WHERE status = 'processed' AND type = 'charge.refunded'`) == parts {
			break
		}
	}
	var left []string
	for _, id := range ids {
		if st, le := eventStatus(t, gdb, id); st != "processed" {
			left = append(left, st+": "+le)
		}
	}
	if len(left) > 0 {
		t.Fatalf("%d refunds not applied after the sync:\n%s", len(left), strings.Join(left, "\n"))
	}
	wantPayment(t, s, pay, client.PaymentStatusRefunded, starterAmount)
	wantBalance(t, s, "rs-many", 0)
	assertInvariants(t, s)
}

// TestRevSyncRaceRefundRetrySuccessWebhookAndSync: a refund waiting for
// its payment's success is retried by its own backoff (every second here)
// while the success arrives twice at once: a webhook to one server and a
// sync on the other, sharing one database. The credits go back exactly
// once, one refund is recorded, and verify stays clean.
func TestRevSyncRaceRefundRetrySuccessWebhookAndSync(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	env := syncEnv(t, fake.URL())
	env["TALLY_STRIPE_EVENT_RETRY_INTERVAL"] = "1s"
	a, b := twoServers(t, env)
	gdb := openDB(t, a)
	m := newMetadataStripe(fake)
	const rounds = 4
	type bought struct{ customer, pay, refund string }
	var all []bought
	for i := range rounds {
		customer := fmt.Sprintf("rs-race-%d", i)
		pay := m.pendingPaidAtStripe(t, fake, a, customer)
		refund := newEventID()
		deliver(t, b, stripeEvent(refund, "charge.refunded", refundedCharge(pay, starterAmount, starterAmount)))
		if st, le := eventStatus(t, gdb, refund); st != "failed" {
			t.Fatalf("%s: refund before its success %s %q, want failed", customer, st, le)
		}
		all = append(all, bought{customer, pay, refund})
	}
	// Let the refunds' first retry come due, then race.
	time.Sleep(900 * time.Millisecond)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		stripeSync(t, a, future())
	}()
	for _, c := range all {
		wg.Add(1)
		go func() {
			defer wg.Done()
			obj := fake.CheckoutSession(*getPayment(t, b, c.pay).CheckoutSessionId)
			deliver(t, b, stripeEvent(newEventID(), "checkout.session.completed", obj))
		}()
	}
	wg.Wait()
	for _, c := range all {
		waitForWithin(t, "the refund of "+c.customer+" applied", 15*time.Second, func() bool {
			st, _ := eventStatus(t, gdb, c.refund)
			return st == "processed"
		})
		wantPayment(t, a, c.pay, client.PaymentStatusRefunded, starterAmount)
		wantBalance(t, a, c.customer, 0)
		if n := countRows(t, gdb, `SELECT count(*) FROM payment_refunds WHERE payment_id = ?`, c.pay); n != 1 {
			t.Fatalf("%s: %d refunds recorded, want 1", c.customer, n)
		}
		if n := countRows(t, gdb, `SELECT count(*) FROM payment_confirmations WHERE payment_id = ?`, c.pay); n != 1 {
			t.Fatalf("%s: %d confirmations, want 1", c.customer, n)
		}
	}
	assertInvariants(t, a)
	mustVerifyClean(t, b)
}

// TestRevSyncInvoicePaymentWakesRefundAndDispute: a pay-by-invoice payment
// paid at Stripe whose invoice.paid never came; a partial refund and a
// dispute of its PaymentIntent arrive first and wait keyed by the invoice.
// The sync that finds the invoice paid credits it and applies both now.
func TestRevSyncInvoicePaymentWakesRefundAndDispute(t *testing.T) {
	t.Parallel()
	fake, st, env := invoiceStripeEnv(t)
	env["TALLY_PENDING_CHECK_AFTER"] = "0s"
	env["TALLY_STRIPE_SYNC_INTERVAL"] = "0"
	s := startServer(t, env)
	gdb := openDB(t, s)
	pay, inv := invoicedPayment(t, s, st, "rs-inv")
	invoiceActionAt(t, fake, inv, "pay") // paid at Stripe; no webhook
	refund := newEventID()
	deliver(t, s, stripeEvent(refund, "charge.refunded", refundedCharge(pay, proAmount, 1000)))
	dp := dispute(pay, "dp_rsinv", "needs_response", proAmount-1000)
	disp := newEventID()
	deliver(t, s, stripeEvent(disp, "charge.dispute.created", dp))
	for _, id := range []string{refund, disp} {
		status, le := eventStatus(t, gdb, id)
		wantEvent(t, status, "failed", "before the invoice is paid", le)
		if !strings.Contains(le, inv) {
			t.Fatalf("event %s waits %q, not for invoice %s", id, le, inv)
		}
	}
	wantBalance(t, s, "rs-inv", 0)
	stripeSync(t, s, future())
	for _, id := range []string{refund, disp} {
		waitForWithin(t, "event "+id+" applied after the sync", 15*time.Second, func() bool {
			status, _ := eventStatus(t, gdb, id)
			return status == "processed"
		})
	}
	p := wantPayment(t, s, pay, client.PaymentStatusDisputed, 1000)
	if p.ConfirmedBy == nil {
		t.Fatalf("payment %+v not confirmed", p)
	}
	bal := balanceOverHTTP(t, s.service(t), "rs-inv").Balance
	t.Logf("balance after a refund of 1000 and a dispute of 4000 of 5000 (6000 credits): %d", bal)
	if bal != 0 {
		t.Fatalf("balance %d, want 0: the refund and the dispute took back every credit", bal)
	}
	assertInvariants(t, s)
}

// TestRevSyncFailedPaymentWakesNothing: a sync that fails the payment (its
// session expired) must not apply the refund waiting for it: no credits
// were given, none are taken, the payment stays failed with nothing
// refunded.
func TestRevSyncFailedPaymentWakesNothing(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	env := syncEnv(t, fake.URL())
	env["TALLY_STRIPE_EVENT_RETRY_INTERVAL"] = "10m"
	s := startServer(t, env)
	gdb := openDB(t, s)
	m := newMetadataStripe(fake)
	grantOverHTTP(t, s.service(t), "rs-fail", 700, "grant-rs-fail")
	pay := checkout(t, s, "rs-fail", "starter", 1)
	m.mu.Lock()
	m.metadata[piID(pay)] = fmt.Sprintf(`{"tally_payment_id":%q,"tally_customer_id":%q}`, pay, "rs-fail")
	m.mu.Unlock()
	refund := newEventID()
	deliver(t, s, stripeEvent(refund, "charge.refunded", refundedCharge(pay, starterAmount, starterAmount)))
	parked := newEventID()
	deliver(t, s, stripeEventCreated(parked, "charge.refunded", time.Now().Add(-48*time.Hour), refundedCharge(pay, starterAmount, starterAmount)))
	fake.UpdateCheckoutSession(*getPayment(t, s, pay).CheckoutSessionId, map[string]any{"status": "expired", "payment_status": "unpaid"})
	stripeSync(t, s, future())
	wantPayment(t, s, pay, client.PaymentStatusFailed, 0)
	time.Sleep(time.Second)
	if st, le := eventStatus(t, gdb, refund); st != "failed" {
		t.Fatalf("the waiting refund after its payment failed: %s %q, want failed", st, le)
	}
	if st, le := eventStatus(t, gdb, parked); st != "parked" {
		t.Fatalf("the parked refund after its payment failed: %s %q, want parked", st, le)
	}
	wantBalance(t, s, "rs-fail", 700)
	if n := countRows(t, gdb, `SELECT count(*) FROM payment_refunds WHERE payment_id = ?`, pay); n != 0 {
		t.Fatalf("%d refunds recorded of a failed payment", n)
	}
	assertInvariants(t, s)
}

// TestRevSyncAutoTopUpWakesRefund: an automatic top-up charged at Stripe
// whose payment_intent.succeeded never came, refunded (in full, Stripe
// created the refund two days ago so it parks) before anything said it
// succeeded. The sync credits it and applies the refund: the credits go
// back, once.
func TestRevSyncAutoTopUpWakesRefund(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	env := syncEnv(t, fake.URL())
	env["TALLY_STRIPE_EVENT_RETRY_INTERVAL"] = "10m"
	s := startServer(t, env)
	evs := &stripeEvents{fake: fake}
	gdb := openDB(t, s)
	withAutoTopUp(t, s, evs, "rs-top", topUpCard, 1000, client.AutoTopUpSettings{Enabled: true, Threshold: 500, Item: "starter"})
	spend(t, s, "rs-top", 600, "rs-top-1")
	tops := autoTopUps(t, s, "rs-top")
	if len(tops) != 1 {
		t.Fatalf("%d top-ups, want 1", len(tops))
	}
	p := waitCharged(t, s, tops[0].Id)
	ch := refundedCharge(p.Id, starterAmount, starterAmount)
	ch["payment_intent"] = *p.PaymentIntentId
	waitingRefund := newEventID()
	deliver(t, s, stripeEvent(waitingRefund, "charge.refunded", ch))
	parkedRefund := newEventID()
	deliver(t, s, stripeEventCreated(parkedRefund, "charge.refunded", time.Now().Add(-48*time.Hour), ch))
	if st, le := eventStatus(t, gdb, waitingRefund); st != "failed" {
		t.Fatalf("refund of a pending top-up: %s %q, want failed", st, le)
	}
	if st, le := eventStatus(t, gdb, parkedRefund); st != "parked" {
		t.Fatalf("old refund of a pending top-up: %s %q, want parked", st, le)
	}
	stripeSync(t, s, future())
	for _, id := range []string{waitingRefund, parkedRefund} {
		waitForWithin(t, "refund "+id+" applied after the sync", 15*time.Second, func() bool {
			st, _ := eventStatus(t, gdb, id)
			return st == "processed"
		})
	}
	wantPayment(t, s, p.Id, client.PaymentStatusRefunded, starterAmount)
	if bal := balanceOf(t, gdb, "rs-top"); bal != 400 {
		t.Fatalf("balance %d after the top-up was credited and refunded, want 400", bal)
	}
	if n := countRows(t, gdb, `SELECT count(*) FROM payment_refunds WHERE payment_id = ?`, p.Id); n != 1 {
		t.Fatalf("%d refunds recorded, want 1", n)
	}
	assertInvariants(t, s)
}

// TestRevSyncWakeThatFailsKeepsTheRetry: the wake a sync starts fails (a
// parked refund of a pay-by-invoice payment asks Stripe which invoice its
// PaymentIntent paid, and Stripe answers 500). The sync still reports the
// payment credited, the refund is left failed with a next attempt (not
// parked, not lost), and its retry applies it once Stripe answers.
func TestRevSyncWakeThatFailsKeepsTheRetry(t *testing.T) {
	t.Parallel()
	fake, st, env := invoiceStripeEnv(t)
	env["TALLY_PENDING_CHECK_AFTER"] = "0s"
	env["TALLY_STRIPE_SYNC_INTERVAL"] = "0"
	env["TALLY_STRIPE_EVENT_RETRY_INTERVAL"] = "1s"
	s := startServer(t, env)
	gdb := openDB(t, s)
	pay, inv := invoicedPayment(t, s, st, "rs-wakefail")
	invoiceActionAt(t, fake, inv, "pay") // paid at Stripe; no webhook
	refund := newEventID()
	deliver(t, s, stripeEventCreated(refund, "charge.refunded", time.Now().Add(-48*time.Hour), refundedCharge(pay, proAmount, proAmount)))
	status, le := eventStatus(t, gdb, refund)
	wantEvent(t, status, "parked", "an old refund before its invoice is paid", le)

	st.setFail("ip:"+piID(pay), http.StatusInternalServerError)
	res := stripeSync(t, s, future())
	if res.PaymentsChanged != 1 {
		t.Fatalf("sync %+v, want the payment changed", res)
	}
	wantPayment(t, s, pay, client.PaymentStatusSucceeded, 0)
	status, le = eventStatus(t, gdb, refund)
	if status != "failed" || countRows(t, gdb, `SELECT count(*) FROM stripe_events WHERE id = ? AND next_attempt_at IS NOT NULL`, refund) != 1 {
		t.Fatalf("the refund whose wake failed: %s %q, want failed with a next attempt", status, le)
	}
	wantBalance(t, s, "rs-wakefail", proCredits)

	st.setFail("ip:"+piID(pay), 0)
	waitForWithin(t, "the refund retried once Stripe answers", 20*time.Second, func() bool {
		status, _ := eventStatus(t, gdb, refund)
		return status == "processed"
	})
	wantPayment(t, s, pay, client.PaymentStatusRefunded, proAmount)
	wantBalance(t, s, "rs-wakefail", 0)
	assertInvariants(t, s)
}
