package payments_test

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
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

// What Stripe answers about an invoice's PaymentIntent decides whose its
// refund is, and some answers prove nothing: a PaymentIntent shown paying
// invoices of two payments of ours, or of the other mode than our key, is
// refused (an operator looks); an invoice payment Stripe shows canceled
// names no payment (not ours). Nothing is linked or taken back.
func TestInvoicePaymentIntentAnswersThatProveNothing(t *testing.T) {
	t.Parallel()
	gdb := dbtest.New(t)
	fake, stripe := fakeClient(t)
	svc := newService(t, gdb, stripe, "payment_intent")
	ctx := context.Background()
	email := "ap@corp.example"
	if _, _, err := customers.New(customers.Options{DB: gdb}).Upsert(ctx, customers.UpsertInput{ID: "corp", Email: &email}); err != nil {
		t.Fatal(err)
	}
	var invoices []string
	for range 2 {
		res, _, err := svc.CreateInvoicePayment(ctx, payments.InvoicePaymentInput{CustomerID: "corp", Item: "starter"}, db.IdempotencyKey{})
		if err != nil {
			t.Fatal(err)
		}
		invoices = append(invoices, res.Invoice.ID)
	}
	var mu sync.Mutex
	livemode, answer := false, ""
	fake.SetFault(func(r *http.Request) (int, string, bool) {
		mu.Lock()
		defer mu.Unlock()
		switch {
		case r.Method == http.MethodGet && strings.HasPrefix(r.URL.Path, "/v1/payment_intents/"):
			return http.StatusOK, fmt.Sprintf(`{"id":"pi_inv","object":"payment_intent","status":"succeeded","amount":1000,"amount_received":1000,"currency":"usd","livemode":%t,"metadata":{}}`, livemode), true
		case r.Method == http.MethodGet && r.URL.Path == "/v1/invoice_payments":
			return http.StatusOK, `{"object":"list","url":"/v1/invoice_payments","has_more":false,"data":[` + answer + `]}`, true
		}
		return 0, "", false
	})
	paid := func(invoice, status string) string {
		return fmt.Sprintf(`{"id":"inpay_%s","object":"invoice_payment","invoice":%q,"amount_paid":1000,"currency":"usd","livemode":%t,"is_default":true,"payment":{"type":"payment_intent","payment_intent":"pi_inv"},"status":%q}`,
			invoice, invoice, livemode, status)
	}
	refund := func(n int) error {
		return svc.ChargeRefunded(ctx, payments.EventRef{ID: fmt.Sprintf("evt_r%d", n), Type: "charge.refunded"},
			payments.Charge{ID: "ch_inv", PaymentIntent: "pi_inv", Amount: 1000, AmountRefunded: 1000, Currency: "usd", Livemode: livemode})
	}
	mu.Lock()
	answer = paid(invoices[0], "paid") + "," + paid(invoices[1], "paid")
	mu.Unlock()
	if err := refund(1); !payments.IsRejection(err) {
		t.Fatalf("a PaymentIntent paying invoices of two payments: %v, want a rejection", err)
	}
	mu.Lock()
	answer = paid(invoices[0], "canceled")
	mu.Unlock()
	if err := refund(2); !errors.Is(err, payments.ErrNotOurs) {
		t.Fatalf("a canceled invoice payment: %v, want not ours", err)
	}
	mu.Lock()
	livemode = true
	answer = paid(invoices[0], "paid")
	mu.Unlock()
	if err := refund(3); !payments.IsRejection(err) {
		t.Fatalf("a live PaymentIntent under a test key: %v, want a rejection", err)
	}
	if n := count(t, gdb, `SELECT count(*) FROM payments WHERE payment_intent_id IS NOT NULL`); n != 0 {
		t.Fatalf("%d payments linked to a PaymentIntent", n)
	}
}
