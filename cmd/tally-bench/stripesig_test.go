package main

import (
	"encoding/json"
	"regexp"
	"testing"
	"time"

	"github.com/stripe/stripe-go/v82/webhook"

	"github.com/tallybilling/tally/internal/sandbox"
	"github.com/tallybilling/tally/internal/stripeapi"
)

func TestStripeSignatureHasStripesFormat(t *testing.T) {
	t.Parallel()
	sig := sandbox.Sign([]byte(`{"id":"evt_1"}`), "whsec_test", time.Unix(1700000000, 0))
	if !regexp.MustCompile(`^t=1700000000,v1=[0-9a-f]{64}$`).MatchString(sig) {
		t.Fatalf("signature %q, want t=<unix>,v1=<64 hex>", sig)
	}
}

// The server verifies with stripe-go; so does this test, and an event the
// tool builds must parse as a Stripe event of this stripe-go's API version.
func TestSignedEventIsAcceptedByStripeGo(t *testing.T) {
	t.Parallel()
	const secret = "whsec_bench"
	now := time.Now()
	payload, err := json.Marshal(stripeEvent("evt_bench_run_3_7", "payment_intent.succeeded", "bench-run-1", now))
	if err != nil {
		t.Fatal(err)
	}
	sig := sandbox.Sign(payload, secret, now)

	if err := webhook.ValidatePayload(payload, sig, secret); err != nil {
		t.Fatalf("stripe-go refuses the signature: %v", err)
	}
	if err := webhook.ValidatePayload(payload, sig, "whsec_other"); err == nil {
		t.Fatal("stripe-go accepted the signature under another secret")
	}
	evt, err := webhook.ConstructEvent(payload, sig, secret)
	if err != nil {
		t.Fatalf("stripe-go cannot construct the event (API version %s?): %v", stripeEventVersion(payload), err)
	}
	if evt.ID != "evt_bench_run_3_7" || evt.Type != "payment_intent.succeeded" || evt.Livemode {
		t.Errorf("event id %q type %q livemode %v", evt.ID, evt.Type, evt.Livemode)
	}
	var pi struct {
		ID       string            `json:"id"`
		Metadata map[string]string `json:"metadata"`
	}
	if err := json.Unmarshal(evt.Data.Raw, &pi); err != nil {
		t.Fatal(err)
	}
	if pi.ID != "pi_bench_run_3_7" || pi.Metadata[stripeapi.MetadataPaymentID] != "pay_bench_run_3_7" || pi.Metadata[stripeapi.MetadataCustomerID] != "bench-run-1" {
		t.Errorf("payment intent %+v: want ids derived from the event id and the customer in metadata", pi)
	}

}

func stripeEventVersion(payload []byte) string {
	var v struct {
		APIVersion string `json:"api_version"`
	}
	_ = json.Unmarshal(payload, &v)
	return v.APIVersion
}
