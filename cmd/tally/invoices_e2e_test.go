package main

import (
	"context"
	"fmt"
	"maps"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/stripeapi"
	"github.com/tallybilling/tally/internal/stripeapi/stripefake"
	"github.com/tallybilling/tally/pkg/client"
)

// The pro pack of deploy/catalog.example.yaml: $50.00 for 6000 credits.
const (
	proAmount  = 5000
	proCredits = 6000
)

// setBilling gives customer billing details with an email to send invoices to.
func setBilling(t testing.TB, s *server, customer string) client.Customer {
	t.Helper()
	email, name, country := "ap@"+customer+".example", "Acme "+customer, "DE"
	line1 := "1 Hauptstraße"
	r, err := s.service(t).UpsertCustomerWithResponse(context.Background(), customer, client.CustomerUpsert{
		Billing: &client.BillingDetails{Email: &email, Name: &name, Address: &struct {
			City       *string `json:"city,omitempty"`
			Country    *string `json:"country,omitempty"`
			Line1      *string `json:"line1,omitempty"`
			Line2      *string `json:"line2,omitempty"`
			PostalCode *string `json:"postal_code,omitempty"`
			State      *string `json:"state,omitempty"`
		}{Country: &country, Line1: &line1}},
	})
	if err != nil {
		t.Fatal(err)
	}
	if r.StatusCode() != http.StatusCreated && r.StatusCode() != http.StatusOK {
		mustStatus(t, "set billing", r.StatusCode(), r.Body, http.StatusOK)
	}
	if r.JSON200 != nil {
		return *r.JSON200
	}
	return *r.JSON201
}

