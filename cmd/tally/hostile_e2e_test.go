package main

import (
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tallybilling/tally/internal/stripeapi/stripefake"
	"github.com/tallybilling/tally/pkg/client"
)

// The cases a hostile review found by driving the real binary with a fake
// Stripe: events in the orders Stripe may deliver them, outages and clocks
// a payments engineer has to expect. Each ends with tally verify clean and
// the balances an accountant would write down.

// TestDisputeWonKeepsWhatARefundTookBack: a refund made at Stripe before a
// chargeback may be delivered after it. The chargeback took back the
// credits first (all of them), so the refund found nothing left to take;
// when the chargeback is then won, only what the refund did not pay for
// may come back, whichever TALLY_REVOKE_FROM is set. Delivered the other
// way round the same balances result.
func TestDisputeWonKeepsWhatARefundTookBack(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	for _, from := range []string{"balance", "purchase_grant"} {
		t.Run(from, func(t *testing.T) {
			env := payEnv(t, fake.URL())
			env["TALLY_REVOKE_FROM"] = from
			s := startServer(t, env)
			svc := s.service(t)
			for _, tc := range []struct {
				customer string
				refunded int64
				want     int64
			}{
				{"won-after-full-refund", starterAmount, 0},
				{"won-after-partial-refund", 400, starterCredits - 400},
			} {
				pay := buyStarter(t, fake, s, tc.customer)
				d := dispute(pay, "dp_"+from+"_"+tc.customer, "needs_response", starterAmount)
				deliver(t, s, disputeEvent("created", d))
				deliver(t, s, stripeEvent(newEventID(), "charge.refunded", refundedCharge(pay, starterAmount, tc.refunded)))
				d["status"] = "won"
				deliver(t, s, disputeEvent("closed", d))
				p := getPayment(t, s, pay)
				if p.Status != client.PaymentStatusRefunded || p.AmountRefunded != tc.refunded || p.AmountDisputed != 0 {
					t.Fatalf("%s after the win: %+v", tc.customer, p)
				}
				if b := balanceOverHTTP(t, svc, tc.customer); b.Balance != tc.want {
					t.Fatalf("%s: balance = %d, want %d: %d of %d paid was refunded, so its credits stay taken back",
						tc.customer, b.Balance, tc.want, tc.refunded, starterAmount)
				}
				if n := countRows(t, openDB(t, s), `SELECT count(*) FROM events WHERE type = 'payment.dispute_won'
					AND data->>'payment_id' = ? AND (data->>'credits_revoked_for_refunds')::bigint = ?`, pay, tc.refunded); n != 1 {
					t.Fatalf("%s: %d payment.dispute_won events saying %d credits stay taken back for the refund, want 1", tc.customer, n, tc.refunded)
				}
			}
			assertInvariants(t, s)
		})
	}
}

// TestRefundParkedAfterADayAppliesWhenTheSuccessComes: a refund that waited
// a day for its payment's success is parked for an operator, but it is
// still Stripe's word that the money went back: when the success finally
// arrives and credits the payment, the parked refund is applied with it,
// rather than leaving credits that were paid back.
func TestRefundParkedAfterADayAppliesWhenTheSuccessComes(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	s := startServer(t, payEnv(t, fake.URL()))
	gdb := openDB(t, s)

	pay := checkout(t, s, "late-success", "starter", 1)
	session := paidAtStripe(t, fake, s, pay)
	deliver(t, s, stripeEvent(newEventID(), "checkout.session.completed", session))
	refund := newEventID()
	deliver(t, s, stripeEventCreated(refund, "charge.refunded", time.Now().Add(-25*time.Hour), refundedCharge(pay, starterAmount, starterAmount)))
	if st, _ := eventStatus(t, gdb, refund); st != "parked" {
		t.Fatalf("a refund waiting over a day for its success: %s, want parked", st)
	}

	deliver(t, s, stripeEvent(newEventID(), "payment_intent.succeeded", paymentIntent(pay, "late-success", "succeeded", starterAmount, starterAmount, "usd")))
	if st, le := eventStatus(t, gdb, refund); st != "processed" {
		t.Fatalf("the parked refund once its success arrived: %s %q, want processed", st, le)
	}
	if p := getPayment(t, s, pay); p.Status != client.PaymentStatusRefunded || p.AmountRefunded != starterAmount {
		t.Fatalf("payment = %+v, want refunded in full", p)
	}
	if got := balanceOf(t, gdb, "late-success"); got != 0 {
		t.Fatalf("balance = %d, want 0: the payment was refunded in full", got)
	}
	assertInvariants(t, s)
}

// TestStripeOutageDuringConfirmationIsRetriedNotParked: confirming a
// payment whose Checkout Session has not told it its PaymentIntent asks
// Stripe for the session. While Stripe answers 5xx the success must be
// neither credited (nothing was checked) nor parked (nothing is wrong with
// it): it is retried, beyond the retry budget, and credits once Stripe
// answers again.
func TestStripeOutageDuringConfirmationIsRetriedNotParked(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	env := payEnv(t, fake.URL())
	env["TALLY_STRIPE_EVENT_MAX_ATTEMPTS"] = "3"
	env["TALLY_STRIPE_EVENT_RETRY_INTERVAL"] = "50ms"
	s := startServer(t, env)
	gdb := openDB(t, s)

	pay := checkout(t, s, "outage-buyer", "starter", 1)
	paidAtStripe(t, fake, s, pay)
	var down atomic.Bool
	down.Store(true)
	fake.SetFault(func(r *http.Request) (int, string, bool) {
		return http.StatusInternalServerError, `{"error":{"type":"api_error","message":"down"}}`,
			down.Load() && r.Method == http.MethodGet && strings.HasPrefix(r.URL.Path, "/v1/checkout/sessions/")
	})
	success := newEventID()
	deliver(t, s, stripeEvent(success, "payment_intent.succeeded", paymentIntent(pay, "outage-buyer", "succeeded", starterAmount, starterAmount, "usd")))
	waitFor(t, "twice the retry budget of attempts, or the event parked", func() bool {
		st, _ := eventStatus(t, gdb, success)
		return st == "parked" || eventAttempts(t, gdb, success) >= 6
	})
	if st, le := eventStatus(t, gdb, success); st != "failed" {
		t.Fatalf("the success while Stripe is down: %s %q, want failed (to retry)", st, le)
	}
	if got := balanceOf(t, gdb, "outage-buyer"); got != 0 {
		t.Fatalf("balance while the PaymentIntent could not be checked = %d, want 0", got)
	}

	down.Store(false)
	waitFor(t, "the success processed once Stripe answers", func() bool { st, _ := eventStatus(t, gdb, success); return st == "processed" })
	if got := balanceOf(t, gdb, "outage-buyer"); got != starterCredits {
		t.Fatalf("balance = %d, want %d", got, starterCredits)
	}
	assertInvariants(t, s)
}
