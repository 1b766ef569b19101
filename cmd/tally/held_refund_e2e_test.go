package main

import (
	"context"
	"net/http"
	"testing"

	"github.com/tallybilling/tally/internal/stripeapi/stripefake"
	"github.com/tallybilling/tally/pkg/client"
)

// A refund or a dispute that finds the customer's credits held cannot take
// them; when the hold ends (released over HTTP, expired by the sweeper, or
// captured in part), what comes back goes to the refund first, never back
// to the customer's spendable balance.
func TestRefundOrDisputeWhileHeldTakesWhatTheHoldGivesBack(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	env := payEnv(t, fake.URL())
	env["TALLY_CREDITS_SWEEP_INTERVAL"] = "200ms"
	s := startServer(t, env)
	svc := s.service(t)
	gdb := openDB(t, s)

	// heldThenTaken buys 1,000 credits, holds 800 (for expiresIn seconds),
	// spends 200, and has Stripe take the money back with event.
	heldThenTaken := func(customer string, expiresIn int, takeBack func(pay string)) client.HoldCreated {
		pay := buyStarter(t, fake, s, customer)
		h := mustHoldOverHTTP(t, svc, customer, 800, &expiresIn)
		consumeOverHTTP(t, s, customer, 200)
		takeBack(pay)
		if b := balanceOverHTTP(t, svc, customer); b.Balance != 800 || b.Available != 0 {
			t.Fatalf("%s: balance %+v while held, want 800 owned (held), none available", customer, b)
		}
		return h
	}
	refund := func(pay string) {
		deliver(t, s, stripeEvent(newEventID(), "charge.refunded", refundedCharge(pay, starterAmount, starterAmount)))
	}
	wantNothingLeft := func(customer string) {
		t.Helper()
		if b := balanceOverHTTP(t, svc, customer); b.Balance != 0 || b.Available != 0 || b.Held != 0 {
			t.Fatalf("%s: balance %+v after the hold ended, want nothing: the refunded credits came back", customer, b)
		}
		r, err := svc.ConsumeCreditsWithResponse(context.Background(), customer,
			&client.ConsumeCreditsParams{IdempotencyKey: newEventID()}, client.ConsumeRequest{Amount: 1, Reason: "usage"})
		if err != nil {
			t.Fatal(err)
		}
		if r.StatusCode() != http.StatusPaymentRequired {
			t.Fatalf("%s: consume of 1 after the hold ended: %d %s, want 402", customer, r.StatusCode(), r.Body)
		}
	}

	h := heldThenTaken("rel", 3600, refund)
	mustStatus(t, "release", releaseOverHTTP(t, svc, "rel", h.HoldId).StatusCode(), nil, http.StatusOK)
	wantNothingLeft("rel")

	h = heldThenTaken("cap", 3600, refund)
	mustStatus(t, "capture", captureOverHTTP(t, svc, "cap", h.HoldId, i64(300), "cap-300").StatusCode(), nil, http.StatusOK)
	wantNothingLeft("cap")

	// Long enough to be active still when the refund applies on a loaded
	// machine (a sweep before it made this test fail there), short enough
	// that the sweeper then ends it within the test.
	heldThenTaken("swept", 5, refund)
	waitFor(t, "the sweeper to expire the hold", func() bool {
		return countRows(t, gdb, `SELECT count(*) FROM credit_holds WHERE customer_id = 'swept' AND status = 'expired'`) == 1
	})
	wantNothingLeft("swept")

	h = heldThenTaken("disp", 3600, func(pay string) {
		deliver(t, s, disputeEvent("created", dispute(pay, "dp_held", "needs_response", starterAmount)))
	})
	mustStatus(t, "release", releaseOverHTTP(t, svc, "disp", h.HoldId).StatusCode(), nil, http.StatusOK)
	wantNothingLeft("disp")

	// What each still owes is what it spent: 200 before, 300 captured after.
	owed, body := receivablesOverHTTP(t, s)
	if owed["rel"] != 200 || owed["cap"] != 500 || owed["swept"] != 200 || owed["disp"] != 200 {
		t.Fatalf("verify %s, want rel 200, cap 500, swept 200, disp 200 owed", body)
	}
	if n := countRows(t, gdb, `SELECT count(*) FROM events WHERE type = 'credits.revoked' AND data->>'recovers_transaction_id' IS NOT NULL`); n != 4 {
		t.Fatalf("%d credits.revoked events paying a shortfall from a hold, want 4", n)
	}
	assertInvariants(t, s)
}