// payByInvoice asks for an invoice of quantity × item for customer.
func payByInvoice(t testing.TB, s *server, customer, item string, quantity int64, key, po string) *client.CreateInvoicePaymentResponse {
	t.Helper()
	body := client.InvoicePaymentCreate{Item: item, Quantity: &quantity}
	if po != "" {
		body.PurchaseOrder = &po
	}
	r, err := s.service(t).CreateInvoicePaymentWithResponse(context.Background(), customer, &client.CreateInvoicePaymentParams{IdempotencyKey: key}, body)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// invoiceAt is the invoice as Stripe (the fake) shows it now.
func invoiceAt(t testing.TB, fake *stripefake.Fake, id string) map[string]any {
	t.Helper()
	obj := fake.Sandbox().Object(id)
	if obj == nil {
		t.Fatalf("Stripe has no invoice %s", id)
	}
	return obj
}

// invoiceActionAt moves the invoice at Stripe (pay, void, mark_uncollectible)
// and returns it as Stripe then shows it; the fake records the event
// without delivering it.
func invoiceActionAt(t testing.TB, fake *stripefake.Fake, id, action string) map[string]any {
	t.Helper()
	obj, err := fake.Sandbox().InvoiceAction(context.Background(), id, action)
	if err != nil {
		t.Fatalf("%s invoice %s: %v", action, id, err)
	}
	return obj
}

// withFields is a copy of obj with fields replaced.
func withFields(obj map[string]any, fields map[string]any) map[string]any {
	out := maps.Clone(obj)
	maps.Copy(out, fields)
	return out
}

// A company pays its invoice: invoice.paid arrives before
// invoice.finalized, is delivered twice and replayed under other event ids
// concurrently to two instances; the payment is credited once, shows its
// invoice as paid with its number and links, and `tally verify` is clean.
// The API answer of a repeated request is the first one.
func TestPayByInvoiceCreditsOnceOnInvoicePaid(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	env := payEnv(t, fake.URL())
	a := startServer(t, env)
	envB := maps.Clone(env)
	b := startServer(t, envB)
	gdb := openDB(t, a)

	setBilling(t, a, "acme")
	r := payByInvoice(t, a, "acme", "pro", 2, "inv-acme-1", "PO-4711")
	mustStatus(t, "invoice payment", r.StatusCode(), r.Body, http.StatusCreated)
	got := r.JSON201
	if got.Status != client.PaymentStatusPending || got.Amount != 2*proAmount || got.Credits != 2*proCredits || got.Currency != "usd" {
		t.Fatalf("invoice payment answer %+v", got)
	}
	if got.Invoice.Number == nil || got.Invoice.HostedInvoiceUrl == nil || deref(got.Invoice.Status) != "open" {
		t.Fatalf("invoice %+v, want an open, numbered invoice with a hosted page", got.Invoice)
	}
	again := payByInvoice(t, a, "acme", "pro", 2, "inv-acme-1", "PO-4711")
	mustStatus(t, "the same request again", again.StatusCode(), again.Body, http.StatusCreated)
	if again.JSON201.PaymentId != got.PaymentId || again.HTTPResponse.Header.Get("Idempotent-Replayed") != "true" {
		t.Fatalf("a repeat made payment %s (replayed %q), want the first, %s", again.JSON201.PaymentId, again.HTTPResponse.Header.Get("Idempotent-Replayed"), got.PaymentId)
	}

	// What Stripe was asked: send_invoice, our ids in the metadata, the PO
	// as a custom field, one line for the pack, finalized and sent.
	inv := invoiceAt(t, fake, got.Invoice.Id)
	meta, _ := inv["metadata"].(map[string]any)
	if inv["collection_method"] != "send_invoice" || meta[stripeapi.MetadataPaymentID] != got.PaymentId || meta[stripeapi.MetadataCustomerID] != "acme" {
		t.Fatalf("invoice at Stripe: %v", inv)
	}
	if fields := fmt.Sprint(inv["custom_fields"]); !strings.Contains(fields, "PO-4711") {
		t.Fatalf("custom fields %s, want the purchase order", fields)
	}
	if fmt.Sprint(inv["amount_due"]) != fmt.Sprint(2*proAmount) {
		t.Fatalf("amount due %v", inv["amount_due"])
	}
	finalized := inv
	paid := invoiceActionAt(t, fake, got.Invoice.Id, "pay")

	paidEvent := newEventID()
	body := stripeEvent(paidEvent, "invoice.paid", paid)
	deliver(t, a, body)
	deliver(t, b, body) // Stripe redelivers
	var wg sync.WaitGroup
	for i := range 10 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			// The same invoice.paid under other ids (an operator's replay, a
			// listing): the guard, keyed by the invoice, holds.
			target := a
			if i%2 == 1 {
				target = b
			}
			deliver(t, target, stripeEvent(newEventID(), "invoice.paid", paid))
		}()
	}
	wg.Wait()
	deliver(t, b, stripeEvent(newEventID(), "invoice.finalized", finalized)) // late

	if status, lastErr := eventStatus(t, gdb, paidEvent); status != "processed" {
		t.Fatalf("invoice.paid: %s (%s)", status, lastErr)
	}
	if bal := balanceOf(t, gdb, "acme"); bal != 2*proCredits {
		t.Fatalf("balance %d, want %d", bal, 2*proCredits)
	}
	p := getPayment(t, a, got.PaymentId)
	if p.Status != client.PaymentStatusSucceeded || p.Method != client.PaymentMethodInvoice || p.ConfirmedBy == nil || *p.ConfirmedBy != client.PaymentConfirmedByInvoice {
		t.Fatalf("payment %+v", p)
	}
	if p.Invoice == nil || deref(p.Invoice.Status) != "paid" || p.Invoice.Number == nil || p.Invoice.InvoicePdf == nil && p.Invoice.HostedInvoiceUrl == nil {
		t.Fatalf("payment's invoice %+v, want paid with its number (the late finalized must not undo it)", p.Invoice)
	}
	if deref(p.PurchaseOrder) != "PO-4711" || p.PaymentIntentId != nil {
		t.Fatalf("purchase order %q, PaymentIntent %v", deref(p.PurchaseOrder), p.PaymentIntentId)
	}
	if n := countRows(t, gdb, `SELECT count(*) FROM payment_confirmations WHERE invoice_id = ?`, got.Invoice.Id); n != 1 {
		t.Fatalf("%d confirmations of the invoice", n)
	}
	assertInvariants(t, a)
}

