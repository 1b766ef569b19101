package main

import (
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/tallybilling/tally/internal/stripeapi/stripefake"
	"github.com/tallybilling/tally/pkg/client"
)

// A refunded automatic top-up turns automatic top-up off so that the same
// card is not charged again. A top-up started just before the refund and
// not charged yet (Stripe was down when the worker tried) must not be
// charged once Stripe answers again: it fails, naming why.
func TestAutoTopUpRefundStopsAnUnchargedTopUp(t *testing.T) {
	fake := stripefake.New(t)
	s := startServer(t, payEnv(t, fake.URL()))
	evs := &stripeEvents{fake: fake}
	gdb := openDB(t, s)
	saveCard(t, s, evs, "pend", topUpCard)
	grantOverHTTP(t, s.service(t), "pend", 1000, "grant-pend")
	putAutoTopUp(t, s, "pend", client.AutoTopUpSettings{Enabled: true, Threshold: 500, Item: "starter"})
	spend(t, s, "pend", 600, "pend-1")
	tops := autoTopUps(t, s, "pend")
	if len(tops) != 1 {
		t.Fatalf("%d top-ups after the first crossing, want 1", len(tops))
	}
	waitCharged(t, s, tops[0].Id)
	evs.deliverNew(t, s)
	first := waitPayment(t, s, tops[0].Id, client.PaymentStatusSucceeded)

	// Stripe is down: the next top-up stays pending, uncharged.
	fake.SetFault(func(r *http.Request) (int, string, bool) {
		if r.URL.Path == "/v1/payment_intents" {
			return http.StatusServiceUnavailable, `{"error":{"type":"api_error","message":"down"}}`, true
		}
		return 0, "", false
	})
	spend(t, s, "pend", 400+starterCredits-100, "pend-2")
	tops = autoTopUps(t, s, "pend")
	if len(tops) != 2 {
		t.Fatalf("%d top-ups after the second crossing, want 2", len(tops))
	}
	var second string
	for _, p := range tops {
		if p.Id != first.Id {
			second = p.Id
		}
	}

	// The first top-up is refunded; then Stripe answers again.
	ch := refundedCharge(first.Id, starterAmount, starterAmount)
	ch["payment_intent"] = *first.PaymentIntentId
	deliver(t, s, stripeEvent(newEventID(), "charge.refunded", ch))
	if got := getAutoTopUp(t, s, "pend"); got.Status != client.AutoTopUpStatusDisabled || got.DisabledReason == nil || !strings.Contains(*got.DisabledReason, "refunded") {
		t.Fatalf("settings %+v, want disabled by the refund", got)
	}
	fake.SetFault(nil)
	waitFor(t, "the uncharged top-up to settle", func() bool {
		return len(fake.Sandbox().Objects("payment_intent")) > 1 || getPayment(t, s, second).Status != client.PaymentStatusPending
	})
	time.Sleep(300 * time.Millisecond)
	if n := len(fake.Sandbox().Objects("payment_intent")); n != 1 {
		t.Fatalf("Stripe holds %d PaymentIntents: the card was charged again after its owner took the top-up back", n)
	}
	if p := getPayment(t, s, second); p.Status != client.PaymentStatusFailed {
		t.Fatalf("second top-up %s, want failed", p.Status)
	}
	if b := balanceOf(t, gdb, "pend"); b != 0 {
		t.Fatalf("balance %d, want 0", b)
	}
	assertInvariants(t, s)
}
