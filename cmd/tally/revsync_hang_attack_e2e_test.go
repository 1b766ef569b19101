package main

import (
	"context"
	"net/http"
	"strings"
	"testing"

	"github.com/tallybilling/tally/internal/stripeapi/stripefake"
	"github.com/tallybilling/tally/pkg/client"
)

// TestRevSyncAnswersWhileStripeHangs: Stripe stops answering while an
// operator runs POST /v1/admin/stripe-sync. The listing's attempts (the
// Stripe client's timeout, retried) outlast the server's write timeout;
// the operator must still get an answer, a problem+json error saying the
// sync did not finish, not a connection closed with nothing, and a sync
// once Stripe answers again catches up as if nothing happened.
func TestRevSyncAnswersWhileStripeHangs(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	s := startServer(t, syncEnv(t, fake.URL()))
	pay := checkout(t, s, "hung", "starter", 1)
	paidAtStripe(t, fake, s, pay)

	release := fake.HangUntilReleased()
	r, err := s.admin(t).SyncStripeWithResponse(context.Background(), client.StripeSyncRequest{})
	release()
	if err != nil {
		t.Fatalf("the sync was never answered: %v\nserver logs:\n%s", err, grepLines(s.logs.String(), "stripe-sync"))
	}
	mustStatus(t, "sync while Stripe hangs", r.StatusCode(), r.Body, http.StatusServiceUnavailable)
	if ct := r.HTTPResponse.Header.Get("Content-Type"); !strings.HasPrefix(ct, "application/problem+json") {
		t.Fatalf("answered %s, want problem+json", ct)
	}

	res := stripeSync(t, s, nil)
	if res.PaymentsChanged != 1 {
		t.Fatalf("the sync after Stripe came back: %+v, want the paid payment changed", res)
	}
	if p := getPayment(t, s, pay); p.Status != client.PaymentStatusSucceeded {
		t.Fatalf("payment %s, want succeeded", p.Status)
	}
	assertInvariants(t, s)
}