// The validation chain refuses an invoice.paid that does not match the
// payment (amount paid, currency, livemode, another customer's metadata,
// another invoice naming the payment, a status that is not paid): each is
// parked and credits nothing; the genuine one then credits once.
func TestInvoicePaidMismatchesAreParked(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	s := startServer(t, payEnv(t, fake.URL()))
	gdb := openDB(t, s)

	setBilling(t, s, "globex")
	setBilling(t, s, "initech")
	r := payByInvoice(t, s, "globex", "starter", 1, "inv-globex-1", "")
	mustStatus(t, "invoice payment", r.StatusCode(), r.Body, http.StatusCreated)
	pay, invID := r.JSON201.PaymentId, r.JSON201.Invoice.Id
	paid := invoiceActionAt(t, fake, invID, "pay")
	meta, _ := paid["metadata"].(map[string]any)

	for _, c := range []struct {
		name   string
		object map[string]any
		want   string
	}{
		{"amount_paid short", withFields(paid, map[string]any{"amount_paid": starterAmount - 1}), "paid 999"},
		{"another currency", withFields(paid, map[string]any{"currency": "eur"}), `in "eur"`},
		{"live mode", withFields(paid, map[string]any{"livemode": true}), "livemode"},
		{"another customer's metadata", withFields(paid, map[string]any{"metadata": withFields(meta, map[string]any{stripeapi.MetadataCustomerID: "initech"})}), "initech"},
		{"another invoice naming the payment", withFields(paid, map[string]any{"id": "in_not_tallys"}), "whose invoice is"},
		{"an open invoice", withFields(paid, map[string]any{"status": "open"}), "not paid"},
	} {
		id := newEventID()
		deliver(t, s, stripeEvent(id, "invoice.paid", c.object))
		if status, lastErr := eventStatus(t, gdb, id); status != "parked" || !strings.Contains(lastErr, c.want) {
			t.Errorf("%s: %s (%s), want parked naming %q", c.name, status, lastErr, c.want)
		}
	}
	if bal := balanceOf(t, gdb, "globex"); bal != 0 {
		t.Fatalf("refused events credited %d", bal)
	}
	if p := getPayment(t, s, pay); p.Status != client.PaymentStatusPending {
		t.Fatalf("after refused events the payment is %s", p.Status)
	}
	deliver(t, s, stripeEvent(newEventID(), "invoice.paid", paid))
	if bal := balanceOf(t, gdb, "globex"); bal != starterCredits {
		t.Fatalf("balance %d after the genuine invoice.paid, want %d", bal, starterCredits)
	}
	assertInvariants(t, s)
}

