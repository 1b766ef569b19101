package main

import (
	"encoding/json"
	"testing"
	"time"

	"github.com/tallybilling/tally/internal/stripeapi/stripefake"
	"github.com/tallybilling/tally/pkg/client"
)

// TestSyncSuccessWakesTheRefundsWaitingForIt: after a webhook outage a
// refund can arrive before anything says its payment succeeded, and wait
// for that success (or, created over a day ago, be parked at once, still
// naming it). When the success then reaches tally through a sync rather
// than a webhook, the waiting refund must apply now, as a webhook's
// success makes it do: before, only its next retry (10 minutes here, up to
// an hour in production) applied the waiting one, and the parked one was
// never applied, so the buyer kept the credits and the money.
func TestSyncSuccessWakesTheRefundsWaitingForIt(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	env := syncEnv(t, fake.URL())
	env["TALLY_STRIPE_EVENT_RETRY_INTERVAL"] = "10m"
	s := startServer(t, env)
	gdb := openDB(t, s)
	pis := answerPaymentIntents(fake)

	refundFirst := func(customer string, created time.Time) (pay, event string) {
		pay = checkout(t, s, customer, "starter", 1)
		pis.name(pay, customer) // the refund finds its payment through its PaymentIntent
		paidAtStripe(t, fake, s, pay)
		var ev map[string]any
		if err := json.Unmarshal(stripeEvent(newEventID(), "charge.refunded", refundedCharge(pay, starterAmount, starterAmount)), &ev); err != nil {
			t.Fatal(err)
		}
		ev["created"] = created.Unix()
		body, err := json.Marshal(ev)
		if err != nil {
			t.Fatal(err)
		}
		deliver(t, s, body)
		return pay, ev["id"].(string)
	}
	waiting, waitingEvent := refundFirst("sync-wake-1", time.Now())
	if st, le := eventStatus(t, gdb, waitingEvent); st != "failed" {
		t.Fatalf("a refund before its success: %s %q, want failed (waiting for the success)", st, le)
	}
	parked, parkedEvent := refundFirst("sync-wake-2", time.Now().Add(-48*time.Hour))
	if st, le := eventStatus(t, gdb, parkedEvent); st != "parked" {
		t.Fatalf("a refund created two days before its success: %s %q, want parked", st, le)
	}

	// No webhook of the successes ever comes: a sync finds them.
	stripeSync(t, s, future())
	for _, c := range []struct{ customer, pay, event string }{
		{"sync-wake-1", waiting, waitingEvent}, {"sync-wake-2", parked, parkedEvent},
	} {
		waitForWithin(t, "the refund of "+c.customer+" applied after the sync", 15*time.Second, func() bool {
			st, _ := eventStatus(t, gdb, c.event)
			return st == "processed"
		})
		p := getPayment(t, s, c.pay)
		if p.Status != client.PaymentStatusRefunded || p.AmountRefunded != starterAmount {
			t.Fatalf("%s: payment %s refunded %d, want refunded %d", c.customer, p.Status, p.AmountRefunded, starterAmount)
		}
		if got := balanceOf(t, gdb, c.customer); got != 0 {
			t.Fatalf("%s: balance %d after the refund, want 0", c.customer, got)
		}
	}
	assertInvariants(t, s)
}
