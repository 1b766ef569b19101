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

// invoiceStripe answers, as a Stripe account would, the two questions a
// refund or dispute of an invoice's PaymentIntent makes tally ask: the
// PaymentIntent (Stripe's own, no tally metadata) and its Invoice
// Payments. Entries are raw invoice_payment objects per PaymentIntent;
// paged PaymentIntents answer one entry per page (has_more), following
// starting_after; fail answers a chosen status for a PaymentIntent's
// question (path "pi" or "ip").
type invoiceStripe struct {
	mu      sync.Mutex
	entries map[string][]string // PaymentIntent -> invoice_payment objects
	paged   map[string]bool
	fail    map[string]int // "pi:"+id or "ip:"+id -> HTTP status
}

func newInvoiceStripe(fake *stripefake.Fake) *invoiceStripe {
	st := &invoiceStripe{entries: map[string][]string{}, paged: map[string]bool{}, fail: map[string]int{}}
	fake.SetFault(st.answer)
	return st
}

// invoiceStripeEnv is a fake Stripe whose PaymentIntents and invoice
// payments st answers, and a server environment on it whose retry
// interval (10 minutes) leaves only a wake to apply a waiting event
// within a test.
func invoiceStripeEnv(t *testing.T) (*stripefake.Fake, *invoiceStripe, map[string]string) {
	fake := stripefake.New(t)
	env := payEnv(t, fake.URL())
	env["TALLY_STRIPE_EVENT_RETRY_INTERVAL"] = "10m"
	return fake, newInvoiceStripe(fake), env
}

// paidEntry is an invoice_payment of invoice by pi in status.
func paidEntry(id, invoice, pi, status string, amount int64) string {
	return fmt.Sprintf(`{"id":%q,"object":"invoice_payment","amount_paid":%d,"amount_requested":%d,"currency":"usd","invoice":%q,"is_default":true,"livemode":false,"payment":{"type":"payment_intent","payment_intent":%q},"status":%q,"status_transitions":{"canceled_at":null,"paid_at":%d},"created":%d}`,
		id, amount, amount, invoice, pi, status, time.Now().Unix(), time.Now().Unix())
}

func (st *invoiceStripe) set(pi string, entries ...string) {
	st.mu.Lock()
	defer st.mu.Unlock()
	st.entries[pi] = entries
}

func (st *invoiceStripe) setFail(key string, status int) {
	st.mu.Lock()
	defer st.mu.Unlock()
	if status == 0 {
		delete(st.fail, key)
		return
	}
	st.fail[key] = status
}

func (st *invoiceStripe) answer(r *http.Request) (int, string, bool) {
	if r.Method != http.MethodGet {
		return 0, "", false
	}
	st.mu.Lock()
	defer st.mu.Unlock()
	errBody := func(status int) string {
		typ := "api_error"
		if status < 500 {
			typ = "invalid_request_error"
		}
		return fmt.Sprintf(`{"error":{"type":%q,"message":"fault %d"}}`, typ, status)
	}
	switch {
	case strings.HasPrefix(r.URL.Path, "/v1/payment_intents/"):
		id := strings.TrimPrefix(r.URL.Path, "/v1/payment_intents/")
		if _, ok := st.entries[id]; !ok {
			return 0, "", false
		}
		if status := st.fail["pi:"+id]; status != 0 {
			return status, errBody(status), true
		}
		return http.StatusOK, fmt.Sprintf(`{"id":%q,"object":"payment_intent","status":"succeeded","amount":%d,"amount_received":%d,"currency":"usd","livemode":false,"metadata":{}}`,
			id, proAmount, proAmount), true
	case r.URL.Path == "/v1/invoice_payments":
		q := r.URL.Query()
		pi := q.Get("payment[payment_intent]")
		if q.Get("payment[type]") != "payment_intent" || pi == "" {
			return http.StatusBadRequest, errBody(http.StatusBadRequest), true
		}
		if status := st.fail["ip:"+pi]; status != 0 {
			return status, errBody(status), true
		}
		all := st.entries[pi]
		data, more := all, false
		if st.paged[pi] {
			i := 0
			if after := q.Get("starting_after"); after != "" {
				for j, e := range all {
					if strings.Contains(e, fmt.Sprintf(`"id":%q`, after)) {
						i = j + 1
					}
				}
			}
			data = all[i:min(i+1, len(all))]
			more = i+1 < len(all)
		}
		return http.StatusOK, fmt.Sprintf(`{"object":"list","url":"/v1/invoice_payments","has_more":%t,"data":[%s]}`, more, strings.Join(data, ",")), true
	}
	return 0, "", false
}

