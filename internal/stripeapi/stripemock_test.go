package stripeapi_test

import (
	"context"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/tallybilling/tally/internal/stripeapi"
	"github.com/tallybilling/tally/internal/stripeapi/stripemock"
)

func TestMain(m *testing.M) { os.Exit(stripemock.Main(m)) }

// newMockClient is a real client against the shared stripe-mock.
func newMockClient(t *testing.T) stripeapi.Client {
	t.Helper()
	c, err := stripeapi.New(stripeapi.Config{SecretKey: "sk_test_123", APIURL: stripemock.Start(t)})
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	return c
}

func TestStripeMockCreateCustomer(t *testing.T) {
	t.Parallel()
	c := newMockClient(t)
	cus, err := c.CreateCustomer(context.Background(), stripeapi.CustomerInput{
		TallyCustomerID: "c-1", Email: "ada@example.com", Name: "Ada",
	})
	if err != nil {
		t.Fatalf("CreateCustomer: %v", err)
	}
	if !strings.HasPrefix(cus.ID, "cus_") {
		t.Fatalf("customer id = %q, want a cus_ id", cus.ID)
	}
}

func TestStripeMockCreateCheckoutSession(t *testing.T) {
	t.Parallel()
	c := newMockClient(t)
	expires := time.Now().Add(time.Hour).Truncate(time.Second)
	cases := map[string]stripeapi.CheckoutSessionInput{
		"payment": {
			PaymentID: "p-1", TallyCustomerID: "c-1", StripeCustomerID: "cus_123",
			Mode:       stripeapi.ModePayment,
			LineItem:   stripeapi.LineItem{Name: "100 credits", UnitAmount: 500, Currency: "usd", Quantity: 1},
			SuccessURL: "https://app.example.com/ok", CancelURL: "https://app.example.com/cancel",
			ExpiresAt: expires, InvoiceCreation: true, ClientReferenceID: "p-1",
			Metadata: map[string]string{"catalog_item": "pack_100"},
		},
		"subscription": {
			PaymentID: "p-2", TallyCustomerID: "c-1", StripeCustomerID: "cus_123",
			Mode:       stripeapi.ModeSubscription,
			LineItem:   stripeapi.LineItem{StripePrice: "price_123"},
			SuccessURL: "https://app.example.com/ok", CancelURL: "https://app.example.com/cancel",
			ExpiresAt: expires,
		},
	}
	for name, in := range cases {
		t.Run(name, func(t *testing.T) {
			s, err := c.CreateCheckoutSession(context.Background(), in)
			if err != nil {
				t.Fatalf("CreateCheckoutSession: %v", err)
			}
			if !strings.HasPrefix(s.ID, "cs_") {
				t.Errorf("session id = %q, want a cs_ id", s.ID)
			}
			if !strings.HasPrefix(s.URL, "https://") {
				t.Errorf("session url = %q, want an https URL", s.URL)
			}
			if s.ExpiresAt.IsZero() {
				t.Errorf("session expires_at is zero")
			}
		})
	}
}

// stripe-mock's fixture of a retrieved session decodes into what the
// confirmation reads (stripe-mock is stateless: its PaymentIntent is the
// fixture's, not one of ours).
func TestStripeMockGetCheckoutSession(t *testing.T) {
	t.Parallel()
	c := newMockClient(t)
	s, err := c.GetCheckoutSession(context.Background(), "cs_test_123")
	if err != nil {
		t.Fatalf("GetCheckoutSession: %v", err)
	}
	if !strings.HasPrefix(s.ID, "cs_") || s.Mode == "" || s.Status == "" || !strings.HasPrefix(s.PaymentIntentID, "pi_") {
		t.Fatalf("session = %+v", s)
	}
}

