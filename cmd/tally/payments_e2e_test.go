package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tallybilling/tally/internal/config"
	"github.com/tallybilling/tally/internal/credits"
	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/stripeapi/stripefake"
	"github.com/tallybilling/tally/internal/stripeapi/stripemock"
	"github.com/tallybilling/tally/pkg/client"
)

// TestSameSuccessToTwoInstancesCreditsOnce delivers one payment's
// payment_intent.succeeded five times, concurrently, to each of two server
// instances on one database, under two event ids (the event, and the same
// PaymentIntent in a second event as a replay or strategy switch would).
func TestSameSuccessToTwoInstancesCreditsOnce(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	envA := payEnv(t, fake.URL())
	a, b := twoServers(t, envA)
	gdb := openDB(t, a)

	pay := checkout(t, a, "buyer-1", "starter", 1)
	paidAtStripe(t, fake, a, pay)
	pi := paymentIntent(pay, "buyer-1", "succeeded", starterAmount, starterAmount, "usd")
	events := [][]byte{stripeEvent(newEventID(), "payment_intent.succeeded", pi), stripeEvent(newEventID(), "payment_intent.succeeded", pi)}

	var wg sync.WaitGroup
	statuses := make(chan int, 20)
	for i := range 20 {
		target := []*server{a, b}[i%2]
		body := events[(i/2)%2]
		wg.Add(1)
		go func() {
			defer wg.Done()
			st, _ := postWebhook(t, target, body, sign(body, testWebhookSecret, time.Now()))
			statuses <- st
		}()
	}
	wg.Wait()
	close(statuses)
	for st := range statuses {
		if st != http.StatusOK {
			t.Fatalf("a delivery got %d, want 200", st)
		}
	}

	if got := balanceOf(t, gdb, "buyer-1"); got != starterCredits {
		t.Fatalf("balance = %d, want %d (credited once)", got, starterCredits)
	}
	if n := countRows(t, gdb, `SELECT count(*) FROM credit_grants WHERE payment_id = ?`, pay); n != 1 {
		t.Fatalf("%d purchase grants, want 1", n)
	}
	if n := countRows(t, gdb, `SELECT count(*) FROM events WHERE type = 'payment.succeeded'`); n != 1 {
		t.Fatalf("%d payment.succeeded events, want 1", n)
	}
	if n := countRows(t, gdb, `SELECT count(*) FROM stripe_events WHERE status = 'processed'`); n != 2 {
		t.Fatalf("%d stored events processed, want 2 (each id stored once)", n)
	}
	p := getPayment(t, b, pay)
	if p.Status != client.PaymentStatusSucceeded || p.AmountReceived == nil || *p.AmountReceived != starterAmount || p.PaymentIntentId == nil {
		t.Fatalf("payment = %+v", p)
	}
	applied := 0
	for _, tr := range p.Transitions {
		if tr.Applied && tr.To == "succeeded" {
			applied++
		}
	}
	if applied != 1 {
		t.Fatalf("transitions = %+v; want one applied move to succeeded", p.Transitions)
	}
	assertInvariants(t, a)
}