// A voided invoice fails its payment; an invoice.paid after the void is
// not Stripe's word (a void invoice cannot be paid) and is parked. An
// invoice marked uncollectible fails its payment too, but paid later it
// is credited once.
func TestInvoiceVoidAndUncollectible(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	s := startServer(t, payEnv(t, fake.URL()))
	gdb := openDB(t, s)
	setBilling(t, s, "umbrella")

	r := payByInvoice(t, s, "umbrella", "starter", 1, "inv-umbrella-void", "")
	mustStatus(t, "invoice payment", r.StatusCode(), r.Body, http.StatusCreated)
	voidPay, voidInv := r.JSON201.PaymentId, r.JSON201.Invoice.Id
	open := invoiceAt(t, fake, voidInv)
	voided := invoiceActionAt(t, fake, voidInv, "void")
	voidEvent := newEventID()
	deliver(t, s, stripeEvent(voidEvent, "invoice.voided", voided))
	deliver(t, s, stripeEvent(voidEvent, "invoice.voided", voided)) // redelivered
	p := getPayment(t, s, voidPay)
	if p.Status != client.PaymentStatusFailed || deref(p.FailureReason) != "invoice voided" || deref(p.Invoice.Status) != "void" {
		t.Fatalf("after invoice.voided: %s (%s), invoice %+v", p.Status, deref(p.FailureReason), p.Invoice)
	}
	forged := newEventID()
	deliver(t, s, stripeEvent(forged, "invoice.paid", withFields(open, map[string]any{"status": "paid", "amount_paid": starterAmount})))
	if status, lastErr := eventStatus(t, gdb, forged); status != "parked" || !strings.Contains(lastErr, "voided") {
		t.Fatalf("invoice.paid after the void: %s (%s), want parked", status, lastErr)
	}
	if n := countRows(t, gdb, `SELECT count(*) FROM events WHERE type = 'payment.failed' AND data->>'payment_id' = ?`, voidPay); n != 1 {
		t.Fatalf("%d payment.failed events, want 1", n)
	}

	r = payByInvoice(t, s, "umbrella", "starter", 1, "inv-umbrella-late", "")
	mustStatus(t, "invoice payment", r.StatusCode(), r.Body, http.StatusCreated)
	latePay, lateInv := r.JSON201.PaymentId, r.JSON201.Invoice.Id
	deliver(t, s, stripeEvent(newEventID(), "invoice.marked_uncollectible", invoiceActionAt(t, fake, lateInv, "mark_uncollectible")))
	if p := getPayment(t, s, latePay); p.Status != client.PaymentStatusFailed {
		t.Fatalf("after invoice.marked_uncollectible: %s", p.Status)
	}
	// Stripe lets an uncollectible invoice be paid after all.
	paid := withFields(invoiceAt(t, fake, lateInv), map[string]any{"status": "paid", "amount_paid": starterAmount, "amount_remaining": 0})
	deliver(t, s, stripeEvent(newEventID(), "invoice.paid", paid))
	if p := getPayment(t, s, latePay); p.Status != client.PaymentStatusSucceeded {
		t.Fatalf("an uncollectible invoice paid later: %s", p.Status)
	}
	if bal := balanceOf(t, gdb, "umbrella"); bal != starterCredits {
		t.Fatalf("balance %d, want %d", bal, starterCredits)
	}
	assertInvariants(t, s)

	// tally verify covers invoices: a void invoice's payment marked
	// succeeded, and a paid invoice's confirmation taken away, are named.
	if err := gdb.Exec(`UPDATE payments SET status = 'succeeded' WHERE id = ?`, voidPay).Error; err != nil {
		t.Fatal(err)
	}
	if err := gdb.Exec(`DELETE FROM payment_confirmations WHERE payment_id = ?`, latePay).Error; err != nil {
		t.Fatal(err)
	}
	out, err := s.tallyCmd(t, "verify")
	if exitCode(err) != 2 || !strings.Contains(out, "BREACH unpaid_invoice_credited customer=umbrella payment="+voidPay) ||
		!strings.Contains(out, "BREACH invoice_payment_unconfirmed customer=umbrella payment="+latePay) {
		t.Fatalf("tally verify after tampering with invoice payments: %v\n%s", err, out)
	}
}

