package main

import (
	"context"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/tallybilling/tally/internal/stripeapi/stripefake"
	"github.com/tallybilling/tally/pkg/client"
)

// TestRefundAfterSpendingRevokesFromTheWholeBalance: a customer who spent
// 950 of 1000 bought credits and is refunded in full gives back the 50 left
// of the purchase and then the rest from other grants; what the balance
// cannot cover is recorded as a shortfall and listed as a receivable.
func TestRefundAfterSpendingRevokesFromTheWholeBalance(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	s := startServer(t, payEnv(t, fake.URL()))
	svc := s.service(t)

	// Other grants cover the whole refund: nothing is lost.
	grantOverHTTP(t, svc, "rich", 5000, "rich-welcome")
	pay := buyStarter(t, fake, s, "rich")
	consumeOverHTTP(t, s, "rich", 950) // the purchase grant expires first, so it is drawn first
	deliver(t, s, stripeEvent(newEventID(), "charge.refunded", refundedCharge(pay, starterAmount, starterAmount)))
	if b := balanceOverHTTP(t, svc, "rich"); b.Balance != 5000+starterCredits-950-starterCredits {
		t.Fatalf("balance after the full refund = %d, want %d (1000 revoked: 50 of the purchase, 950 of the rest)", b.Balance, 5000-950)
	}

	// Other grants cover part of it: the rest is a shortfall.
	grantOverHTTP(t, svc, "short", 200, "short-welcome")
	pay = buyStarter(t, fake, s, "short")
	consumeOverHTTP(t, s, "short", 950)
	deliver(t, s, stripeEvent(newEventID(), "charge.refunded", refundedCharge(pay, starterAmount, starterAmount)))
	if b := balanceOverHTTP(t, svc, "short"); b.Balance != 0 {
		t.Fatalf("balance after the full refund = %d, want 0 (250 revoked, 750 short)", b.Balance)
	}
	e := ledgerOverHTTP(t, svc, "short")[0]
	if e.Kind != client.Revoke || e.Amount != -250 || e.Shortfall == nil || *e.Shortfall != 750 ||
		e.Draws == nil || len(*e.Draws) != 2 || e.PaymentId == nil || *e.PaymentId != pay {
		t.Fatalf("revoke entry %+v, want -250 from two grants with a shortfall of 750", e)
	}
	gdb := openDB(t, s)
	if n := countRows(t, gdb, `SELECT count(*) FROM events WHERE type = 'credits.revoked' AND customer_id = 'short'
		AND (data->>'amount')::bigint = 250 AND (data->>'shortfall')::bigint = 750`); n != 1 {
		t.Fatalf("%d credits.revoked events with amount 250 and shortfall 750, want 1", n)
	}

	// The shortfall is a receivable: listed, not a breach.
	r, err := s.admin(t).VerifyInvariantsWithResponse(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "verify", r.StatusCode(), r.Body, http.StatusOK)
	if !r.JSON200.Ok || len(r.JSON200.Receivables) != 1 ||
		r.JSON200.Receivables[0] != (client.Receivable{CustomerId: "short", Shortfall: 750, Revokes: 1}) {
		t.Fatalf("verify report %s, want ok with short owing 750", r.Body)
	}
	out, err := s.tallyCmd(t, "verify")
	if err != nil || !strings.Contains(out, "receivable customer=short: 750 credits") {
		t.Fatalf("tally verify: %v\n%s", err, out)
	}
	assertInvariants(t, s)
}

