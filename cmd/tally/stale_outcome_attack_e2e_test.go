package main

import (
	"context"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tallybilling/tally/pkg/client"
)

// heldPaymentIntent answers the GETs of one PaymentIntent as st would,
// except the calls listed in hold: call n (1-based) signals on hold[n].at,
// waits for hold[n].release and then answers status (0: as st would).
type heldCall struct {
	at      chan struct{}
	release chan struct{}
	status  int
}

func holdPaymentIntent(t *testing.T, st *invoiceStripe, pi string, hold map[int]*heldCall) func(r *http.Request) (int, string, bool) {
	t.Helper()
	var mu sync.Mutex
	calls := 0
	return func(r *http.Request) (int, string, bool) {
		if r.Method != http.MethodGet || r.URL.Path != "/v1/payment_intents/"+pi {
			return st.answer(r)
		}
		mu.Lock()
		calls++
		h := hold[calls]
		mu.Unlock()
		if h == nil {
			return st.answer(r)
		}
		h.at <- struct{}{}
		<-h.release
		if h.status != 0 {
			typ := "api_error"
			if h.status < 500 {
				typ = "invalid_request_error"
			}
			return h.status, `{"error":{"type":"` + typ + `","message":"held"}}`, true
		}
		return st.answer(r)
	}
}

func newHeld(status int) *heldCall {
	return &heldCall{at: make(chan struct{}, 1), release: make(chan struct{}), status: status}
}

func waitHeld(t *testing.T, h *heldCall, what string) {
	t.Helper()
	select {
	case <-h.at:
	case <-time.After(20 * time.Second):
		t.Fatalf("%s never asked Stripe", what)
	}
}

// TestAttackIgnoredNeverHidesAnAppliedRefund: a refund of a pay-by-invoice
// payment waits for invoice.paid. The retry worker's attempt asks Stripe
// for the PaymentIntent and hangs; invoice.paid comes and its wake takes
// the refund too, asking Stripe (the invoice's PaymentIntent is not
// linked yet) and hanging as well. The retry's answer is a 404: not ours,
// ignored, recorded first. The wake's answer is good: it takes the
// credits back and records processed last. An outcome that never
// replaces ignored leaves the event ignored although its money moved: an
// operator reading the events, or a replay policy keyed on status, is
// told nothing was done for a refund that was applied.
func TestAttackIgnoredNeverHidesAnAppliedRefund(t *testing.T) {
	t.Parallel()
	fake, st, env := invoiceStripeEnv(t)
	env["TALLY_STRIPE_EVENT_RETRY_INTERVAL"] = "1s"
	env["TALLY_LOG_LEVEL"] = "info"
	s := startServer(t, env)
	gdb := openDB(t, s)

	const customer = "ign-applied"
	pay, inv := invoicedPayment(t, s, st, customer)
	retry, wake := newHeld(http.StatusNotFound), newHeld(0)
	// Call 1: the delivery (answered: the refund waits for invoice.paid);
	// 2: the retry worker's attempt; 3: the wake's.
	fake.SetFault(holdPaymentIntent(t, st, piID(pay), map[int]*heldCall{2: retry, 3: wake}))

	refund := newEventID()
	deliver(t, s, stripeEventCreated(refund, "charge.refunded", time.Now(), refundedCharge(pay, proAmount, proAmount)))
	if status, le := eventStatus(t, gdb, refund); status != "failed" || !strings.Contains(le, "waiting for") {
		t.Fatalf("refund before invoice.paid: %s %q, want failed, waiting", status, le)
	}
	waitHeld(t, retry, "the retry worker's attempt")

	paid := make(chan struct{})
	go func() {
		defer close(paid)
		invoicePaid(t, s, fake, inv)
	}()
	waitHeld(t, wake, "invoice.paid's wake")

	close(retry.release) // 404: not ours, recorded ignored
	waitFor(t, "the retry's outcome", func() bool {
		status, _ := eventStatus(t, gdb, refund)
		return status == "ignored"
	})
	close(wake.release) // the wake applies the refund
	<-paid

	wantPayment(t, s, pay, client.PaymentStatusRefunded, proAmount)
	wantBalance(t, s, customer, 0)
	if status, le := eventStatus(t, gdb, refund); status != "processed" {
		t.Fatalf("refund whose credits were taken back: %s %q, want processed", status, le)
	}
	assertInvariants(t, s)
}