// invoicedPayment makes a pay-by-invoice payment of customer for pro and
// says, at the fake Stripe, that its PaymentIntent piID(pay) paid it.
func invoicedPayment(t *testing.T, s *server, st *invoiceStripe, customer string) (pay, invoice string) {
	t.Helper()
	setBilling(t, s, customer)
	r := payByInvoice(t, s, customer, "pro", 1, "inv-"+customer, "")
	mustStatus(t, "invoice payment", r.StatusCode(), r.Body, http.StatusCreated)
	pay, invoice = r.JSON201.PaymentId, r.JSON201.Invoice.Id
	st.set(piID(pay), paidEntry("inpay_"+strings.TrimPrefix(pay, "pay_"), invoice, piID(pay), "paid", proAmount))
	return pay, invoice
}

func invoicePaid(t *testing.T, s *server, fake *stripefake.Fake, invoice string) string {
	t.Helper()
	id := newEventID()
	deliver(t, s, stripeEvent(id, "invoice.paid", invoiceActionAt(t, fake, invoice, "pay")))
	return id
}

func wantEvent(t *testing.T, got, want, what, lastErr string) {
	t.Helper()
	if got != want {
		t.Fatalf("%s: event %s %q, want %s", what, got, lastErr, want)
	}
}

func wantPayment(t *testing.T, s *server, pay string, status client.PaymentStatus, refunded int64) client.Payment {
	t.Helper()
	p := getPayment(t, s, pay)
	if p.Status != status || p.AmountRefunded != refunded {
		t.Fatalf("payment %s = %s refunded %d, want %s refunded %d (%+v)", pay, p.Status, p.AmountRefunded, status, refunded, p)
	}
	return p
}

func wantBalance(t *testing.T, s *server, customer string, want int64) {
	t.Helper()
	if got := balanceOverHTTP(t, s.service(t), customer); got.Balance != want {
		t.Fatalf("balance of %s = %d, want %d", customer, got.Balance, want)
	}
}

