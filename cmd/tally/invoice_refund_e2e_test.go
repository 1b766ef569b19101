package main

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tallybilling/tally/internal/stripeapi/stripefake"
	"github.com/tallybilling/tally/pkg/client"
)

// TestRefundAndDisputeOfInvoicePayment: a pay-by-invoice payment is
// confirmed by invoice.paid and never linked to a PaymentIntent; the
// invoice's PaymentIntent is Stripe's own and carries no tally metadata,
// and neither does its charge. Its refund or chargeback was ignored as
// not ours: the buyer kept the credits and the money. tally now asks
// Stripe which invoice the PaymentIntent paid (GET /v1/invoice_payments)
// and, when that invoice is one of its payments, the refund or dispute
// takes the credits back; the PaymentIntent is linked then, so later
// events of it find the payment without asking again. A refund that
// overtakes invoice.paid waits for it and is applied by it; a
// PaymentIntent that paid someone else's invoice stays ignored; Stripe not
// answering is retried, not ignored.
func TestRefundAndDisputeOfInvoicePayment(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	env := payEnv(t, fake.URL())
	// Long enough that only the invoice's success can apply a waiting
	// refund within the test, not its next retry.
	env["TALLY_STRIPE_EVENT_RETRY_INTERVAL"] = "10m"
	s := startServer(t, env)
	gdb := openDB(t, s)

	// Stripe's invoice PaymentIntents: no metadata, and the invoice each
	// paid, as GET /v1/invoice_payments?payment[payment_intent]= answers.
	var mu sync.Mutex
	paidInvoice := map[string]string{} // PaymentIntent -> invoice
	down := false
	fake.SetFault(func(r *http.Request) (int, string, bool) {
		if r.Method != http.MethodGet {
			return 0, "", false
		}
		mu.Lock()
		defer mu.Unlock()
		switch {
		case strings.HasPrefix(r.URL.Path, "/v1/payment_intents/"):
			id := strings.TrimPrefix(r.URL.Path, "/v1/payment_intents/")
			if _, ok := paidInvoice[id]; !ok {
				return 0, "", false
			}
			return http.StatusOK, fmt.Sprintf(`{"id":%q,"object":"payment_intent","status":"succeeded","amount":%d,"amount_received":%d,"currency":"usd","livemode":false,"metadata":{}}`,
				id, proAmount, proAmount), true
		case r.URL.Path == "/v1/invoice_payments":
			if down {
				return http.StatusServiceUnavailable, `{"error":{"type":"api_error","message":"down"}}`, true
			}
			q := r.URL.Query()
			pi := q.Get("payment[payment_intent]")
			if q.Get("payment[type]") != "payment_intent" || pi == "" {
				return http.StatusBadRequest, `{"error":{"type":"invalid_request_error","message":"payment[type] and payment[payment_intent] expected"}}`, true
			}
			data := ""
			if inv := paidInvoice[pi]; inv != "" {
				data = fmt.Sprintf(`{"id":"inpay_%s","object":"invoice_payment","amount_paid":%d,"amount_requested":%d,"currency":"usd","invoice":%q,"is_default":true,"livemode":false,"payment":{"type":"payment_intent","payment_intent":%q},"status":"paid","status_transitions":{"canceled_at":null,"paid_at":%d},"created":%d}`,
					pi, proAmount, proAmount, inv, pi, time.Now().Unix(), time.Now().Unix())
			}
			return http.StatusOK, `{"object":"list","url":"/v1/invoice_payments","has_more":false,"data":[` + data + `]}`, true
		}
		return 0, "", false
	})
	invoiced := func(t *testing.T, customer string) (pay, invoice string) {
		t.Helper()
		setBilling(t, s, customer)
		r := payByInvoice(t, s, customer, "pro", 1, "inv-"+customer, "")
		mustStatus(t, "invoice payment", r.StatusCode(), r.Body, http.StatusCreated)
		pay, invoice = r.JSON201.PaymentId, r.JSON201.Invoice.Id
		mu.Lock()
		paidInvoice[piID(pay)] = invoice
		mu.Unlock()
		return pay, invoice
	}
	paid := func(t *testing.T, customer, invoice string) {
		t.Helper()
		deliver(t, s, stripeEvent(newEventID(), "invoice.paid", invoiceActionAt(t, fake, invoice, "pay")))
		if got := balanceOf(t, gdb, customer); got != proCredits {
			t.Fatalf("balance of %s after invoice.paid = %d, want %d", customer, got, proCredits)
		}
	}
	lookups := func() int {
		n := 0
		for _, r := range fake.Requests() {
			if r.Path == "/v1/invoice_payments" {
				n++
			}
		}
		return n
	}
	processed := func(t *testing.T, what, id string) {
		t.Helper()
		if st, le := eventStatus(t, gdb, id); st != "processed" {
			t.Fatalf("%s: %s %q, want processed", what, st, le)
		}
	}

	t.Run("refund", func(t *testing.T) {
		// Paid by invoice, then refunded in full: the credits go back.
		refunded, refundedInvoice := invoiced(t, "inv-refund")
		paid(t, "inv-refund", refundedInvoice)
		refund := newEventID()
		deliver(t, s, stripeEvent(refund, "charge.refunded", refundedCharge(refunded, proAmount, proAmount)))
		processed(t, "refund of an invoice payment", refund)
		p := getPayment(t, s, refunded)
		if p.Status != client.PaymentStatusRefunded || p.AmountRefunded != proAmount || deref(p.PaymentIntentId) != piID(refunded) {
			t.Fatalf("refunded invoice payment = %+v, want refunded %d by %s", p, proAmount, piID(refunded))
		}
		if got := balanceOverHTTP(t, s.service(t), "inv-refund"); got.Balance != 0 {
			t.Fatalf("balance after the refund = %d, want 0", got.Balance)
		}
		// The PaymentIntent is linked now: a later event of it (a chargeback
		// after the refund, say) finds the payment without asking Stripe.
		before := lookups()
		later := newEventID()
		deliver(t, s, stripeEvent(later, "charge.dispute.created", dispute(refunded, "dp_inv_after_refund", "warning_needs_response", proAmount)))
		processed(t, "inquiry after the refund", later)
		if n := lookups() - before; n != 0 {
			t.Fatalf("a linked PaymentIntent's event asked Stripe for its invoice %d times", n)
		}

		// Nor does a late event of the invoice's PaymentIntent itself (Stripe's
		// own, delivered after an outage) move the payment or need an
		// operator: invoice.paid confirmed it, and nothing else fails it.
		for _, typ := range []string{"payment_intent.succeeded", "payment_intent.payment_failed"} {
			status := strings.TrimPrefix(typ, "payment_intent.")
			if status == "payment_failed" {
				status = "requires_payment_method"
			}
			late := newEventID()
			deliver(t, s, stripeEvent(late, typ, map[string]any{"id": piID(refunded), "object": "payment_intent", "status": status,
				"amount": proAmount, "amount_received": proAmount, "currency": "usd", "livemode": false, "metadata": map[string]string{}}))
			if st, le := eventStatus(t, gdb, late); st != "processed" && st != "ignored" {
				t.Fatalf("late %s of an invoice's PaymentIntent: %s %q, want processed or ignored", typ, st, le)
			}
		}
		if p := getPayment(t, s, refunded); p.Status != client.PaymentStatusRefunded || p.AmountRefunded != proAmount {
			t.Fatalf("refunded invoice payment after its PaymentIntent's late events = %+v", p)
		}
		if got := balanceOverHTTP(t, s.service(t), "inv-refund"); got.Balance != 0 {
			t.Fatalf("balance after its PaymentIntent's late events = %d, want 0", got.Balance)
		}

	})

	t.Run("dispute", func(t *testing.T) {
		// Paid by invoice, then charged back: the credits go back.
		disputed, disputedInvoice := invoiced(t, "inv-dispute")
		paid(t, "inv-dispute", disputedInvoice)
		chargeback := newEventID()
		deliver(t, s, stripeEvent(chargeback, "charge.dispute.created", dispute(disputed, "dp_inv_1", "needs_response", proAmount)))
		processed(t, "dispute of an invoice payment", chargeback)
		if p := getPayment(t, s, disputed); p.Status != client.PaymentStatusDisputed || p.AmountDisputed != proAmount {
			t.Fatalf("disputed invoice payment = %+v", p)
		}
		if got := balanceOverHTTP(t, s.service(t), "inv-dispute"); got.Balance != 0 {
			t.Fatalf("balance after the chargeback = %d, want 0", got.Balance)
		}

	})

	t.Run("refund before invoice.paid", func(t *testing.T) {
		// Refunded before tally saw invoice.paid (redelivered out of order):
		// it waits, and the invoice's success applies it at once.
		early, earlyInvoice := invoiced(t, "inv-early")
		earlyRefund := newEventID()
		deliver(t, s, stripeEvent(earlyRefund, "charge.refunded", refundedCharge(early, proAmount, proAmount)))
		if st, le := eventStatus(t, gdb, earlyRefund); st != "failed" || !strings.Contains(le, "waiting for") {
			t.Fatalf("refund before invoice.paid: %s %q, want failed, waiting for the success", st, le)
		}
		deliver(t, s, stripeEvent(newEventID(), "invoice.paid", invoiceActionAt(t, fake, earlyInvoice, "pay")))
		processed(t, "the early refund right after invoice.paid", earlyRefund)
		if p := getPayment(t, s, early); p.Status != client.PaymentStatusRefunded || p.AmountRefunded != proAmount {
			t.Fatalf("early-refunded invoice payment = %+v", p)
		}
		if got := balanceOverHTTP(t, s.service(t), "inv-early"); got.Balance != 0 {
			t.Fatalf("balance after the early refund = %d, want 0", got.Balance)
		}

	})

	t.Run("not ours", func(t *testing.T) {
		// A PaymentIntent that paid an invoice tally did not make, or none.
		mu.Lock()
		paidInvoice["pi_someone_elses"] = "in_someone_elses"
		paidInvoice["pi_no_invoice"] = ""
		mu.Unlock()
		for _, pay := range []string{"pay_someone_elses", "pay_no_invoice"} {
			foreign := newEventID()
			deliver(t, s, stripeEvent(foreign, "charge.refunded", refundedCharge(pay, proAmount, proAmount)))
			if st, le := eventStatus(t, gdb, foreign); st != "ignored" {
				t.Fatalf("refund of %s: %s %q, want ignored", piID(pay), st, le)
			}
		}

	})

	t.Run("Stripe down", func(t *testing.T) {
		// Stripe does not answer which invoice: retried, not ignored.
		outage, outageInvoice := invoiced(t, "inv-outage")
		paid(t, "inv-outage", outageInvoice)
		mu.Lock()
		down = true
		mu.Unlock()
		unanswered := newEventID()
		deliver(t, s, stripeEvent(unanswered, "charge.refunded", refundedCharge(outage, proAmount, proAmount)))
		if st, le := eventStatus(t, gdb, unanswered); st != "failed" {
			t.Fatalf("refund while Stripe is down: %s %q, want failed (retried)", st, le)
		}
		if n := countRows(t, gdb, `SELECT count(*) FROM stripe_events WHERE id = ? AND next_attempt_at IS NOT NULL`, unanswered); n != 1 {
			t.Fatalf("refund while Stripe is down has no next attempt")
		}
		if p := getPayment(t, s, outage); p.Status != client.PaymentStatusSucceeded {
			t.Fatalf("payment whose refund failed = %+v, want still succeeded", p)
		}

		// Once Stripe answers, the event applies (replayed here rather
		// than waiting for its next attempt).
		mu.Lock()
		down = false
		mu.Unlock()
		rep, err := s.admin(t).ReplayStripeEventWithResponse(context.Background(), unanswered)
		if err != nil {
			t.Fatal(err)
		}
		mustStatus(t, "replay", rep.StatusCode(), rep.Body, http.StatusOK)
		processed(t, "the refund once Stripe answers", unanswered)
		if p := getPayment(t, s, outage); p.Status != client.PaymentStatusRefunded || p.AmountRefunded != proAmount {
			t.Fatalf("payment refunded once Stripe answers = %+v", p)
		}
		if got := balanceOverHTTP(t, s.service(t), "inv-outage"); got.Balance != 0 {
			t.Fatalf("balance once Stripe answers = %d, want 0", got.Balance)
		}
	})

	t.Run("Stripe back", func(t *testing.T) {
		// Refunds that met Stripe down wait for their backoff: here the
		// 10-minute retry interval, up to an hour after a long outage,
		// with the credits they take back spendable meanwhile. Once tally
		// sees Stripe answer, they are retried at once: a sync that
		// listed Stripe's events brings them forward, and so does the
		// retry of one of them that went through.
		refundWhileDown := func(customer string) (event, pay string) {
			pay, invoice := invoiced(t, customer)
			paid(t, customer, invoice)
			event = newEventID()
			deliver(t, s, stripeEvent(event, "charge.refunded", refundedCharge(pay, proAmount, proAmount)))
			if st, le := eventStatus(t, gdb, event); st != "failed" {
				t.Fatalf("refund of %s while Stripe is down: %s %q, want failed", customer, st, le)
			}
			return event, pay
		}
		setDown := func(d bool) {
			mu.Lock()
			down = d
			mu.Unlock()
		}
		refunded := func(what, event, pay, customer string) {
			t.Helper()
			waitForWithin(t, what, 20*time.Second, func() bool {
				st, _ := eventStatus(t, gdb, event)
				return st == "processed"
			})
			if p := getPayment(t, s, pay); p.Status != client.PaymentStatusRefunded || p.AmountRefunded != proAmount {
				t.Fatalf("%s: payment = %+v, want refunded", what, p)
			}
			if got := balanceOverHTTP(t, s.service(t), customer); got.Balance != 0 {
				t.Fatalf("%s: balance = %d, want 0", what, got.Balance)
			}
		}

		setDown(true)
		bySync, bySyncPay := refundWhileDown("inv-back-sync")
		setDown(false)
		r, err := s.admin(t).SyncStripeWithResponse(context.Background(), client.StripeSyncRequest{})
		if err != nil {
			t.Fatal(err)
		}
		mustStatus(t, "sync", r.StatusCode(), r.Body, http.StatusOK)
		refunded("the refund retried once a sync listed Stripe's events", bySync, bySyncPay, "inv-back-sync")

		setDown(true)
		first, firstPay := refundWhileDown("inv-back-first")
		second, secondPay := refundWhileDown("inv-back-second")
		setDown(false)
		rep, err := s.admin(t).ReplayStripeEventWithResponse(context.Background(), first)
		if err != nil {
			t.Fatal(err)
		}
		mustStatus(t, "replay", rep.StatusCode(), rep.Body, http.StatusOK)
		refunded("the replayed refund", first, firstPay, "inv-back-first")
		refunded("the other refund that met Stripe down, once the first went through", second, secondPay, "inv-back-second")
	})

	receivablesOverHTTP(t, s)
	assertInvariants(t, s)
}