// TestAttackReplaysWakeIsNoReplay: an operator replays invoice.paid while
// the wake of its delivery is applying the refund waiting for it. The
// replay wakes the refund again (it is still failed then), and that
// attempt, asking Stripe, fails (503) after the first wake applied the
// refund. Only an operator's replay of the event itself may record over
// processed; the attempts its wake runs are ordinary attempts, and a 503
// recorded over the applied refund shows it failed and retries it for
// nothing, the very defect the guard was written for.
func TestAttackReplaysWakeIsNoReplay(t *testing.T) {
	t.Parallel()
	fake, st, env := invoiceStripeEnv(t) // retries 10 minutes apart: only wakes run
	env["TALLY_LOG_LEVEL"] = "info"
	s := startServer(t, env)
	gdb := openDB(t, s)

	const customer = "replay-wake"
	pay, inv := invoicedPayment(t, s, st, customer)
	first, second := newHeld(0), newHeld(http.StatusServiceUnavailable)
	// Call 1: the delivery; 2: the delivery's wake; 3: the replay's wake.
	fake.SetFault(holdPaymentIntent(t, st, piID(pay), map[int]*heldCall{2: first, 3: second}))

	refund := newEventID()
	deliver(t, s, stripeEventCreated(refund, "charge.refunded", time.Now(), refundedCharge(pay, proAmount, proAmount)))
	if status, le := eventStatus(t, gdb, refund); status != "failed" || !strings.Contains(le, "waiting for") {
		t.Fatalf("refund before invoice.paid: %s %q, want failed, waiting", status, le)
	}

	paidID := newEventID()
	paid := make(chan struct{})
	go func() {
		defer close(paid)
		deliver(t, s, stripeEvent(paidID, "invoice.paid", invoiceActionAt(t, fake, inv, "pay")))
	}()
	waitHeld(t, first, "invoice.paid's wake")

	replayed := make(chan struct{})
	go func() {
		defer close(replayed)
		rep, err := s.admin(t).ReplayStripeEventWithResponse(context.Background(), paidID)
		if err != nil {
			t.Errorf("replay: %v", err)
			return
		}
		if rep.StatusCode() != http.StatusOK {
			t.Errorf("replay: %d %s", rep.StatusCode(), rep.Body)
		}
	}()
	waitHeld(t, second, "the replay's wake")

	close(first.release) // the delivery's wake applies the refund
	<-paid
	if status, le := eventStatus(t, gdb, refund); status != "processed" {
		t.Fatalf("refund once the first wake applied it: %s %q", status, le)
	}
	close(second.release) // the replay's wake meets Stripe down
	<-replayed

	wantPayment(t, s, pay, client.PaymentStatusRefunded, proAmount)
	wantBalance(t, s, customer, 0)
	if status, le := eventStatus(t, gdb, refund); status != "processed" {
		t.Fatalf("applied refund after the replay's wake met Stripe down: %s %q, want processed", status, le)
	}
	assertInvariants(t, s)
}

// TestAttackStaleAttemptNeverUndoesADismissal: an operator dismisses a
// failed refund while the retry worker's attempt of it is asking Stripe,
// which hangs and then answers 503. The attempt's failure, recorded over
// dismissed, took the operator's decision back (the stripe_event.dismissed
// event was sent all the same): the refund was failed again, retried, and
// would be parked for an operator after its budget. Dismissed stays,
// unless an attempt ends processed (its money moved) or an operator
// replays it.
func TestAttackStaleAttemptNeverUndoesADismissal(t *testing.T) {
	t.Parallel()
	fake, st, env := invoiceStripeEnv(t)
	env["TALLY_STRIPE_EVENT_RETRY_INTERVAL"] = "1s"
	env["TALLY_LOG_LEVEL"] = "info"
	s := startServer(t, env)
	gdb := openDB(t, s)

	const customer = "dismiss-stale"
	pay, _ := invoicedPayment(t, s, st, customer)
	retry := newHeld(http.StatusServiceUnavailable)
	fake.SetFault(holdPaymentIntent(t, st, piID(pay), map[int]*heldCall{2: retry}))

	refund := newEventID()
	deliver(t, s, stripeEventCreated(refund, "charge.refunded", time.Now(), refundedCharge(pay, proAmount, proAmount)))
	if status, le := eventStatus(t, gdb, refund); status != "failed" || !strings.Contains(le, "waiting for") {
		t.Fatalf("refund before invoice.paid: %s %q, want failed, waiting", status, le)
	}
	waitHeld(t, retry, "the retry worker's attempt")
	r, err := s.admin(t).DismissStripeEventWithResponse(context.Background(), refund, client.StripeEventDismiss{Reason: "refunded by hand"})
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "dismiss", r.StatusCode(), r.Body, http.StatusOK)
	attempts := eventAttempts(t, gdb, refund)

	close(retry.release)
	waitFor(t, "the hung attempt to end", func() bool {
		status, _ := eventStatus(t, gdb, refund)
		return status != "dismissed" || strings.Contains(s.logs.String(), "not recorded over")
	})
	time.Sleep(2500 * time.Millisecond) // two retry rounds
	if status, le := eventStatus(t, gdb, refund); status != "dismissed" {
		t.Fatalf("dismissed refund after the hung attempt failed: %s %q, want dismissed", status, le)
	}
	if got := eventAttempts(t, gdb, refund); got != attempts {
		t.Fatalf("dismissed refund attempted again: %d attempts, had %d", got, attempts)
	}
	if p := getPayment(t, s, pay); p.AmountRefunded != 0 {
		t.Fatalf("payment of a dismissed refund = %+v, want nothing refunded", p)
	}
}
