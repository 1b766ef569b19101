package main

import (
	"fmt"
	"net/http"
	"testing"
	"time"

	"github.com/tallybilling/tally/internal/stripeapi/stripefake"
)

// TestWebhookReplayBehindAFreshTimestamp: an attacker who captured a signed
// delivery (here an hour old, well past the 300 s tolerance) puts a fresh
// t= in front of its Stripe-Signature header. The HMAC covers only the old
// timestamp, so the delivery is refused and nothing is stored or credited.
func TestWebhookReplayBehindAFreshTimestamp(t *testing.T) {
	fake := stripefake.New(t)
	s := startServer(t, payEnv(t, fake.URL()))
	gdb := openDB(t, s)

	pay := checkout(t, s, "replay-1", "starter", 1)
	body := stripeEvent(newEventID(), "payment_intent.succeeded", paymentIntent(pay, "replay-1", "succeeded", starterAmount, starterAmount, "usd"))
	captured := sign(body, testWebhookSecret, time.Now().Add(-time.Hour))

	for _, header := range []string{
		fmt.Sprintf("t=%d,%s", time.Now().Unix(), captured),
		fmt.Sprintf("%s,t=%d", captured, time.Now().Unix()),
		captured,
	} {
		status, out := postWebhook(t, s, body, header)
		mustStatus(t, "replayed delivery "+header, status, out, http.StatusBadRequest)
	}
	if n := countRows(t, gdb, `SELECT count(*) FROM stripe_events`); n != 0 {
		t.Fatalf("a replayed delivery stored %d events", n)
	}
	if got := balanceOf(t, gdb, "replay-1"); got != 0 {
		t.Fatalf("a replayed delivery credited %d", got)
	}
	if p := getPayment(t, s, pay); p.Status != "pending" {
		t.Fatalf("a replayed delivery moved the payment to %s", p.Status)
	}
}
