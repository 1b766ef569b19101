package main

import (
	"fmt"
	"net/http"
	"strings"
	"sync"
	"testing"

	"github.com/tallybilling/tally/internal/stripeapi/stripefake"
	"github.com/tallybilling/tally/pkg/client"
)

// TestAStaleAttemptNeverUndoesAProcessedEvent: the retry worker claims a
// refund that waits for its payment's success and asks Stripe for the
// PaymentIntent; Stripe hangs, then fails. Meanwhile the success arrives
// and applies the refund at once (it wakes the events waiting for it,
// without waiting for their leases). The hung attempt's failure then came
// last and was recorded over the processed event: failed, with Stripe's
// 503, retried later for nothing, and listed for an operator as failed
// although its refund was applied. An outcome never replaces processed.
func TestAStaleAttemptNeverUndoesAProcessedEvent(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	env := payEnv(t, fake.URL())
	env["TALLY_STRIPE_EVENT_RETRY_INTERVAL"] = "1s"
	env["TALLY_LOG_LEVEL"] = "info" // the outcome left unrecorded is told at info
	s := startServer(t, env)
	gdb := openDB(t, s)

	const customer = "stale-1"
	pay := checkout(t, s, customer, "starter", 1)
	var mu sync.Mutex
	hang, down := false, false
	hanging, release := make(chan struct{}, 1), make(chan struct{})
	fake.SetFault(func(r *http.Request) (int, string, bool) {
		if r.Method != http.MethodGet || r.URL.Path != "/v1/payment_intents/"+piID(pay) {
			return 0, "", false
		}
		mu.Lock()
		h := hang
		hang = false
		d := down || h
		down = d
		mu.Unlock()
		if h {
			hanging <- struct{}{}
			<-release
		}
		if d {
			return http.StatusServiceUnavailable, `{"error":{"type":"api_error","message":"down"}}`, true
		}
		return http.StatusOK, fmt.Sprintf(`{"id":%q,"object":"payment_intent","status":"requires_payment_method","amount":%d,"amount_received":0,"currency":"usd","livemode":false,"metadata":{"tally_payment_id":%q,"tally_customer_id":%q}}`,
			piID(pay), starterAmount, pay, customer), true
	})

	refund := newEventID()
	deliver(t, s, stripeEvent(refund, "charge.refunded", refundedCharge(pay, starterAmount, starterAmount)))
	if st, le := eventStatus(t, gdb, refund); st != "failed" || !strings.Contains(le, "waiting for") {
		t.Fatalf("refund before its success: %s %q, want failed, waiting for it", st, le)
	}
	// The retry worker's next attempt asks Stripe, which hangs.
	mu.Lock()
	hang = true
	mu.Unlock()
	<-hanging

	deliverSuccess(t, s, pay, customer)
	if st, le := eventStatus(t, gdb, refund); st != "processed" {
		t.Fatalf("refund right after its success: %s %q, want processed", st, le)
	}

	// Stripe answers the hung attempt with a 503 (and its retries too).
	close(release)
	waitFor(t, "the hung attempt to end", func() bool {
		st, _ := eventStatus(t, gdb, refund)
		return st != "processed" || strings.Contains(s.logs.String(), "not recorded over")
	})
	if st, le := eventStatus(t, gdb, refund); st != "processed" {
		t.Fatalf("refund after the hung attempt failed: %s %q, want processed still", st, le)
	}
	if p := getPayment(t, s, pay); p.Status != client.PaymentStatusRefunded || p.AmountRefunded != starterAmount {
		t.Fatalf("payment = %+v, want refunded once", p)
	}
	if got := balanceOf(t, gdb, customer); got != 0 {
		t.Fatalf("balance = %d, want 0 (the credits taken back once)", got)
	}
	assertInvariants(t, s)
}