// TestPaymentEventOrders shows the out-of-order and failure days: each case
// drives one payment through its events and checks the final state and credits.
func TestPaymentEventOrders(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	s := startServer(t, payEnv(t, fake.URL()))
	gdb := openDB(t, s)

	t.Run("success before checkout.session.completed", func(t *testing.T) {
		pay := checkout(t, s, "order-1", "starter", 1)
		p := getPayment(t, s, pay)
		paidAtStripe(t, fake, s, pay)
		deliver(t, s, stripeEvent(newEventID(), "payment_intent.succeeded", paymentIntent(pay, "order-1", "succeeded", starterAmount, starterAmount, "usd")))
		cs := checkoutSession(pay, "order-1", *p.CheckoutSessionId, "complete", "paid", starterAmount)
		cs["invoice"] = "in_test_1"
		deliver(t, s, stripeEvent(newEventID(), "checkout.session.completed", cs))
		p = getPayment(t, s, pay)
		if p.Status != client.PaymentStatusSucceeded || p.InvoiceId == nil || *p.InvoiceId != "in_test_1" {
			t.Fatalf("payment = %+v", p)
		}
		if got := balanceOf(t, gdb, "order-1"); got != starterCredits {
			t.Fatalf("balance = %d, want %d", got, starterCredits)
		}
	})

	t.Run("failure after success is refused", func(t *testing.T) {
		pay := checkout(t, s, "order-2", "starter", 1)
		paidAtStripe(t, fake, s, pay)
		deliver(t, s, stripeEvent(newEventID(), "payment_intent.succeeded", paymentIntent(pay, "order-2", "succeeded", starterAmount, starterAmount, "usd")))
		late := newEventID()
		deliver(t, s, stripeEvent(late, "payment_intent.payment_failed", paymentIntent(pay, "order-2", "requires_payment_method", starterAmount, 0, "usd")))
		p := getPayment(t, s, pay)
		if p.Status != client.PaymentStatusSucceeded {
			t.Fatalf("a late failure moved the payment to %s", p.Status)
		}
		last := p.Transitions[len(p.Transitions)-1]
		if last.Applied || last.To != "failed" || last.StripeEventId == nil || *last.StripeEventId != late {
			t.Fatalf("the refused transition is not recorded with its event: %+v", p.Transitions)
		}
		if got := balanceOf(t, gdb, "order-2"); got != starterCredits {
			t.Fatalf("balance = %d, want %d", got, starterCredits)
		}
	})

	t.Run("failed card then success in the same session", func(t *testing.T) {
		pay := checkout(t, s, "order-3", "starter", 2)
		deliver(t, s, stripeEvent(newEventID(), "payment_intent.payment_failed", paymentIntent(pay, "order-3", "requires_payment_method", 2*starterAmount, 0, "usd")))
		if p := getPayment(t, s, pay); p.Status != client.PaymentStatusFailed || p.FailureReason == nil || !strings.Contains(*p.FailureReason, "declined") {
			t.Fatalf("after the decline: %+v", p)
		}
		if got := balanceOf(t, gdb, "order-3"); got != 0 {
			t.Fatalf("a failed payment credited %d", got)
		}
		paidAtStripe(t, fake, s, pay)
		success := stripeEvent(newEventID(), "payment_intent.succeeded", paymentIntent(pay, "order-3", "succeeded", 2*starterAmount, 2*starterAmount, "usd"))
		deliver(t, s, success)
		deliver(t, s, success)
		p := getPayment(t, s, pay)
		if p.Status != client.PaymentStatusSucceeded || p.Credits != 2*starterCredits {
			t.Fatalf("after the retried card: %+v", p)
		}
		var moves []string
		for _, tr := range p.Transitions {
			moves = append(moves, fmt.Sprintf("%s:%t", move(tr), tr.Applied))
		}
		if strings.Join(moves, " ") != ">pending:true pending>failed:true failed>succeeded:true" {
			t.Fatalf("transitions = %v", moves)
		}
		if got := balanceOf(t, gdb, "order-3"); got != 2*starterCredits {
			t.Fatalf("balance = %d, want %d", got, 2*starterCredits)
		}
	})

	t.Run("expired session", func(t *testing.T) {
		pay := checkout(t, s, "order-4", "starter", 1)
		p := getPayment(t, s, pay)
		cs := checkoutSession(pay, "order-4", *p.CheckoutSessionId, "expired", "unpaid", starterAmount)
		cs["payment_intent"] = nil
		deliver(t, s, stripeEvent(newEventID(), "checkout.session.expired", cs))
		p = getPayment(t, s, pay)
		if p.Status != client.PaymentStatusFailed || p.FailureReason == nil || *p.FailureReason != "checkout session expired" {
			t.Fatalf("expired session: %+v", p)
		}
		if n := countRows(t, gdb, `SELECT count(*) FROM events WHERE type = 'payment.failed' AND data->>'payment_id' = ?`, pay); n != 1 {
			t.Fatalf("%d payment.failed events, want 1", n)
		}
	})

	t.Run("unpaid completion credits nothing until the PaymentIntent succeeds", func(t *testing.T) {
		pay := checkout(t, s, "order-5", "starter", 1)
		p := getPayment(t, s, pay)
		deliver(t, s, stripeEvent(newEventID(), "checkout.session.completed", checkoutSession(pay, "order-5", *p.CheckoutSessionId, "complete", "unpaid", starterAmount)))
		p = getPayment(t, s, pay)
		if p.Status != client.PaymentStatusPending || p.PaymentIntentId == nil || *p.PaymentIntentId != piID(pay) {
			t.Fatalf("after an unpaid completion: %+v", p)
		}
		if got := balanceOf(t, gdb, "order-5"); got != 0 {
			t.Fatalf("an unpaid completion credited %d", got)
		}
		deliver(t, s, stripeEvent(newEventID(), "payment_intent.succeeded", paymentIntent(pay, "order-5", "succeeded", starterAmount, starterAmount, "usd")))
		if p := getPayment(t, s, pay); p.Status != client.PaymentStatusSucceeded {
			t.Fatalf("after the success: %+v", p)
		}
		if got := balanceOf(t, gdb, "order-5"); got != starterCredits {
			t.Fatalf("balance = %d, want %d", got, starterCredits)
		}
	})

	assertInvariants(t, s)
}