// TestRevInvStripeAnswers: what Stripe answers to "which invoice did this
// PaymentIntent pay" decides whether money that went back takes its
// credits back. An answer that is no answer (an error, including a 404 for
// the list itself, which cannot mean the PaymentIntent is unknown: Stripe
// just returned it) must leave the event to be retried, never ignored; an
// answer on a second page counts; an entry that proves nothing (open,
// canceled, another PaymentIntent's) takes nothing.
func TestRevInvStripeAnswers(t *testing.T) {
	t.Parallel()
	fake, st, env := invoiceStripeEnv(t)
	s := startServer(t, env)
	gdb := openDB(t, s)

	t.Run("404 on invoice_payments is retried, not ignored", func(t *testing.T) {
		pay, inv := invoicedPayment(t, s, st, "ra-404")
		invoicePaid(t, s, fake, inv)
		st.setFail("ip:"+piID(pay), http.StatusNotFound)
		refund := newEventID()
		deliver(t, s, stripeEvent(refund, "charge.refunded", refundedCharge(pay, proAmount, proAmount)))
		status, le := eventStatus(t, gdb, refund)
		wantEvent(t, status, "failed", "refund whose invoice Stripe answered 404 for", le)
		wantPayment(t, s, pay, client.PaymentStatusSucceeded, 0)
		st.setFail("ip:"+piID(pay), 0)
		rep, err := s.admin(t).ReplayStripeEventWithResponse(context.Background(), refund)
		if err != nil {
			t.Fatal(err)
		}
		mustStatus(t, "replay", rep.StatusCode(), rep.Body, http.StatusOK)
		status, le = eventStatus(t, gdb, refund)
		wantEvent(t, status, "processed", "the refund once Stripe answers", le)
		wantPayment(t, s, pay, client.PaymentStatusRefunded, proAmount)
		wantBalance(t, s, "ra-404", 0)
	})

	t.Run("429 and 500 are retried", func(t *testing.T) {
		pay, inv := invoicedPayment(t, s, st, "ra-429")
		invoicePaid(t, s, fake, inv)
		for _, f := range []struct {
			key    string
			status int
		}{{"ip:", http.StatusTooManyRequests}, {"pi:", http.StatusInternalServerError}, {"ip:", http.StatusServiceUnavailable}} {
			st.setFail(f.key+piID(pay), f.status)
			refund := newEventID()
			deliver(t, s, stripeEvent(refund, "charge.refunded", refundedCharge(pay, proAmount, proAmount)))
			status, le := eventStatus(t, gdb, refund)
			wantEvent(t, status, "failed", fmt.Sprintf("refund while Stripe answers %d to %s", f.status, f.key), le)
			if n := countRows(t, gdb, `SELECT count(*) FROM stripe_events WHERE id = ? AND next_attempt_at IS NOT NULL`, refund); n != 1 {
				t.Fatalf("refund while Stripe answers %d: no next attempt", f.status)
			}
			st.setFail(f.key+piID(pay), 0)
		}
		wantPayment(t, s, pay, client.PaymentStatusSucceeded, 0)
		wantBalance(t, s, "ra-429", proCredits)
	})

	t.Run("the match on page 2", func(t *testing.T) {
		pay, inv := invoicedPayment(t, s, st, "ra-page")
		invoicePaid(t, s, fake, inv)
		pi := piID(pay)
		st.set(pi, paidEntry("inpay_other1", "in_not_ours_1", pi, "paid", proAmount), paidEntry("inpay_ours", inv, pi, "paid", proAmount))
		st.mu.Lock()
		st.paged[pi] = true
		st.mu.Unlock()
		refund := newEventID()
		deliver(t, s, stripeEvent(refund, "charge.refunded", refundedCharge(pay, proAmount, proAmount)))
		status, le := eventStatus(t, gdb, refund)
		wantEvent(t, status, "processed", "refund found on page 2", le)
		wantPayment(t, s, pay, client.PaymentStatusRefunded, proAmount)
		wantBalance(t, s, "ra-page", 0)
	})

	t.Run("entries that prove nothing take nothing", func(t *testing.T) {
		pay, inv := invoicedPayment(t, s, st, "ra-nothing")
		invoicePaid(t, s, fake, inv)
		pi := piID(pay)
		for _, entry := range []string{
			paidEntry("inpay_c", inv, pi, "canceled", proAmount),
			paidEntry("inpay_x", inv, "pi_someone_else", "paid", proAmount),
		} {
			st.set(pi, entry)
			refund := newEventID()
			deliver(t, s, stripeEvent(refund, "charge.refunded", refundedCharge(pay, proAmount, proAmount)))
			status, le := eventStatus(t, gdb, refund)
			wantEvent(t, status, "ignored", "refund of a PaymentIntent whose invoice payment is "+entry, le)
		}
		// An open invoice payment says the PaymentIntent has not paid the
		// invoice (here the invoice was paid otherwise): no proof to take
		// the credits back on, nor to forget the refund on. An operator
		// looks (parked), and nothing is linked or taken.
		st.set(pi, paidEntry("inpay_o", inv, pi, "open", proAmount))
		open := newEventID()
		deliver(t, s, stripeEvent(open, "charge.refunded", refundedCharge(pay, proAmount, proAmount)))
		status, le := eventStatus(t, gdb, open)
		wantEvent(t, status, "parked", "refund of a PaymentIntent whose invoice payment of our invoice is open", le)
		p := wantPayment(t, s, pay, client.PaymentStatusSucceeded, 0)
		if p.PaymentIntentId != nil {
			t.Fatalf("payment linked to %s by an entry that proves nothing", *p.PaymentIntentId)
		}
		wantBalance(t, s, "ra-nothing", proCredits)
	})

	receivablesOverHTTP(t, s)
	assertInvariants(t, s)
}