// Bad requests change nothing: a plan, an unknown item, a customer without
// an email, an unknown customer, a missing key, an end user's token.
func TestInvoicePaymentRefusals(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	s := startServer(t, payEnv(t, fake.URL()))
	gdb := openDB(t, s)
	setBilling(t, s, "hooli")
	ctx := context.Background()
	if _, err := s.service(t).UpsertCustomerWithResponse(ctx, "nomail", client.CustomerUpsert{}); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name     string
		customer string
		item     string
		status   int
	}{
		{"a plan", "hooli", "api", 422},
		{"an unknown item", "hooli", "nope", 422},
		{"no email to send it to", "nomail", "starter", 422},
		{"an unknown customer", "ghost", "starter", 404},
	} {
		r := payByInvoice(t, s, c.customer, c.item, 1, "key-"+c.name, "")
		mustStatus(t, c.name, r.StatusCode(), r.Body, c.status)
	}
	user := s.client(t, userToken(t, "hooli", time.Now().Add(time.Hour)))
	r, err := user.CreateInvoicePaymentWithResponse(ctx, "hooli", &client.CreateInvoicePaymentParams{IdempotencyKey: "u1"}, client.InvoicePaymentCreate{Item: "starter"})
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "an end user", r.StatusCode(), r.Body, http.StatusForbidden)
	if n := countRows(t, gdb, `SELECT count(*) FROM payments`); n != 0 {
		t.Fatalf("refused requests wrote %d payments", n)
	}
	if n := len(fake.Sandbox().Objects("invoice")); n != 0 {
		t.Fatalf("refused requests created %d invoices at Stripe", n)
	}
}

// A Checkout payment shows the invoice Stripe made for it
// (invoice.finalized, invoice.paid), but those events never credit it:
// only its PaymentIntent does, once.
func TestCheckoutInvoiceIsShownNeverCredits(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	env := payEnv(t, fake.URL())
	env["TALLY_CHECKOUT_INVOICE_CREATION"] = "true"
	s := startServer(t, env)
	gdb := openDB(t, s)

	pay := checkout(t, s, "checkout-inv", "starter", 1)
	if sessions := fake.CheckoutSessions(); sessions[len(sessions)-1].Get("invoice_creation[enabled]") != "true" ||
		sessions[len(sessions)-1].Get("invoice_creation[invoice_data][metadata][tally_payment_id]") != pay {
		t.Fatalf("the session did not ask for an invoice carrying our ids: %v", sessions[len(sessions)-1])
	}
	stripeCustomer := deref(readCustomer(t, s, "checkout-inv").StripeCustomerId)
	invoice := map[string]any{
		"id": "in_checkout_" + pay, "object": "invoice", "status": "paid", "number": "INV-0042", "currency": "usd",
		"amount_due": starterAmount, "amount_paid": starterAmount, "livemode": false, "customer": stripeCustomer,
		"hosted_invoice_url": "https://invoice.stripe.com/i/x", "invoice_pdf": "https://pay.stripe.com/invoice/x/pdf",
		"metadata": map[string]string{stripeapi.MetadataPaymentID: pay, stripeapi.MetadataCustomerID: "checkout-inv"},
	}
	// An invoice of another Stripe customer carrying the payment's
	// metadata never becomes its invoice.
	foreign := newEventID()
	deliver(t, s, stripeEvent(foreign, "invoice.paid", withFields(invoice, map[string]any{"id": "in_foreign", "customer": "cus_someone_else"})))
	if status, lastErr := eventStatus(t, gdb, foreign); status != "parked" || !strings.Contains(lastErr, "cus_someone_else") {
		t.Fatalf("a foreign invoice naming the payment: %s (%s), want parked", status, lastErr)
	}
	deliver(t, s, stripeEvent(newEventID(), "invoice.paid", invoice))
	deliver(t, s, stripeEvent(newEventID(), "invoice.finalized", withFields(invoice, map[string]any{"status": "open", "amount_paid": 0})))
	p := getPayment(t, s, pay)
	if p.Status != client.PaymentStatusPending || p.Invoice == nil || deref(p.Invoice.Number) != "INV-0042" || deref(p.Invoice.Status) != "paid" ||
		deref(p.Invoice.InvoicePdf) == "" {
		t.Fatalf("after the invoice events: %s, invoice %+v", p.Status, p.Invoice)
	}
	if bal := balanceOf(t, gdb, "checkout-inv"); bal != 0 {
		t.Fatalf("invoice events credited a Checkout payment: %d", bal)
	}
	paidAtStripe(t, fake, s, pay)
	deliver(t, s, stripeEvent(newEventID(), "payment_intent.succeeded", paymentIntent(pay, "checkout-inv", "succeeded", starterAmount, starterAmount, "usd")))
	if bal := balanceOf(t, gdb, "checkout-inv"); bal != starterCredits {
		t.Fatalf("balance %d, want %d", bal, starterCredits)
	}
	assertInvariants(t, s)
}