// TestMismatchParksAndReplay shows the validation chain: an amount or
// currency that does not match the payment credits nothing and parks the
// event, listed by the admin API; fixed, a replay credits once.
func TestMismatchParksAndReplay(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	s := startServer(t, payEnv(t, fake.URL()))
	gdb := openDB(t, s)
	ctx := context.Background()

	// The session at Stripe charged 999 where the catalog says 1000.
	short := checkout(t, s, "mismatch-1", "starter", 1)
	paidAtStripe(t, fake, s, short)
	fake.UpdateCheckoutSession(*getPayment(t, s, short).CheckoutSessionId, map[string]any{"amount_subtotal": 999, "amount_total": 999})
	shortEvent := newEventID()
	deliver(t, s, stripeEvent(shortEvent, "payment_intent.succeeded", paymentIntent(short, "mismatch-1", "succeeded", 999, 999, "usd")))
	euro := checkout(t, s, "mismatch-2", "starter", 1)
	paidAtStripe(t, fake, s, euro)
	euroEvent := newEventID()
	deliver(t, s, stripeEvent(euroEvent, "payment_intent.succeeded", paymentIntent(euro, "mismatch-2", "succeeded", starterAmount, starterAmount, "eur")))

	for _, c := range []struct{ event, pay, customer, want string }{
		{shortEvent, short, "mismatch-1", "charges 999 usd before tax"},
		{euroEvent, euro, "mismatch-2", `currency "eur"`},
	} {
		status, lastErr := eventStatus(t, gdb, c.event)
		if status != "parked" || !strings.Contains(lastErr, c.want) {
			t.Fatalf("event %s: status %s, last_error %q; want parked naming %s", c.event, status, lastErr, c.want)
		}
		if p := getPayment(t, s, c.pay); p.Status != client.PaymentStatusPending {
			t.Fatalf("a refused event moved payment %s to %s", c.pay, p.Status)
		}
		if got := balanceOf(t, gdb, c.customer); got != 0 {
			t.Fatalf("a refused event credited %d", got)
		}
	}

	parked := client.StripeEventStatusParked
	list, err := s.admin(t).ListStripeEventsWithResponse(ctx, &client.ListStripeEventsParams{Status: &parked})
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "list parked", list.StatusCode(), list.Body, http.StatusOK)
	ids := map[string]bool{}
	for _, e := range list.JSON200.Data {
		if e.Status != parked || e.LastError == nil {
			t.Fatalf("listed event %+v", e)
		}
		ids[e.Id] = true
	}
	if len(ids) != 2 || !ids[shortEvent] || !ids[euroEvent] {
		t.Fatalf("parked events listed: %v", ids)
	}
	if m := metrics(t, s); !strings.Contains(m, "tally_stripe_events_parked 2\n") ||
		!strings.Contains(m, `tally_stripe_events_total{status="parked",type="payment_intent.succeeded"} 2`) {
		t.Fatalf("metrics do not show the two parked events:\n%s", m)
	}
	if r, _ := s.service(t).ListStripeEventsWithResponse(ctx, &client.ListStripeEventsParams{}); r.StatusCode() != http.StatusForbidden {
		t.Fatalf("a service key listed Stripe events: %d", r.StatusCode())
	}

	// Replaying without a fix keeps it parked; after the operator corrects the
	// expected amount (the price at Stripe was the right one), it credits once.
	again, err := s.admin(t).ReplayStripeEventWithResponse(ctx, shortEvent)
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "replay unfixed", again.StatusCode(), again.Body, http.StatusOK)
	if again.JSON200.Status != parked {
		t.Fatalf("an unfixed replay is %s", again.JSON200.Status)
	}
	if err := gdb.Exec(`UPDATE payments SET unit_amount = 999, amount = 999 WHERE id = ?`, short).Error; err != nil {
		t.Fatal(err)
	}
	for range 2 {
		r, err := s.admin(t).ReplayStripeEventWithResponse(ctx, shortEvent)
		if err != nil {
			t.Fatal(err)
		}
		mustStatus(t, "replay fixed", r.StatusCode(), r.Body, http.StatusOK)
		if r.JSON200.Status != client.StripeEventStatusProcessed || r.JSON200.ProcessedAt == nil {
			t.Fatalf("replayed event = %+v", r.JSON200)
		}
	}
	if p := getPayment(t, s, short); p.Status != client.PaymentStatusSucceeded {
		t.Fatalf("replayed payment is %s", p.Status)
	}
	if got := balanceOf(t, gdb, "mismatch-1"); got != starterCredits {
		t.Fatalf("balance after two replays = %d, want %d", got, starterCredits)
	}
	if r, _ := s.admin(t).ReplayStripeEventWithResponse(ctx, "evt_never_stored"); r.StatusCode() != http.StatusNotFound {
		t.Fatalf("replay of an unknown event: %d", r.StatusCode())
	}
	assertInvariants(t, s)
}