// TestRevInvMoneyBack: every way the money of an invoice payment goes
// back takes exactly its share of credits back, once: partial then full
// refunds, redelivered and reordered; a dispute won and a dispute lost; a
// refund and a dispute that overtook invoice.paid, one of them parked
// after a day; and the linked PaymentIntent's own late events move
// nothing.
func TestRevInvMoneyBack(t *testing.T) {
	t.Parallel()
	fake, st, env := invoiceStripeEnv(t)
	s := startServer(t, env)
	gdb := openDB(t, s)

	t.Run("partial then full, redelivered and reordered", func(t *testing.T) {
		pay, inv := invoicedPayment(t, s, st, "mb-partial")
		invoicePaid(t, s, fake, inv)
		half := newEventID()
		halfBody := stripeEvent(half, "charge.refunded", refundedCharge(pay, proAmount, proAmount/2))
		deliver(t, s, halfBody)
		status, le := eventStatus(t, gdb, half)
		wantEvent(t, status, "processed", "half refund", le)
		wantPayment(t, s, pay, client.PaymentStatusRefunded, proAmount/2)
		wantBalance(t, s, "mb-partial", proCredits-proCredits/2)
		full := newEventID()
		deliver(t, s, stripeEvent(full, "charge.refunded", refundedCharge(pay, proAmount, proAmount)))
		deliver(t, s, halfBody)
		deliver(t, s, stripeEvent(newEventID(), "charge.refunded", refundedCharge(pay, proAmount, proAmount/2)))
		wantPayment(t, s, pay, client.PaymentStatusRefunded, proAmount)
		wantBalance(t, s, "mb-partial", 0)
		// The late events of the linked PaymentIntent: another amount, a
		// failure; neither grants nor fails anything.
		for _, typ := range []string{"payment_intent.succeeded", "payment_intent.payment_failed", "payment_intent.canceled"} {
			ev := newEventID()
			deliver(t, s, stripeEvent(ev, typ, map[string]any{"id": piID(pay), "object": "payment_intent", "status": "succeeded",
				"amount": proAmount * 3, "amount_received": proAmount * 3, "currency": "usd", "livemode": false, "metadata": map[string]string{}}))
			if status, le := eventStatus(t, gdb, ev); status != "processed" && status != "ignored" {
				t.Fatalf("late %s of the linked PaymentIntent: %s %q", typ, status, le)
			}
		}
		wantPayment(t, s, pay, client.PaymentStatusRefunded, proAmount)
		wantBalance(t, s, "mb-partial", 0)
	})

	t.Run("dispute then refund, dispute lost", func(t *testing.T) {
		pay, inv := invoicedPayment(t, s, st, "mb-lost")
		invoicePaid(t, s, fake, inv)
		deliver(t, s, disputeEvent("created", dispute(pay, "dp_mb_lost", "needs_response", proAmount)))
		wantBalance(t, s, "mb-lost", 0)
		// A refund made before the dispute, delivered after it.
		deliver(t, s, stripeEvent(newEventID(), "charge.refunded", refundedCharge(pay, proAmount, proAmount/2)))
		deliver(t, s, disputeEvent("closed", dispute(pay, "dp_mb_lost", "lost", proAmount)))
		if p := getPayment(t, s, pay); p.Status != client.PaymentStatusDisputeLost {
			t.Fatalf("lost dispute: %+v", p)
		}
		wantBalance(t, s, "mb-lost", 0)
	})

	t.Run("dispute won", func(t *testing.T) {
		pay, inv := invoicedPayment(t, s, st, "mb-won")
		invoicePaid(t, s, fake, inv)
		deliver(t, s, disputeEvent("created", dispute(pay, "dp_mb_won", "needs_response", proAmount)))
		wantBalance(t, s, "mb-won", 0)
		deliver(t, s, disputeEvent("closed", dispute(pay, "dp_mb_won", "won", proAmount)))
		if p := getPayment(t, s, pay); p.Status != client.PaymentStatusSucceeded {
			t.Fatalf("won dispute: %+v", p)
		}
		wantBalance(t, s, "mb-won", proCredits)
	})

	t.Run("dispute before invoice.paid waits for it", func(t *testing.T) {
		pay, inv := invoicedPayment(t, s, st, "mb-early-dispute")
		early := newEventID()
		deliver(t, s, stripeEventCreated(early, "charge.dispute.created", time.Now(), dispute(pay, "dp_mb_early", "needs_response", proAmount)))
		status, le := eventStatus(t, gdb, early)
		wantEvent(t, status, "failed", "dispute before invoice.paid", le)
		invoicePaid(t, s, fake, inv)
		status, le = eventStatus(t, gdb, early)
		wantEvent(t, status, "processed", "early dispute once the invoice is paid", le)
		if p := getPayment(t, s, pay); p.Status != client.PaymentStatusDisputed || p.AmountDisputed != proAmount {
			t.Fatalf("early dispute: %+v", p)
		}
		wantBalance(t, s, "mb-early-dispute", 0)
	})

	t.Run("refund two days late and before invoice.paid: parked, then applied", func(t *testing.T) {
		pay, inv := invoicedPayment(t, s, st, "mb-late")
		late := newEventID()
		deliver(t, s, stripeEventCreated(late, "charge.refunded", time.Now().Add(-48*time.Hour), refundedCharge(pay, proAmount, proAmount)))
		status, le := eventStatus(t, gdb, late)
		wantEvent(t, status, "parked", "refund a day past its deadline", le)
		if n := countRows(t, gdb, `SELECT count(*) FROM stripe_events WHERE id = ? AND waiting_for = ?`, late, inv); n != 1 {
			t.Fatalf("the parked refund does not wait for invoice %s", inv)
		}
		invoicePaid(t, s, fake, inv)
		status, le = eventStatus(t, gdb, late)
		wantEvent(t, status, "processed", "parked refund once the invoice is paid", le)
		wantPayment(t, s, pay, client.PaymentStatusRefunded, proAmount)
		wantBalance(t, s, "mb-late", 0)
	})

	receivablesOverHTTP(t, s)
	assertInvariants(t, s)
}