func TestStripeMockMeterEventsAndSummaries(t *testing.T) {
	t.Parallel()
	c := newMockClient(t)
	ctx := context.Background()
	err := c.CreateMeterEvent(ctx, stripeapi.MeterEvent{
		EventName: "api_calls", StripeCustomerID: "cus_123", Identifier: "u-1", Value: 3,
		Timestamp: time.Now().Add(-time.Minute),
	})
	if err != nil {
		t.Fatalf("CreateMeterEvent: %v", err)
	}
	end := time.Now().Truncate(time.Minute)
	sums, err := c.MeterEventSummaries(ctx, stripeapi.SummaryInput{
		MeterID: "mtr_123", StripeCustomerID: "cus_123", Start: end.Add(-time.Hour), End: end,
	})
	if err != nil {
		t.Fatalf("MeterEventSummaries: %v", err)
	}
	if len(sums) == 0 {
		t.Fatalf("no summaries returned")
	}
}

// The invoice, customer-update and event-listing calls are requests
// stripe-mock's OpenAPI validation accepts: every parameter tally sends
// exists, with the right type.
func TestStripeMockInvoicesAndEvents(t *testing.T) {
	t.Parallel()
	c := newMockClient(t)
	ctx := context.Background()
	cus, err := c.CreateCustomer(ctx, stripeapi.CustomerInput{TallyCustomerID: "c-inv", Email: "ap@acme.example", Name: "Acme",
		Address: &stripeapi.Address{Line1: "1 Main St", City: "Berlin", PostalCode: "10115", Country: "DE"},
		TaxID:   &stripeapi.TaxID{Type: "eu_vat", Value: "DE123456789"}})
	if err != nil {
		t.Fatalf("CreateCustomer with billing details: %v", err)
	}
	if err := c.UpdateCustomer(ctx, cus.ID, stripeapi.CustomerInput{TallyCustomerID: "c-inv", Email: "billing@acme.example",
		Address: &stripeapi.Address{Line1: "2 Main St", Country: "DE"}}); err != nil {
		t.Fatalf("UpdateCustomer: %v", err)
	}
	inv, err := c.CreateInvoice(ctx, stripeapi.InvoiceInput{PaymentID: "pay-inv-1", TallyCustomerID: "c-inv", StripeCustomerID: cus.ID,
		Description: "10 × Pro pack", Amount: 50000, Currency: "usd", DaysUntilDue: 30, Memo: "Q3 credits", PurchaseOrder: "PO-1"})
	if err != nil {
		t.Fatalf("CreateInvoice: %v", err)
	}
	if !strings.HasPrefix(inv.ID, "in_") {
		t.Fatalf("invoice id %q", inv.ID)
	}
	if _, err := c.FinalizeAndSendInvoice(ctx, "pay-inv-1", inv.ID); err != nil {
		t.Fatalf("FinalizeAndSendInvoice: %v", err)
	}
	if got, err := c.GetInvoice(ctx, inv.ID); err != nil || got.ID == "" {
		t.Fatalf("GetInvoice: %+v, %v", got, err)
	}
	evs, _, err := c.ListEvents(ctx, time.Now().Add(-time.Hour), []string{"invoice.paid", "payment_intent.succeeded"})
	if err != nil {
		t.Fatalf("ListEvents: %v", err)
	}
	for _, ev := range evs {
		if ev.ID == "" || len(ev.Payload) == 0 {
			t.Fatalf("listed event %+v", ev)
		}
	}
	if _, _, err := c.ListEvents(ctx, time.Now(), make([]string, 21)); err == nil {
		t.Fatal("21 types were listed; Stripe allows 20")
	}
}

// InvoicesPaidBy speaks the Invoice Payments API as Stripe's OpenAPI
// description (stripe-mock) has it: the list filtered by the PaymentIntent.
func TestStripeMockInvoicesPaidBy(t *testing.T) {
	t.Parallel()
	c := newMockClient(t)
	got, err := c.InvoicesPaidBy(context.Background(), "pi_123")
	if err != nil {
		t.Fatalf("InvoicesPaidBy: %v", err)
	}
	if len(got) == 0 || got[0].Invoice == "" || got[0].ID == "" {
		t.Fatalf("InvoicesPaidBy = %+v, want stripe-mock's invoice payment with its invoice", got)
	}
	if _, err := c.InvoicesPaidBy(context.Background(), " "); err == nil {
		t.Fatal("InvoicesPaidBy without an id: no error")
	}
}