// confirmations counts the guard's rows of a payment.
func confirmations(t testing.TB, gdb *gorm.DB, pay string) int64 {
	return countRows(t, gdb, `SELECT count(*) FROM payment_confirmations WHERE payment_id = ?`, pay)
}

func readCustomer(t testing.TB, s *server, id string) client.Customer {
	t.Helper()
	r, err := s.service(t).GetCustomerWithResponse(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "get customer", r.StatusCode(), r.Body, http.StatusOK)
	return *r.JSON200
}

// Billing details given before the Stripe Customer exists are sent when
// it is created (tax id included); changed afterwards, the Stripe Customer
// is updated in step. A customer with invoice_always gets an invoice with
// every Checkout, whatever the item says.
func TestBillingDetailsKeepTheStripeCustomerInStep(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	s := startServer(t, payEnv(t, fake.URL()))
	ctx := context.Background()
	vat, always := "DE123456789", true
	r, err := s.service(t).UpsertCustomerWithResponse(ctx, "initrode", client.CustomerUpsert{Billing: &client.BillingDetails{
		Name: ptr("Initrode GmbH"), Email: ptr("ap@initrode.example"), InvoiceAlways: &always,
		TaxId: &struct {
			Type  string `json:"type"`
			Value string `json:"value"`
		}{Type: "eu_vat", Value: vat},
	}})
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "create with billing", r.StatusCode(), r.Body, http.StatusCreated)
	pay := checkout(t, s, "initrode", "starter", 1)
	created := fake.Customers()
	last := created[len(created)-1]
	if last.Get("name") != "Initrode GmbH" || last.Get("email") != "ap@initrode.example" || last.Get("tax_id_data[0][value]") != vat {
		t.Fatalf("the Stripe Customer was created with %v", last)
	}
	sessions := fake.CheckoutSessions()
	if sessions[len(sessions)-1].Get("invoice_creation[enabled]") != "true" {
		t.Fatalf("invoice_always did not ask for an invoice: %v", sessions[len(sessions)-1])
	}
	stripeID := deref(readCustomer(t, s, "initrode").StripeCustomerId)
	if stripeID == "" || deref(getPayment(t, s, pay).CheckoutSessionId) == "" {
		t.Fatal("no Stripe Customer linked")
	}
	country, line1 := "FR", "3 rue de la Paix"
	upd, err := s.service(t).UpsertCustomerWithResponse(ctx, "initrode", client.CustomerUpsert{Billing: &client.BillingDetails{
		Name: ptr("Initrode SAS"), Email: ptr("compta@initrode.example"),
		Address: &struct {
			City       *string `json:"city,omitempty"`
			Country    *string `json:"country,omitempty"`
			Line1      *string `json:"line1,omitempty"`
			Line2      *string `json:"line2,omitempty"`
			PostalCode *string `json:"postal_code,omitempty"`
			State      *string `json:"state,omitempty"`
		}{Country: &country, Line1: &line1},
	}})
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "update billing", upd.StatusCode(), upd.Body, http.StatusOK)
	at := fake.Sandbox().Object(stripeID)
	addr, _ := at["address"].(map[string]any)
	if at["name"] != "Initrode SAS" || at["email"] != "compta@initrode.example" || addr["country"] != "FR" || addr["line1"] != line1 {
		t.Fatalf("the Stripe Customer after the update: %v", at)
	}
	if b := upd.JSON200.Billing; b == nil || b.InvoiceAlways != nil || deref(b.Name) != "Initrode SAS" {
		t.Fatalf("billing after replacing it: %+v", b)
	}
}