// TestRevInvConcurrentClaims: two servers on one database. Copies of one
// refund apply once; two PaymentIntents that both claim one invoice (a
// Stripe answer tally cannot tell from the truth) link one, take the
// credits back once, and leave the other for an operator; a PaymentIntent
// claiming invoices of two of our payments takes nothing.
func TestRevInvConcurrentClaims(t *testing.T) {
	t.Parallel()
	fake, st, env := invoiceStripeEnv(t)
	a, b := twoServers(t, env)
	gdb := openDB(t, a)

	// Copies of one refund, and of one dispute, on both servers at once.
	pay, inv := invoicedPayment(t, a, st, "cc-copies")
	invoicePaid(t, a, fake, inv)
	refund := stripeEvent(newEventID(), "charge.refunded", refundedCharge(pay, proAmount, proAmount))
	var wg sync.WaitGroup
	for i := range 6 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			srv := a
			if i%2 == 1 {
				srv = b
			}
			body := refund
			if i >= 4 {
				body = disputeEvent("created", dispute(pay, "dp_cc_copies", "needs_response", proAmount))
			}
			status, out := postWebhook(t, srv, body, sign(body, testWebhookSecret, time.Now()))
			if status != http.StatusOK {
				t.Errorf("delivery: %d %s", status, out)
			}
		}()
	}
	wg.Wait()
	if p := getPayment(t, a, pay); p.AmountRefunded != proAmount || deref(p.PaymentIntentId) != piID(pay) {
		t.Fatalf("payment after concurrent copies: %+v", p)
	}
	wantBalance(t, a, "cc-copies", 0)

	// Two PaymentIntents, each said to have paid the one invoice.
	pay2, inv2 := invoicedPayment(t, a, st, "cc-two")
	invoicePaid(t, a, fake, inv2)
	x, y := "pi_cc_two_x", "pi_cc_two_y"
	st.set(x, paidEntry("inpay_cc_x", inv2, x, "paid", proAmount))
	st.set(y, paidEntry("inpay_cc_y", inv2, y, "paid", proAmount))
	charge := func(pi, ch string) map[string]any {
		c := refundedCharge(pay2, proAmount, proAmount)
		c["payment_intent"], c["id"] = pi, ch
		return c
	}
	ids := []string{newEventID(), newEventID()}
	bodies := [][]byte{stripeEvent(ids[0], "charge.refunded", charge(x, "ch_cc_x")), stripeEvent(ids[1], "charge.refunded", charge(y, "ch_cc_y"))}
	for i, srv := range []*server{a, b} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			status, out := postWebhook(t, srv, bodies[i], sign(bodies[i], testWebhookSecret, time.Now()))
			if status != http.StatusOK {
				t.Errorf("delivery: %d %s", status, out)
			}
		}()
	}
	wg.Wait()
	statuses := map[string]int{}
	for _, id := range ids {
		status, _ := eventStatus(t, gdb, id)
		statuses[status]++
	}
	if statuses["processed"] != 1 || statuses["parked"] != 1 {
		t.Fatalf("two PaymentIntents claiming one invoice: %v, want one processed, one parked", statuses)
	}
	if p := getPayment(t, a, pay2); p.AmountRefunded != proAmount || (deref(p.PaymentIntentId) != x && deref(p.PaymentIntentId) != y) {
		t.Fatalf("payment claimed twice: %+v", p)
	}
	wantBalance(t, a, "cc-two", 0)

	// One PaymentIntent said to have paid invoices of two of our payments.
	p3, inv3 := invoicedPayment(t, a, st, "cc-both-1")
	p4, inv4 := invoicedPayment(t, a, st, "cc-both-2")
	invoicePaid(t, a, fake, inv3)
	invoicePaid(t, a, fake, inv4)
	z := "pi_cc_both"
	st.set(z, paidEntry("inpay_cc_z3", inv3, z, "paid", proAmount), paidEntry("inpay_cc_z4", inv4, z, "paid", proAmount))
	both := newEventID()
	c := refundedCharge(p3, proAmount, proAmount)
	c["payment_intent"], c["id"] = z, "ch_cc_both"
	deliver(t, b, stripeEvent(both, "charge.refunded", c))
	status, le := eventStatus(t, gdb, both)
	wantEvent(t, status, "parked", "a PaymentIntent paying two of our invoices", le)
	wantPayment(t, a, p3, client.PaymentStatusSucceeded, 0)
	wantPayment(t, a, p4, client.PaymentStatusSucceeded, 0)
	wantBalance(t, a, "cc-both-1", proCredits)
	wantBalance(t, a, "cc-both-2", proCredits)

	receivablesOverHTTP(t, a)
	assertInvariants(t, a)
}