// TestWebhookRefusesBadDeliveries: every delivery that is not a correctly
// signed, fresh, well-formed event under the size cap gets a 4xx
// problem+json and stores nothing; an unknown type is stored as ignored
// and acknowledged; an event of another API version is processed.
func TestWebhookRefusesBadDeliveries(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	env := payEnv(t, fake.URL())
	env["TALLY_WEBHOOK_MAX_BODY_BYTES"] = "8192"
	env["TALLY_STRIPE_WEBHOOK_SECRETS"] = "whsec_old_secret," + testWebhookSecret
	s := startServer(t, env)
	gdb := openDB(t, s)

	pay := checkout(t, s, "hook-1", "starter", 1)
	paidAtStripe(t, fake, s, pay)
	good := stripeEvent(newEventID(), "payment_intent.succeeded", paymentIntent(pay, "hook-1", "succeeded", starterAmount, starterAmount, "usd"))
	big := stripeEvent(newEventID(), "payment_intent.succeeded", map[string]any{"id": "pi_big", "padding": strings.Repeat("x", 9000)})

	for _, c := range []struct {
		name   string
		body   []byte
		header string
		want   int
	}{
		{"wrong secret", good, sign(good, "whsec_someone_else", time.Now()), http.StatusBadRequest},
		{"tampered body", bytes.Replace(good, []byte(`"amount_received":1000`), []byte(`"amount_received":1001`), 1), sign(good, testWebhookSecret, time.Now()), http.StatusBadRequest},
		{"stale timestamp", good, sign(good, testWebhookSecret, time.Now().Add(-301*time.Second)), http.StatusBadRequest},
		{"future timestamp", good, sign(good, testWebhookSecret, time.Now().Add(6*time.Minute)), http.StatusBadRequest},
		{"missing header", good, "", http.StatusBadRequest},
		{"garbage header", good, "t=abc,v1=zz", http.StatusBadRequest},
		{"oversized body", big, sign(big, testWebhookSecret, time.Now()), http.StatusRequestEntityTooLarge},
		{"malformed JSON", []byte(`{"id": "evt_1", "type":`), sign([]byte(`{"id": "evt_1", "type":`), testWebhookSecret, time.Now()), http.StatusBadRequest},
		{"no data.object", []byte(`{"id":"evt_2","object":"event","type":"payment_intent.succeeded"}`), sign([]byte(`{"id":"evt_2","object":"event","type":"payment_intent.succeeded"}`), testWebhookSecret, time.Now()), http.StatusBadRequest},
	} {
		status, body := postWebhook(t, s, c.body, c.header)
		if status != c.want {
			t.Fatalf("%s: status %d, want %d; body %s", c.name, status, c.want, body)
		}
		var problem map[string]any
		if err := json.Unmarshal(body, &problem); err != nil || problem["code"] == nil || problem["request_id"] == nil {
			t.Fatalf("%s: not a problem+json body: %s", c.name, body)
		}
	}
	if n := countRows(t, gdb, `SELECT count(*) FROM stripe_events`); n != 0 {
		t.Fatalf("refused deliveries stored %d events", n)
	}
	if got := balanceOf(t, gdb, "hook-1"); got != 0 {
		t.Fatalf("refused deliveries credited %d", got)
	}

	unknown := newEventID()
	deliver(t, s, stripeEvent(unknown, "radar.early_fraud_warning.created", map[string]any{"id": "issfr_1", "object": "radar.early_fraud_warning"}))
	if st, _ := eventStatus(t, gdb, unknown); st != "ignored" {
		t.Fatalf("unknown type stored as %s, want ignored", st)
	}

	// Signed with the second configured secret and in an API version other
	// than stripe-go's: verified and processed.
	old := newEventID()
	deliver(t, s, stripeEventVersion(old, "payment_intent.succeeded", "2020-08-27", paymentIntent(pay, "hook-1", "succeeded", starterAmount, starterAmount, "usd")))
	if st, le := eventStatus(t, gdb, old); st != "processed" {
		t.Fatalf("an event of API version 2020-08-27 is %s (%s)", st, le)
	}
	if got := balanceOf(t, gdb, "hook-1"); got != starterCredits {
		t.Fatalf("balance = %d, want %d", got, starterCredits)
	}

	// The admin list pages through every stored event, newest first.
	var paged []string
	var cursor *string
	one := 1
	for {
		r, err := s.admin(t).ListStripeEventsWithResponse(context.Background(), &client.ListStripeEventsParams{Limit: &one, Cursor: cursor})
		if err != nil {
			t.Fatal(err)
		}
		mustStatus(t, "list page", r.StatusCode(), r.Body, http.StatusOK)
		for _, e := range r.JSON200.Data {
			paged = append(paged, e.Id)
		}
		if r.JSON200.NextCursor == nil {
			break
		}
		cursor = r.JSON200.NextCursor
	}
	if strings.Join(paged, ",") != old+","+unknown {
		t.Fatalf("paged events = %v, want [%s %s]", paged, old, unknown)
	}

	// A redelivery is acknowledged as a duplicate and not processed again.
	body := stripeEventVersion(old, "payment_intent.succeeded", "2020-08-27", paymentIntent(pay, "hook-1", "succeeded", starterAmount, starterAmount, "usd"))
	status, ack := postWebhook(t, s, body, sign(body, testWebhookSecret, time.Now()))
	if status != http.StatusOK || !strings.Contains(string(ack), `"duplicate":true`) {
		t.Fatalf("redelivery: %d %s", status, ack)
	}
	if n := countRows(t, gdb, `SELECT attempts FROM stripe_events WHERE id = ?`, old); n != 1 {
		t.Fatalf("a redelivery was processed again (%d attempts)", n)
	}
	assertInvariants(t, s)
}

// TestRefundsRevokeProportionally: half the amount refunded revokes half
// the credits; a later full refund revokes only the increase, never below zero.
func TestRefundsRevokeProportionally(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	s := startServer(t, payEnv(t, fake.URL()))
	gdb := openDB(t, s)
	ctx := context.Background()

	pay := checkout(t, s, "refund-1", "starter", 1)
	paidAtStripe(t, fake, s, pay)
	deliver(t, s, stripeEvent(newEventID(), "payment_intent.succeeded", paymentIntent(pay, "refund-1", "succeeded", starterAmount, starterAmount, "usd")))
	half := stripeEvent(newEventID(), "charge.refunded", refundedCharge(pay, starterAmount, starterAmount/2))
	deliver(t, s, half)
	p := getPayment(t, s, pay)
	if p.Status != client.PaymentStatusRefunded || p.AmountRefunded != starterAmount/2 {
		t.Fatalf("after half a refund: %+v", p)
	}
	if got := balanceOf(t, gdb, "refund-1"); got != starterCredits/2 {
		t.Fatalf("balance after half a refund = %d, want %d", got, starterCredits/2)
	}
	// An older refund event arriving late (same cumulative amount) revokes nothing.
	deliver(t, s, stripeEvent(newEventID(), "charge.refunded", refundedCharge(pay, starterAmount, starterAmount/2)))
	if got := balanceOf(t, gdb, "refund-1"); got != starterCredits/2 {
		t.Fatalf("a repeated refund revoked again: balance %d", got)
	}

	svc := credits.New(credits.Options{DB: gdb, Config: config.Default().Credits})
	if _, _, err := svc.Consume(ctx, credits.ConsumeInput{CustomerID: "refund-1", Amount: 400, Reason: "usage"},
		db.IdempotencyKey{Scope: "customer:refund-1", Key: "spend-1", RequestHash: []byte("spend-1")}); err != nil {
		t.Fatalf("consume: %v", err)
	}
	deliver(t, s, stripeEvent(newEventID(), "charge.refunded", refundedCharge(pay, starterAmount, starterAmount)))
	p = getPayment(t, s, pay)
	if p.Status != client.PaymentStatusRefunded || p.AmountRefunded != starterAmount {
		t.Fatalf("after the full refund: %+v", p)
	}
	if got := balanceOf(t, gdb, "refund-1"); got != 0 {
		t.Fatalf("balance after the full refund = %d, want 0 (the 100 left, never below zero)", got)
	}
	if n := countRows(t, gdb, `SELECT coalesce(sum(credits_revoked), 0) FROM payment_refunds WHERE payment_id = ?`, pay); n != 600 {
		t.Fatalf("credits revoked in total = %d, want 600 (500 then the 100 left)", n)
	}
	if n := countRows(t, gdb, `SELECT count(*) FROM events WHERE type = 'payment.refunded'`); n != 2 {
		t.Fatalf("%d payment.refunded events, want 2", n)
	}
	assertInvariants(t, s)
}