// TestRefundFromThePurchaseGrantOnly: TALLY_REVOKE_FROM=purchase_grant keeps
// tally's first behaviour: only what is left of the purchase goes.
func TestRefundFromThePurchaseGrantOnly(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	env := payEnv(t, fake.URL())
	env["TALLY_REVOKE_FROM"] = "purchase_grant"
	s := startServer(t, env)
	svc := s.service(t)

	grantOverHTTP(t, svc, "keeper", 200, "keeper-welcome")
	pay := buyStarter(t, fake, s, "keeper")
	consumeOverHTTP(t, s, "keeper", 950)
	deliver(t, s, stripeEvent(newEventID(), "charge.refunded", refundedCharge(pay, starterAmount, starterAmount)))
	if b := balanceOverHTTP(t, svc, "keeper"); b.Balance != 200 {
		t.Fatalf("balance after the full refund = %d, want 200 (only the 50 left of the purchase revoked)", b.Balance)
	}
	e := ledgerOverHTTP(t, svc, "keeper")[0]
	if e.Kind != client.Revoke || e.Amount != -50 || e.Shortfall != nil {
		t.Fatalf("revoke entry %+v, want -50 and no shortfall", e)
	}
	r, err := s.admin(t).VerifyInvariantsWithResponse(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if !r.JSON200.Ok || len(r.JSON200.Receivables) != 0 {
		t.Fatalf("verify report %s, want ok without receivables", r.Body)
	}
	assertInvariants(t, s)
}

// TestRefundBeforeSuccessWaitsForIt: a refund (or dispute) that overtakes
// the success it is about is not an operator's problem: it keeps waiting,
// past the retry budget, and applies as soon as the success is processed.
// Only a day after Stripe created it is it parked.
func TestRefundBeforeSuccessWaitsForIt(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	env := payEnv(t, fake.URL())
	env["TALLY_STRIPE_EVENT_MAX_ATTEMPTS"] = "3"
	env["TALLY_STRIPE_EVENT_RETRY_INTERVAL"] = "50ms"
	s := startServer(t, env)
	gdb := openDB(t, s)

	// checkout.session.completed links the PaymentIntent, so the refund is
	// known to be ours though its success has not arrived yet.
	completed := func(customer string) string {
		pay := checkout(t, s, customer, "starter", 1)
		p := getPayment(t, s, pay)
		deliver(t, s, stripeEvent(newEventID(), "checkout.session.completed", checkoutSession(pay, customer, *p.CheckoutSessionId, "complete", "paid", starterAmount)))
		return pay
	}
	succeed := func(pay, customer string) {
		deliver(t, s, stripeEvent(newEventID(), "payment_intent.succeeded", paymentIntent(pay, customer, "succeeded", starterAmount, starterAmount, "usd")))
	}

	pay := completed("early-1")
	refund := newEventID()
	deliver(t, s, stripeEvent(refund, "charge.refunded", refundedCharge(pay, starterAmount, starterAmount)))
	disputed := completed("early-2")
	chargeback := newEventID()
	deliver(t, s, stripeEvent(chargeback, "charge.dispute.created", dispute(disputed, "dp_early_2", "needs_response", starterAmount)))

	// Well past the three attempts of the retry budget, both still wait.
	waitFor(t, "five attempts of each early event", func() bool {
		return eventAttempts(t, gdb, refund) >= 5 && eventAttempts(t, gdb, chargeback) >= 5
	})
	for _, id := range []string{refund, chargeback} {
		if st, le := eventStatus(t, gdb, id); st != "failed" || !strings.Contains(le, "waiting for") || !strings.Contains(le, "success") {
			t.Fatalf("early event %s: %s %q, want failed, waiting for the success", id, st, le)
		}
	}

	// The success applies them at once, not after their next backoff.
	succeed(pay, "early-1")
	succeed(disputed, "early-2")
	for _, id := range []string{refund, chargeback} {
		if st, le := eventStatus(t, gdb, id); st != "processed" {
			t.Fatalf("event %s right after the success: %s %q, want processed", id, st, le)
		}
	}
	if p := getPayment(t, s, pay); p.Status != client.PaymentStatusRefunded || p.AmountRefunded != starterAmount {
		t.Fatalf("payment = %+v", p)
	}
	if p := getPayment(t, s, disputed); p.Status != client.PaymentStatusDisputed || p.AmountDisputed != starterAmount {
		t.Fatalf("payment = %+v", p)
	}
	for _, c := range []string{"early-1", "early-2"} {
		if got := balanceOf(t, gdb, c); got != 0 {
			t.Fatalf("balance of %s = %d, want 0", c, got)
		}
	}

	// A day after Stripe created it, a refund still without its success
	// goes to an operator: at once when it is that old on arrival, and
	// when the day runs out while it waits.
	lonely := completed("early-3")
	stale := newEventID()
	deliver(t, s, stripeEventCreated(stale, "charge.refunded", time.Now().Add(-25*time.Hour), refundedCharge(lonely, starterAmount, starterAmount)))
	if st, le := eventStatus(t, gdb, stale); st != "parked" || !strings.Contains(le, "a day") {
		t.Fatalf("a day-old early refund: %s %q, want parked", st, le)
	}
	closing := newEventID()
	deliver(t, s, stripeEventCreated(closing, "charge.refunded", time.Now().Add(-24*time.Hour+2*time.Second), refundedCharge(lonely, starterAmount, starterAmount)))
	if st, _ := eventStatus(t, gdb, closing); st != "failed" {
		t.Fatalf("an early refund with two seconds to go: %s, want failed (waiting)", st)
	}
	waitFor(t, "the refund parked when its day ran out", func() bool { st, _ := eventStatus(t, gdb, closing); return st == "parked" })
	if p := getPayment(t, s, lonely); p.Status != client.PaymentStatusPending {
		t.Fatalf("payment = %s, want pending", p.Status)
	}
	assertInvariants(t, s)
}
