package stripeapi_test

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
	"time"

	"github.com/stripe/stripe-go/v82"
	"github.com/stripe/stripe-go/v82/webhook"

	"github.com/tallybilling/tally/internal/sandbox"
	"github.com/tallybilling/tally/internal/stripeapi"
)

// The sandbox is tested here against stripe-go itself, which no other
// package may import: its webhooks must verify with stripe-go's webhook
// package (API version included) and decode into stripe-go's types, and
// tally's client must work against its API as against Stripe.

func TestSandboxSpeaksStripesAPIVersion(t *testing.T) {
	t.Parallel()
	if sandbox.APIVersion != stripe.APIVersion {
		t.Fatalf("the sandbox writes API version %q, stripe-go pins %q", sandbox.APIVersion, stripe.APIVersion)
	}
}

func TestSandboxWebhooksVerifyAndDecodeWithStripeGo(t *testing.T) {
	t.Parallel()
	const secret = "whsec_stripe_go_check"
	var (
		mu     sync.Mutex
		events []stripe.Event
		errs   []string
	)
	hook := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		sig := r.Header.Get("Stripe-Signature")
		ev, err := webhook.ConstructEvent(body, sig, secret)
		mu.Lock()
		defer mu.Unlock()
		if err != nil {
			errs = append(errs, err.Error())
			w.WriteHeader(http.StatusBadRequest)
			return
		}
		if err := stripeapi.VerifyWebhook(body, sig, []string{secret}, stripeapi.WebhookTolerance, time.Now()); err != nil {
			errs = append(errs, "tally's verifier: "+err.Error())
		}
		events = append(events, ev)
	}))
	defer hook.Close()

	acct, err := sandbox.New(context.Background(), sandbox.Options{SecretKey: "sk_test_go", PublicURL: "http://sandbox.test",
		Webhook: &sandbox.Endpoint{URL: hook.URL, Secret: secret}})
	if err != nil {
		t.Fatal(err)
	}
	api := httptest.NewServer(sandbox.NewAPI(acct))
	defer api.Close()
	c, err := stripeapi.New(stripeapi.Config{SecretKey: "sk_test_go", APIURL: api.URL, Timeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	cus, err := c.CreateCustomer(ctx, stripeapi.CustomerInput{TallyCustomerID: "ada", Email: "ada@example.com"})
	if err != nil {
		t.Fatal(err)
	}
	cs, err := c.CreateCheckoutSession(ctx, stripeapi.CheckoutSessionInput{
		PaymentID: "pay_1", TallyCustomerID: "ada", StripeCustomerID: cus.ID, Mode: stripeapi.ModePayment,
		LineItem:   stripeapi.LineItem{Name: "Starter", UnitAmount: 1000, Currency: "usd", Quantity: 2},
		SuccessURL: "http://app.test/ok", CancelURL: "http://app.test/no", InvoiceCreation: true,
	})
	if err != nil {
		t.Fatal(err)
	}
	if cs.URL != "http://sandbox.test/sandbox/checkout/"+cs.ID || cs.AmountTotal != 2000 || cs.Status != "open" {
		t.Fatalf("created session %+v", cs)
	}
	if _, err := acct.Pay(ctx, cs.ID, "4000000000000002", ""); err != nil {
		t.Fatal(err)
	}
	if _, err := acct.Pay(ctx, cs.ID, "4242424242424242", "ada@example.com"); err != nil {
		t.Fatal(err)
	}
	got, err := c.GetCheckoutSession(ctx, cs.ID)
	if err != nil {
		t.Fatal(err)
	}
	if got.Status != "complete" || got.PaymentStatus != "paid" || got.PaymentIntentID == "" || got.AmountTotal != 2000 ||
		got.Metadata["tally_payment_id"] != "pay_1" || got.Livemode {
		t.Fatalf("retrieved session %+v", got)
	}
	if _, err := acct.Refund(ctx, got.PaymentIntentID, 500, ""); err != nil {
		t.Fatal(err)
	}
	if _, err := acct.OpenDispute(ctx, got.PaymentIntentID, ""); err != nil {
		t.Fatal(err)
	}
	if _, err := acct.CloseDispute(ctx, got.PaymentIntentID, true); err != nil {
		t.Fatal(err)
	}
	acct.DeliverDue(ctx)

	mu.Lock()
	defer mu.Unlock()
	if len(errs) > 0 {
		t.Fatalf("deliveries refused: %v", errs)
	}
	if len(events) < 15 {
		t.Fatalf("%d events verified, want every one of the flow", len(events))
	}
	for _, ev := range events {
		var obj any
		switch ev.Data.Object["object"] {
		case "payment_intent":
			obj = &stripe.PaymentIntent{}
		case "charge":
			obj = &stripe.Charge{}
		case "checkout.session":
			obj = &stripe.CheckoutSession{}
		case "refund":
			obj = &stripe.Refund{}
		case "dispute":
			obj = &stripe.Dispute{}
		case "invoice":
			obj = &stripe.Invoice{}
		case "customer":
			obj = &stripe.Customer{}
		default:
			t.Fatalf("%s carries a %v", ev.Type, ev.Data.Object["object"])
		}
		if err := json.Unmarshal(ev.Data.Raw, obj); err != nil {
			t.Fatalf("%s: data.object does not decode into stripe-go's type: %v", ev.Type, err)
		}
		if ev.APIVersion != stripe.APIVersion || ev.Livemode || ev.Created == 0 {
			t.Fatalf("%s: envelope %+v", ev.Type, ev)
		}
		switch o := obj.(type) {
		case *stripe.PaymentIntent:
			if o.Metadata["tally_payment_id"] != "pay_1" || o.Amount != 2000 || o.Currency != "usd" {
				t.Fatalf("%s: %+v", ev.Type, o)
			}
		case *stripe.Charge:
			if o.PaymentIntent == nil || o.PaymentIntent.ID != got.PaymentIntentID {
				t.Fatalf("%s: charge of PaymentIntent %v", ev.Type, o.PaymentIntent)
			}
		case *stripe.Dispute:
			if o.Charge == nil || o.PaymentIntent == nil || o.PaymentIntent.ID != got.PaymentIntentID || o.Amount != 1500 {
				t.Fatalf("%s: %+v", ev.Type, o)
			}
		}
	}
}

func TestSandboxMeterSummariesAreWhatWasSent(t *testing.T) {
	t.Parallel()
	acct, err := sandbox.New(context.Background(), sandbox.Options{Meters: map[string]string{"mtr_1": "api_calls"}})
	if err != nil {
		t.Fatal(err)
	}
	api := httptest.NewServer(sandbox.NewAPI(acct))
	defer api.Close()
	c, err := stripeapi.New(stripeapi.Config{SecretKey: "sk_test_go", APIURL: api.URL, Timeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	start := time.Now().Add(-time.Hour).Truncate(time.Minute)
	for i, v := range []int64{3, 4} {
		if err := c.CreateMeterEvent(ctx, stripeapi.MeterEvent{EventName: "api_calls", StripeCustomerID: "cus_a", Identifier: "v1-" + string(rune('a'+i)), Value: v, Timestamp: start.Add(time.Minute)}); err != nil {
			t.Fatal(err)
		}
	}
	if err := c.CreateMeterEvent(ctx, stripeapi.MeterEvent{EventName: "api_calls", StripeCustomerID: "cus_a", Identifier: "v1-a", Value: 3}); !stripeapi.IsDuplicate(err) {
		t.Fatalf("a repeated identifier: %v, want a duplicate", err)
	}
	session, err := c.OpenMeterEventSession(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.SendMeterEventStream(ctx, session, []stripeapi.MeterEvent{
		{EventName: "api_calls", StripeCustomerID: "cus_a", Identifier: "v2-a", Value: 10, Timestamp: start.Add(2 * time.Minute)},
		{EventName: "api_calls", StripeCustomerID: "cus_a", Identifier: "v2-a", Value: 10, Timestamp: start.Add(2 * time.Minute)}, // dropped, as at Stripe
		{EventName: "api_calls", StripeCustomerID: "cus_b", Identifier: "v2-b", Value: 100, Timestamp: start.Add(2 * time.Minute)},
	}); err != nil {
		t.Fatal(err)
	}
	sums, err := c.MeterEventSummaries(ctx, stripeapi.SummaryInput{MeterID: "mtr_1", StripeCustomerID: "cus_a", Start: start, End: start.Add(time.Hour)})
	if err != nil {
		t.Fatal(err)
	}
	if len(sums) != 1 || sums[0].AggregatedValue != 17 {
		t.Fatalf("summaries %+v, want one of 17 (3 + 4 + 10, the duplicate dropped)", sums)
	}
}