// TestCheckoutCreation: against stripe-mock a checkout answers a URL;
// against the fake the session carries our metadata and idempotency key;
// bad requests are refused and write nothing.
func TestCheckoutCreation(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	t.Run("stripe-mock", func(t *testing.T) {
		s := startServer(t, payEnv(t, stripemock.Start(t)))
		user := s.client(t, userToken(t, "mock-buyer", time.Now().Add(time.Hour)))
		r, err := user.CreateCheckoutSessionWithResponse(ctx, &client.CreateCheckoutSessionParams{}, client.CheckoutSessionCreate{
			CustomerId: "mock-buyer", Item: "starter", SuccessUrl: "https://app.example.com/ok", CancelUrl: "https://app.example.com/no"})
		if err != nil {
			t.Fatal(err)
		}
		mustStatus(t, "checkout", r.StatusCode(), r.Body, http.StatusCreated)
		if !strings.HasPrefix(r.JSON201.Url, "http") || r.JSON201.CheckoutSessionId == "" || r.JSON201.ExpiresAt.IsZero() {
			t.Fatalf("checkout = %+v", r.JSON201)
		}
		p := getPayment(t, s, r.JSON201.PaymentId)
		if p.Status != client.PaymentStatusPending || p.Amount != starterAmount || p.Credits != starterCredits || p.CheckoutSessionId == nil {
			t.Fatalf("payment = %+v", p)
		}
	})

	t.Run("fake", func(t *testing.T) {
		fake := stripefake.New(t)
		s := startServer(t, payEnv(t, fake.URL()))
		gdb := openDB(t, s)
		key := "checkout-key-1"
		quantity := int64(3)
		body := client.CheckoutSessionCreate{CustomerId: "fake-buyer", Item: "starter", Quantity: &quantity,
			SuccessUrl: "https://app.example.com/ok", CancelUrl: "https://app.example.com/no"}
		first, err := s.service(t).CreateCheckoutSessionWithResponse(ctx, &client.CreateCheckoutSessionParams{IdempotencyKey: &key}, body)
		if err != nil {
			t.Fatal(err)
		}
		mustStatus(t, "checkout", first.StatusCode(), first.Body, http.StatusCreated)
		second, err := s.service(t).CreateCheckoutSessionWithResponse(ctx, &client.CreateCheckoutSessionParams{IdempotencyKey: &key}, body)
		if err != nil {
			t.Fatal(err)
		}
		mustStatus(t, "checkout replay", second.StatusCode(), second.Body, http.StatusCreated)
		if second.HTTPResponse.Header.Get("Idempotent-Replayed") != "true" || second.JSON201.PaymentId != first.JSON201.PaymentId {
			t.Fatalf("replay = %s (header %q)", second.Body, second.HTTPResponse.Header.Get("Idempotent-Replayed"))
		}
		pay := first.JSON201.PaymentId
		forms := fake.CheckoutSessions()
		if len(forms) != 1 {
			t.Fatalf("%d sessions created, want 1", len(forms))
		}
		f := forms[0]
		for k, want := range map[string]string{
			"metadata[tally_payment_id]":                       pay,
			"metadata[tally_customer_id]":                      "fake-buyer",
			"payment_intent_data[metadata][tally_payment_id]":  pay,
			"payment_intent_data[metadata][tally_customer_id]": "fake-buyer",
			"client_reference_id":                              pay,
			"mode":                                             "payment",
			"line_items[0][quantity]":                          "3",
			"line_items[0][price_data][unit_amount]":           "1000",
			"line_items[0][price_data][currency]":              "usd",
		} {
			if got := f.Get(k); got != want {
				t.Fatalf("session form %s = %q, want %q (form %v)", k, got, want, f)
			}
		}
		if exp := f.Get("expires_at"); exp == "" {
			t.Fatalf("session has no expires_at: %v", f)
		}
		var keys []string
		for _, r := range fake.Requests() {
			keys = append(keys, r.Path+"="+r.IdempotencyKey)
		}
		if !containsStr(keys, "/v1/checkout/sessions=tally-checkout-"+pay) || !containsStr(keys, "/v1/customers=tally-customer-fake-buyer") {
			t.Fatalf("idempotency keys sent: %v", keys)
		}
		if p := getPayment(t, s, pay); p.Amount != 3*starterAmount || p.Credits != 3*starterCredits || p.Quantity != 3 {
			t.Fatalf("payment = %+v", p)
		}

		before := countRows(t, gdb, `SELECT count(*) FROM payments`)
		customersBefore := countRows(t, gdb, `SELECT count(*) FROM customers`)
		sessionsBefore := len(fake.CheckoutSessions())
		for _, c := range []struct {
			name    string
			token   string
			body    client.CheckoutSessionCreate
			status  int
			pointer string
		}{
			{"foreign redirect", testServiceKey, client.CheckoutSessionCreate{CustomerId: "new-1", Item: "starter", SuccessUrl: "https://evil.example.net/ok", CancelUrl: "https://app.example.com/no"}, 422, "/success_url"},
			{"lookalike host", testServiceKey, client.CheckoutSessionCreate{CustomerId: "new-1", Item: "starter", SuccessUrl: "https://app.example.com/ok", CancelUrl: "https://app.example.com.evil.net/"}, 422, "/cancel_url"},
			{"unknown item", testServiceKey, client.CheckoutSessionCreate{CustomerId: "new-1", Item: "platinum", SuccessUrl: "https://app.example.com/ok", CancelUrl: "https://app.example.com/no"}, 422, "/item"},
			{"plan quantity", testServiceKey, client.CheckoutSessionCreate{CustomerId: "new-1", Item: "api", Quantity: &quantity, SuccessUrl: "https://app.example.com/ok", CancelUrl: "https://app.example.com/no"}, 422, "/quantity"},
			{"another user's customer", userToken(t, "mallory", time.Now().Add(time.Hour)), client.CheckoutSessionCreate{CustomerId: "new-1", Item: "starter", SuccessUrl: "https://app.example.com/ok", CancelUrl: "https://app.example.com/no"}, 403, ""},
		} {
			r, err := s.client(t, c.token).CreateCheckoutSessionWithResponse(ctx, &client.CreateCheckoutSessionParams{}, c.body)
			if err != nil {
				t.Fatal(err)
			}
			mustStatus(t, c.name, r.StatusCode(), r.Body, c.status)
			if c.pointer != "" && !strings.Contains(string(r.Body), `"pointer":"`+c.pointer+`"`) {
				t.Fatalf("%s: problem does not name %s: %s", c.name, c.pointer, r.Body)
			}
		}
		if countRows(t, gdb, `SELECT count(*) FROM payments`) != before || countRows(t, gdb, `SELECT count(*) FROM customers`) != customersBefore || len(fake.CheckoutSessions()) != sessionsBefore {
			t.Fatalf("a refused checkout wrote something")
		}

		// Another user's payment is not readable with an end-user token.
		if r, _ := s.client(t, userToken(t, "mallory", time.Now().Add(time.Hour))).GetPaymentWithResponse(ctx, pay); r.StatusCode() != http.StatusForbidden {
			t.Fatalf("another user's payment: %d", r.StatusCode())
		}
		own, err := s.client(t, userToken(t, "fake-buyer", time.Now().Add(time.Hour))).ListCustomerPaymentsWithResponse(ctx, "fake-buyer", &client.ListCustomerPaymentsParams{})
		if err != nil {
			t.Fatal(err)
		}
		mustStatus(t, "own payments", own.StatusCode(), own.Body, http.StatusOK)
		if len(own.JSON200.Data) != 1 || own.JSON200.Data[0].Id != pay {
			t.Fatalf("own payments = %s", own.Body)
		}

		// A duplicate arriving while the first still waits on Stripe is told
		// so (409), not given a second session; afterwards it replays.
		slowKey := "checkout-key-slow"
		release := fake.HangUntilReleased()
		firstDone := make(chan *client.CreateCheckoutSessionResponse, 1)
		paymentsBefore := countRows(t, gdb, `SELECT count(*) FROM payments`)
		go func() {
			r, _ := s.service(t).CreateCheckoutSessionWithResponse(ctx, &client.CreateCheckoutSessionParams{IdempotencyKey: &slowKey}, body)
			firstDone <- r
		}()
		waitFor(t, "the first checkout to reach Stripe", func() bool { return countRows(t, gdb, `SELECT count(*) FROM payments`) > paymentsBefore })
		dup, err := s.service(t).CreateCheckoutSessionWithResponse(ctx, &client.CreateCheckoutSessionParams{IdempotencyKey: &slowKey}, body)
		if err != nil {
			t.Fatal(err)
		}
		mustStatus(t, "duplicate in flight", dup.StatusCode(), dup.Body, http.StatusConflict)
		if !strings.Contains(string(dup.Body), "idempotency_key_in_flight") {
			t.Fatalf("in-flight duplicate: %s", dup.Body)
		}
		release()
		slow := <-firstDone
		if slow == nil {
			t.Fatal("the first checkout failed")
		}
		mustStatus(t, "slow checkout", slow.StatusCode(), slow.Body, http.StatusCreated)
		after, err := s.service(t).CreateCheckoutSessionWithResponse(ctx, &client.CreateCheckoutSessionParams{IdempotencyKey: &slowKey}, body)
		if err != nil {
			t.Fatal(err)
		}
		mustStatus(t, "replay after the slow checkout", after.StatusCode(), after.Body, http.StatusCreated)
		if after.JSON201.PaymentId != slow.JSON201.PaymentId {
			t.Fatalf("replay answered payment %s, first was %s", after.JSON201.PaymentId, slow.JSON201.PaymentId)
		}

		// The customer's payments page newest first, each exactly once.
		var listed []string
		var next *string
		two := 2
		for {
			r, err := s.service(t).ListCustomerPaymentsWithResponse(ctx, "fake-buyer", &client.ListCustomerPaymentsParams{Limit: &two, Cursor: next})
			if err != nil {
				t.Fatal(err)
			}
			mustStatus(t, "payments page", r.StatusCode(), r.Body, http.StatusOK)
			for _, p := range r.JSON200.Data {
				listed = append(listed, p.Id)
			}
			if next = r.JSON200.NextCursor; next == nil {
				break
			}
		}
		if len(listed) != 2 || listed[0] != slow.JSON201.PaymentId || listed[1] != pay {
			t.Fatalf("payments listed = %v, want [%s %s]", listed, slow.JSON201.PaymentId, pay)
		}
		if r, _ := s.service(t).ListCustomerPaymentsWithResponse(ctx, "nobody-here", &client.ListCustomerPaymentsParams{}); r.StatusCode() != http.StatusNotFound {
			t.Fatalf("payments of an unknown customer: %d", r.StatusCode())
		}

		// Stripe failing: the payment stays on record as failed, the caller gets 502 / 429.
		for _, c := range []struct {
			status int
			typ    string
		}{{http.StatusInternalServerError, "api_error"}, {http.StatusTooManyRequests, "invalid_request_error"}} {
			fake.SetFault(func(r *http.Request) (int, string, bool) {
				return c.status, `{"error":{"type":"` + c.typ + `","message":"injected"}}`, r.URL.Path == "/v1/checkout/sessions"
			})
			r, err := s.service(t).CreateCheckoutSessionWithResponse(ctx, &client.CreateCheckoutSessionParams{}, body)
			if err != nil {
				t.Fatal(err)
			}
			want := map[int]int{500: http.StatusBadGateway, 429: http.StatusTooManyRequests}[c.status]
			mustStatus(t, fmt.Sprintf("Stripe answering %d", c.status), r.StatusCode(), r.Body, want)
		}
		fake.SetFault(nil)
		if n := countRows(t, gdb, `SELECT count(*) FROM payments WHERE status = 'failed' AND failure_reason LIKE 'checkout session creation failed%'`); n != 2 {
			t.Fatalf("%d payments recorded as failed by Stripe, want 2", n)
		}
	})
}

