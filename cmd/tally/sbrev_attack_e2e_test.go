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

// The database goes away while the operator refunds part of a paid
// payment on the sandbox's dashboard (the action answers 500: the store
// refused the refund), then comes back; a sync with Stripe follows before
// anything else touches the sandbox. The customer keeps every credit: the
// sandbox holds no refund, so tally must take nothing back. Refunded again
// once the database is back, the credits are taken back once.
func TestSbrevARefusedRefundTakesNoCreditsBack(t *testing.T) {
	t.Parallel()
	env := sandboxEnv(t)
	env["TALLY_STRIPE_SYNC_INTERVAL"] = "0"
	proxy := behindDBProxy(t, env)
	s := startServer(t, env)
	payID, page := sandboxCheckout(t, s, "sbrev-refunded", "starter")
	if st, loc, body := postForm(t, page+"/pay", url.Values{"card": {"4242424242424242"}}); st != http.StatusSeeOther {
		t.Fatalf("pay: %d to %q: %.300s", st, loc, body)
	}
	pi := *waitPayment(t, s, payID, client.PaymentStatusSucceeded).PaymentIntentId
	waitBalance(t, s, "sbrev-refunded", starterCredits)
	time.Sleep(500 * time.Millisecond) // the payment's last deliveries go out

	proxy.down()
	if st, _, body := postForm(t, s.URL+"/sandbox/payments/"+pi+"/refund", url.Values{"amount": {"100"}}); st != http.StatusInternalServerError {
		t.Fatalf("refund while the database is away: %d, want 500: %.300s", st, body)
	}
	proxy.up()
	waitStatus(t, s.URL+"/readyz", http.StatusOK, patience)
	since := time.Now().Add(-time.Hour)
	r, err := s.admin(t).SyncStripeWithResponse(context.Background(), client.StripeSyncRequest{Since: &since})
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "sync", r.StatusCode(), r.Body, http.StatusOK)
	t.Logf("sync after the refused refund: %s", strings.TrimSpace(string(r.Body)))
	if b := balanceOverHTTP(t, s.service(t), "sbrev-refunded"); b.Balance != starterCredits {
		t.Fatalf("balance %d after a refund the sandbox refused, want %d: credits taken back for nothing", b.Balance, starterCredits)
	}
	if p := getPayment(t, s, payID); p.AmountRefunded != 0 {
		t.Fatalf("payment %s shows %d refunded after a refund the sandbox refused", payID, p.AmountRefunded)
	}

	if st, _, body := postForm(t, s.URL+"/sandbox/payments/"+pi+"/refund", url.Values{"amount": {"100"}}); st != http.StatusSeeOther {
		t.Fatalf("refund once the database is back: %d: %.300s", st, body)
	}
	waitBalance(t, s, "sbrev-refunded", starterCredits-starterCredits/10)
	assertInvariants(t, s)
}
