package main

import (
	"context"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/tallybilling/tally/pkg/client"
)

// The database goes away while a buyer pays on the sandbox's page (the
// page answers 500: the store refused the payment), then comes back;
// before anything else touches the sandbox an operator runs a sync with
// Stripe, which lists the events and retrieves
// the session over the sandbox's API. tally must not credit a payment the
// sandbox does not hold: the payment stays pending with no credits, and
// the buyer's next pay is credited once.
func TestSbrevARefusedPaymentIsNotCreditedBySync(t *testing.T) {
	t.Parallel()
	env := sandboxEnv(t)
	env["TALLY_STRIPE_SYNC_INTERVAL"] = "0"
	env["TALLY_PENDING_CHECK_AFTER"] = "0s"
	proxy := behindDBProxy(t, env)
	s := startServer(t, env)
	payID, page := sandboxCheckout(t, s, "sbrev-buyer", "starter")
	time.Sleep(500 * time.Millisecond) // the checkout's own deliveries (a customer's) go out

	// The database goes away for a moment: the pay's commit is refused, and
	// the page cannot read the store either.
	proxy.down()
	if st, loc, body := postForm(t, page+"/pay", url.Values{"card": {"4242424242424242"}}); st != http.StatusInternalServerError {
		t.Fatalf("pay while the database is away: %d to %q, want 500: %.300s", st, loc, body)
	}
	proxy.up()
	waitStatus(t, s.URL+"/readyz", http.StatusOK, patience)

	since := time.Now().Add(-time.Hour)
	r, err := s.admin(t).SyncStripeWithResponse(context.Background(), client.StripeSyncRequest{Since: &since})
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "sync", r.StatusCode(), r.Body, http.StatusOK)
	t.Logf("sync after the refused payment: %s", strings.TrimSpace(string(r.Body)))
	if p := getPayment(t, s, payID); p.Status != client.PaymentStatusPending {
		t.Fatalf("payment %s is %s after a sync, though the sandbox never stored its payment; transitions %+v", payID, p.Status, p.Transitions)
	}
	if b := balanceOverHTTP(t, s.service(t), "sbrev-buyer"); b.Balance != 0 {
		t.Fatalf("balance %d after a sync, though the sandbox never stored the payment", b.Balance)
	}

	if st, loc, body := postForm(t, page+"/pay", url.Values{"card": {"4242424242424242"}}); st != http.StatusSeeOther {
		t.Fatalf("pay once the store is back: %d to %q: %.300s", st, loc, body)
	}
	waitPayment(t, s, payID, client.PaymentStatusSucceeded)
	waitBalance(t, s, "sbrev-buyer", starterCredits)
	assertInvariants(t, s)
}