// TestWebhookDatabaseDownAnswers503: while PostgreSQL refuses connections a
// delivery is answered 503 (Stripe retries it); once it is back, the same
// delivery is stored and processed.
func TestWebhookDatabaseDownAnswers503(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	s := startServer(t, payEnv(t, fake.URL()))
	gdb := openDB(t, s)
	pay := checkout(t, s, "outage-1", "starter", 1)
	paidAtStripe(t, fake, s, pay)

	u, err := url.Parse(s.DBURL)
	if err != nil {
		t.Fatal(err)
	}
	name := strings.TrimPrefix(u.Path, "/")
	u.Path = "/postgres"
	admin, err := db.Open(context.Background(), u.String(), 1, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close(admin)
	setAllowed := func(allowed bool) {
		t.Helper()
		if err := admin.Exec(fmt.Sprintf(`ALTER DATABASE %s ALLOW_CONNECTIONS %t`, name, allowed)).Error; err != nil {
			t.Fatal(err)
		}
		if !allowed {
			if err := admin.Exec(`SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = ?`, name).Error; err != nil {
				t.Fatal(err)
			}
			// Termination is signalled, not awaited: wait until the backends are gone.
			waitFor(t, "the server's connections to close", func() bool {
				return countRows(t, admin, `SELECT count(*) FROM pg_stat_activity WHERE datname = ?`, name) == 0
			})
		}
	}
	setAllowed(false)
	t.Cleanup(func() { _ = admin.Exec(fmt.Sprintf(`ALTER DATABASE %s ALLOW_CONNECTIONS true`, name)).Error })

	body := stripeEvent(newEventID(), "payment_intent.succeeded", paymentIntent(pay, "outage-1", "succeeded", starterAmount, starterAmount, "usd"))
	status, out := postWebhook(t, s, body, sign(body, testWebhookSecret, time.Now()))
	if status != http.StatusServiceUnavailable || !strings.Contains(string(out), `"code":"unavailable"`) {
		t.Fatalf("delivery during the outage: %d %s, want 503 unavailable", status, out)
	}

	setAllowed(true)
	waitFor(t, "the delivery accepted after the outage", func() bool {
		st, _ := postWebhook(t, s, body, sign(body, testWebhookSecret, time.Now()))
		return st == http.StatusOK
	})
	// The 200 acknowledges the stored event; its first processing attempt
	// may still meet a pooled connection the outage killed, and then the
	// retry worker processes it.
	waitFor(t, "the stored delivery credited", func() bool { return balanceOf(t, gdb, "outage-1") == starterCredits })
	assertInvariants(t, s)
}

// TestLegacyConfirmOnCheckoutSession: with TALLY_CONFIRM_ON=checkout_session
// a paid completion credits, an asynchronous payment credits when it clears,
// and the PaymentIntent's own success (as after switching back) adds nothing,
// because both strategies meet in the PaymentIntent-keyed guard.
func TestLegacyConfirmOnCheckoutSession(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	env := payEnv(t, fake.URL())
	env["TALLY_CONFIRM_ON"] = "checkout_session"
	s := startServer(t, env)
	gdb := openDB(t, s)

	pay := checkout(t, s, "legacy-1", "starter", 1)
	p := getPayment(t, s, pay)
	deliver(t, s, stripeEvent(newEventID(), "payment_intent.succeeded", paymentIntent(pay, "legacy-1", "succeeded", starterAmount, starterAmount, "usd")))
	if got := balanceOf(t, gdb, "legacy-1"); got != 0 {
		t.Fatalf("payment_intent.succeeded credited %d under confirm_on=checkout_session", got)
	}
	deliver(t, s, stripeEvent(newEventID(), "checkout.session.completed", checkoutSession(pay, "legacy-1", *p.CheckoutSessionId, "complete", "paid", starterAmount)))
	if got := balanceOf(t, gdb, "legacy-1"); got != starterCredits {
		t.Fatalf("a paid completion credited %d, want %d", got, starterCredits)
	}

	async := checkout(t, s, "legacy-2", "starter", 1)
	a := getPayment(t, s, async)
	deliver(t, s, stripeEvent(newEventID(), "checkout.session.completed", checkoutSession(async, "legacy-2", *a.CheckoutSessionId, "complete", "unpaid", starterAmount)))
	if got := balanceOf(t, gdb, "legacy-2"); got != 0 {
		t.Fatalf("an unpaid completion credited %d", got)
	}
	cleared := checkoutSession(async, "legacy-2", *a.CheckoutSessionId, "complete", "paid", starterAmount)
	deliver(t, s, stripeEvent(newEventID(), "checkout.session.async_payment_succeeded", cleared))
	deliver(t, s, stripeEvent(newEventID(), "checkout.session.async_payment_succeeded", cleared))
	if got := balanceOf(t, gdb, "legacy-2"); got != starterCredits {
		t.Fatalf("the cleared payment credited %d, want %d", got, starterCredits)
	}
	s.shutdown(t)

	// Switch back to the default strategy on the same database: the
	// PaymentIntents' successes find their confirmations and credit nothing more.
	env["TALLY_CONFIRM_ON"] = "payment_intent"
	s = startServer(t, env)
	for _, c := range []struct{ pay, customer string }{{pay, "legacy-1"}, {async, "legacy-2"}} {
		deliver(t, s, stripeEvent(newEventID(), "payment_intent.succeeded", paymentIntent(c.pay, c.customer, "succeeded", starterAmount, starterAmount, "usd")))
		if got := balanceOf(t, gdb, c.customer); got != starterCredits {
			t.Fatalf("%s after the switch: balance %d, want %d", c.customer, got, starterCredits)
		}
	}
	assertInvariants(t, s)
}

// TestPaymentFailedReplayIsIdempotent: an operator replaying a
// payment_intent.payment_failed (twice) changes nothing more: the host app
// hears payment.failed once and the history holds the event once.
func TestPaymentFailedReplayIsIdempotent(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	s := startServer(t, payEnv(t, fake.URL()))
	gdb := openDB(t, s)
	ctx := context.Background()

	pay := checkout(t, s, "replay-fail-1", "starter", 1)
	failed := newEventID()
	deliver(t, s, stripeEvent(failed, "payment_intent.payment_failed", paymentIntent(pay, "replay-fail-1", "requires_payment_method", starterAmount, 0, "usd")))
	for range 2 {
		r, err := s.admin(t).ReplayStripeEventWithResponse(ctx, failed)
		if err != nil {
			t.Fatal(err)
		}
		mustStatus(t, "replay", r.StatusCode(), r.Body, http.StatusOK)
		if r.JSON200.Status != client.StripeEventStatusProcessed {
			t.Fatalf("replayed failure = %+v", r.JSON200)
		}
	}
	if n := countRows(t, gdb, `SELECT count(*) FROM events WHERE type = 'payment.failed' AND data->>'payment_id' = ?`, pay); n != 1 {
		t.Fatalf("%d payment.failed events after two replays, want 1", n)
	}
	p := getPayment(t, s, pay)
	recorded := 0
	for _, tr := range p.Transitions {
		if tr.StripeEventId != nil && *tr.StripeEventId == failed {
			recorded++
		}
	}
	if p.Status != client.PaymentStatusFailed || recorded != 1 {
		t.Fatalf("payment %s with the failure recorded %d times, want failed and once: %+v", p.Status, recorded, p.Transitions)
	}
	assertInvariants(t, s)
}

// TestWebhookStoresEventsWithNULEscapes: a string field of a Stripe event
// may hold the JSON escape \u0000 (say, a description pasted from
// elsewhere). The event is stored as the exact signed bytes, acknowledged
// with 200 and processed (or ignored), and an operator can replay it;
// otherwise the delivery fails forever and Stripe disables the endpoint.
func TestWebhookStoresEventsWithNULEscapes(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	s := startServer(t, payEnv(t, fake.URL()))
	gdb := openDB(t, s)
	ctx := context.Background()

	pay := checkout(t, s, "nul-1", "starter", 1)
	paidAtStripe(t, fake, s, pay)
	pi := paymentIntent(pay, "nul-1", "succeeded", starterAmount, starterAmount, "usd")
	pi["description"] = "gift\x00card"
	paid := newEventID()
	body := stripeEvent(paid, "payment_intent.succeeded", pi)
	odd := newEventID()
	oddBody := stripeEvent(odd, "radar.early_fraud_warning.created", map[string]any{"id": "issfr_nul", "object": "radar.early_fraud_warning", "fraud_type": "x\x00y"})
	for _, b := range [][]byte{body, oddBody} {
		if !bytes.Contains(b, []byte(`\u0000`)) {
			t.Fatalf("test event holds no \\u0000 escape: %s", b)
		}
		deliver(t, s, b)
	}
	if st, le := eventStatus(t, gdb, paid); st != "processed" {
		t.Fatalf("event with \\u0000 is %s (%s), want processed", st, le)
	}
	if st, le := eventStatus(t, gdb, odd); st != "ignored" {
		t.Fatalf("unknown event with \\u0000 is %s (%s), want ignored", st, le)
	}
	if got := balanceOf(t, gdb, "nul-1"); got != starterCredits {
		t.Fatalf("balance = %d, want %d", got, starterCredits)
	}
	var stored string
	if err := gdb.Raw(`SELECT payload FROM stripe_events WHERE id = ?`, paid).Scan(&stored).Error; err != nil || stored != string(body) {
		t.Fatalf("stored payload differs from the signed body (%v):\n%s\n%s", err, stored, body)
	}
	r, err := s.admin(t).ReplayStripeEventWithResponse(ctx, paid)
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "replay", r.StatusCode(), r.Body, http.StatusOK)
	if r.JSON200.Status != client.StripeEventStatusProcessed {
		t.Fatalf("replayed event = %+v", r.JSON200)
	}
	if got := balanceOf(t, gdb, "nul-1"); got != starterCredits {
		t.Fatalf("balance after the replay = %d, want %d", got, starterCredits)
	}
	assertInvariants(t, s)
}