// TestRefundThatMetStripeSilentIsRecorded: Stripe that does not answer at
// all (a hang, not a 5xx) outlasts the attempt, whose time is its lease
// (or 30 s): stripe-go's 20 s timeout and two network retries always do.
// The attempt's outcome was then written with the attempt's expired
// context and never stored: the refund stayed received with no attempt
// counted, was retried at every lease end rather than at a backoff,
// counted by no tally_stripe_events_total failure (the alert stayed
// quiet), and was never marked as having met Stripe down, so Stripe
// answering again did not bring it forward. It is recorded as any
// outage: failed, one attempt, marked.
func TestRefundThatMetStripeSilentIsRecorded(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	o := answerPaymentIntents(fake)
	env := payEnv(t, fake.URL())
	env["TALLY_STRIPE_EVENT_LEASE"] = "1s" // the attempt's time
	env["TALLY_STRIPE_EVENT_RETRY_INTERVAL"] = "10m"
	s := startServer(t, env)
	gdb := openDB(t, s)

	// Its PaymentIntent is linked to nothing yet: the refund asks Stripe
	// whose it is, and Stripe answers only after the attempt gave up.
	pay := o.checkout(t, s, "silent-refund")
	fake.SetHang(3 * time.Second)
	refund := newEventID()
	deliver(t, s, stripeEvent(refund, "charge.refunded", refundedCharge(pay, starterAmount, starterAmount)))
	fake.SetHang(0)

	var row struct {
		Status            string
		Attempts          int
		StripeUnreachable bool
		LastError         *string
	}
	if err := gdb.Raw(`SELECT status, attempts, stripe_unreachable, last_error FROM stripe_events WHERE id = ?`, refund).Scan(&row).Error; err != nil {
		t.Fatal(err)
	}
	if row.Status != "failed" || row.Attempts != 1 || !row.StripeUnreachable || row.LastError == nil {
		t.Fatalf("refund that met Stripe silent: %+v, want failed after 1 attempt, marked as having met Stripe down, with its error", row)
	}
	if p := getPayment(t, s, pay); p.AmountRefunded != 0 {
		t.Fatalf("payment whose refund met Stripe silent = %+v, want nothing refunded yet", p)
	}
}