// TestRevInvPlanInvoiceRefundStaysIgnored: a plan's Checkout Session links
// its first invoice to the plan's payment (invoice_id), and that invoice's
// PaymentIntent is Stripe's own, without tally metadata, like a
// pay-by-invoice payment's. A plan moves no money through tally and has
// no credits to take back: its refunds and chargebacks were ignored, and
// must stay so, not be parked for an operator (an alert for every plan
// refund) because Stripe says the PaymentIntent paid an invoice of ours.
func TestRevInvPlanInvoiceRefundStaysIgnored(t *testing.T) {
	t.Parallel()
	_, st, env := invoiceStripeEnv(t)
	s := startServer(t, env)
	gdb := openDB(t, s)

	pay := checkout(t, s, "plan-buyer", "api", 1)
	p := getPayment(t, s, pay)
	cs := checkoutSession(pay, "plan-buyer", deref(p.CheckoutSessionId), "complete", "paid", 2000)
	cs["mode"], cs["invoice"], cs["subscription"], cs["payment_intent"] = "subscription", "in_plan_first", "sub_plan", nil
	cs["metadata"].(map[string]string)["tally_item"] = "api"
	completed := newEventID()
	deliver(t, s, stripeEvent(completed, "checkout.session.completed", cs))
	if status, le := eventStatus(t, gdb, completed); status != "processed" {
		t.Fatalf("plan checkout: %s %q", status, le)
	}
	if p := getPayment(t, s, pay); p.Status != client.PaymentStatusSucceeded {
		t.Fatalf("plan payment: %+v", p)
	}
	planPI := "pi_plan_first"
	st.set(planPI, paidEntry("inpay_plan_first", "in_plan_first", planPI, "paid", 2000))
	charge := refundedCharge(pay, 2000, 2000)
	charge["payment_intent"], charge["id"] = planPI, "ch_plan_first"
	refund := newEventID()
	deliver(t, s, stripeEvent(refund, "charge.refunded", charge))
	d := dispute(pay, "dp_plan_first", "needs_response", 2000)
	d["payment_intent"], d["charge"] = planPI, "ch_plan_first"
	chargeback := newEventID()
	deliver(t, s, stripeEvent(chargeback, "charge.dispute.created", d))
	for _, id := range []string{refund, chargeback} {
		if status, le := eventStatus(t, gdb, id); status != "ignored" {
			t.Fatalf("refund or dispute of a plan's first invoice: %s %q, want ignored as before", status, le)
		}
	}
	if p := getPayment(t, s, pay); p.Status != client.PaymentStatusSucceeded || p.PaymentIntentId != nil {
		t.Fatalf("plan payment after its invoice's refund: %+v", p)
	}
	assertInvariants(t, s)
}
