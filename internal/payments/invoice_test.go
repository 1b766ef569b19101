package payments_test

import (
	"context"
	"fmt"
	"sync"
	"testing"

	"github.com/tallybilling/tally/internal/customers"
	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/db/dbtest"
	"github.com/tallybilling/tally/internal/payments"
	"github.com/tallybilling/tally/internal/stripeapi"
)

// One paid invoice confirmed from 40 goroutines at once, half of them as
// invoice.paid events (under distinct event ids), half as syncs looking
// the payment up at Stripe: one grant, one confirmation, one
// payment.succeeded, and the payment confirmed by whichever came first.
func TestInvoiceGuardUnderConcurrency(t *testing.T) {
	t.Parallel()
	gdb := dbtest.New(t)
	fake, stripe := fakeClient(t)
	svc := newService(t, gdb, stripe, "payment_intent")
	ctx := context.Background()
	email := "ap@corp.example"
	if _, _, err := customers.New(customers.Options{DB: gdb}).Upsert(ctx, customers.UpsertInput{ID: "corp", Email: &email}); err != nil {
		t.Fatal(err)
	}
	res, _, err := svc.CreateInvoicePayment(ctx, payments.InvoicePaymentInput{CustomerID: "corp", Item: "starter", Quantity: 3}, db.IdempotencyKey{})
	if err != nil {
		t.Fatalf("CreateInvoicePayment: %v", err)
	}
	if _, err := fake.Sandbox().InvoiceAction(ctx, res.Invoice.ID, "pay"); err != nil {
		t.Fatal(err)
	}
	got, err := stripe.GetInvoice(ctx, res.Invoice.ID)
	if err != nil {
		t.Fatal(err)
	}
	inv := payments.StripeInvoice{ID: got.ID, Status: got.Status, Number: got.Number, Customer: got.Customer, Currency: got.Currency,
		AmountDue: got.AmountDue, AmountPaid: got.AmountPaid, Livemode: got.Livemode, Metadata: got.Metadata}
	if inv.Metadata[stripeapi.MetadataPaymentID] != res.PaymentID || inv.AmountPaid != 3000 {
		t.Fatalf("the invoice at Stripe: %+v", inv)
	}

	var wg sync.WaitGroup
	errs := make(chan error, 40)
	for i := range 40 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if i%2 == 0 {
				errs <- svc.InvoiceChanged(ctx, payments.EventRef{ID: fmt.Sprintf("evt_inv_%d", i), Type: "invoice.paid"}, inv)
				return
			}
			_, err := svc.SyncPayment(ctx, res.PaymentID)
			errs <- err
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Errorf("a concurrent confirmation: %v", err)
		}
	}
	if n := count(t, gdb, `SELECT count(*) FROM credit_grants WHERE payment_id = ?`, res.PaymentID); n != 1 {
		t.Fatalf("%d grants", n)
	}
	if n := count(t, gdb, `SELECT count(*) FROM payment_confirmations WHERE payment_id = ? AND invoice_id = ?`, res.PaymentID, res.Invoice.ID); n != 1 {
		t.Fatalf("%d confirmations by the invoice", n)
	}
	if n := count(t, gdb, `SELECT count(*) FROM events WHERE type = 'payment.succeeded'`); n != 1 {
		t.Fatalf("%d payment.succeeded", n)
	}
	p, err := svc.Get(ctx, res.PaymentID)
	if err != nil {
		t.Fatal(err)
	}
	if p.Status != payments.Succeeded || (p.ConfirmedBy != payments.ByInvoice && p.ConfirmedBy != payments.BySync) || p.Method != payments.MethodInvoice {
		t.Fatalf("payment %+v", p)
	}
	verifyClean(t, gdb)
}

// A PaymentIntent whose metadata names a pay-by-invoice payment cannot
// confirm it: only its invoice can.
func TestInvoicePaymentRefusesAPaymentIntent(t *testing.T) {
	t.Parallel()
	gdb := dbtest.New(t)
	_, stripe := fakeClient(t)
	svc := newService(t, gdb, stripe, "payment_intent")
	ctx := context.Background()
	email := "ap@corp.example"
	if _, _, err := customers.New(customers.Options{DB: gdb}).Upsert(ctx, customers.UpsertInput{ID: "corp", Email: &email}); err != nil {
		t.Fatal(err)
	}
	res, _, err := svc.CreateInvoicePayment(ctx, payments.InvoicePaymentInput{CustomerID: "corp", Item: "starter"}, db.IdempotencyKey{})
	if err != nil {
		t.Fatal(err)
	}
	err = svc.PaymentIntentSucceeded(ctx, payments.EventRef{ID: "evt_pi", Type: "payment_intent.succeeded"}, payments.PaymentIntent{
		ID: "pi_x", AmountReceived: 1000, Currency: "usd", Status: "succeeded",
		Metadata: map[string]string{stripeapi.MetadataPaymentID: res.PaymentID, stripeapi.MetadataCustomerID: "corp"}})
	if !payments.IsRejection(err) {
		t.Fatalf("a PaymentIntent confirming an invoice payment: %v, want a rejection", err)
	}
	if n := count(t, gdb, `SELECT count(*) FROM credit_grants`); n != 0 {
		t.Fatalf("%d grants", n)
	}
}
