package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tallybilling/tally/internal/stripeapi/stripefake"
	"github.com/tallybilling/tally/pkg/client"
)

// Automatic top-up against the real binary and the fake Stripe (the
// sandbox in memory): the events Stripe emits are delivered, signed, by the
// test, so it decides when, how often and in which order.

// stripeEvents delivers, in order, the events the fake emitted since the
// last call, and returns them.
type stripeEvents struct {
	fake *stripefake.Fake
	sent int
}

type sentEvent struct {
	ID, Type string
	Payload  []byte
	Object   map[string]any
}

func (e *stripeEvents) deliverNew(t testing.TB, s *server) []sentEvent {
	t.Helper()
	all := e.fake.Sandbox().Events()
	var out []sentEvent
	for _, ev := range all[e.sent:] {
		deliver(t, s, ev.Payload)
		var env struct {
			Data struct {
				Object map[string]any `json:"object"`
			} `json:"data"`
		}
		if err := json.Unmarshal(ev.Payload, &env); err != nil {
			t.Fatal(err)
		}
		out = append(out, sentEvent{ID: ev.ID, Type: ev.Type, Payload: ev.Payload, Object: env.Data.Object})
	}
	e.sent = len(all)
	return out
}

// saveCard saves card for customer through a setup Checkout paid on the
// fake's page, delivers Stripe's events and waits for the customer to show it.
func saveCard(t testing.TB, s *server, evs *stripeEvents, customer, card string) client.SavedPaymentMethod {
	t.Helper()
	r, err := s.service(t).CreatePaymentMethodSetupWithResponse(context.Background(), customer, client.PaymentMethodSetupCreate{
		SuccessUrl: "https://app.example.com/card-saved", CancelUrl: "https://app.example.com/cancel",
	})
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "payment method setup", r.StatusCode(), r.Body, http.StatusCreated)
	if res, err := evs.fake.Sandbox().Pay(context.Background(), r.JSON201.CheckoutSessionId, card, customer+"@example.com"); err != nil || res.Outcome != "succeeds" {
		t.Fatalf("saving card %s: %+v, %v", card, res, err)
	}
	evs.deliverNew(t, s)
	// A server that catches up with Stripe may have listed these events
	// first: a delivery then finds them stored and is acknowledged as a
	// duplicate while the catch-up still applies them, so the card shows
	// once that is done.
	var c client.Customer
	waitFor(t, "customer "+customer+" to show a payment method after the setup", func() bool {
		c = customerOverHTTP(t, s, customer)
		return c.PaymentMethod != nil
	})
	return *c.PaymentMethod
}

// cardServer starts a server paying through a fake Stripe, and the feed of
// the events that fake sends.
func cardServer(t testing.TB) (*stripefake.Fake, *server, *stripeEvents) {
	t.Helper()
	fake := stripefake.New(t)
	return fake, startServer(t, payEnv(t, fake.URL())), &stripeEvents{fake: fake}
}

// withAutoTopUp saves card for customer, grants it credits, and turns
// automatic top-up on with settings.
func withAutoTopUp(t testing.TB, s *server, evs *stripeEvents, customer, card string, credits int64, settings client.AutoTopUpSettings) {
	t.Helper()
	saveCard(t, s, evs, customer, card)
	grantOverHTTP(t, s.service(t), customer, credits, "grant-"+customer)
	putAutoTopUp(t, s, customer, settings)
}

func customerOverHTTP(t testing.TB, s *server, id string) client.Customer {
	t.Helper()
	r, err := s.service(t).GetCustomerWithResponse(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "get customer", r.StatusCode(), r.Body, http.StatusOK)
	return *r.JSON200
}

func putAutoTopUp(t testing.TB, s *server, customer string, settings client.AutoTopUpSettings) client.AutoTopUp {
	t.Helper()
	r, err := s.service(t).PutAutoTopUpWithResponse(context.Background(), customer, settings)
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "put auto top-up", r.StatusCode(), r.Body, http.StatusOK)
	return *r.JSON200
}

func getAutoTopUp(t testing.TB, s *server, customer string) client.AutoTopUp {
	t.Helper()
	r, err := s.service(t).GetAutoTopUpWithResponse(context.Background(), customer)
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "get auto top-up", r.StatusCode(), r.Body, http.StatusOK)
	return *r.JSON200
}

// spend consumes amount and returns the HTTP status.
func spend(t testing.TB, s *server, customer string, amount int64, key string) int {
	t.Helper()
	r, err := s.service(t).ConsumeCreditsWithResponse(context.Background(), customer, &client.ConsumeCreditsParams{IdempotencyKey: key},
		client.ConsumeRequest{Amount: amount, Reason: "work"})
	if err != nil {
		t.Fatal(err)
	}
	return r.StatusCode()
}

// autoTopUps are the customer's automatic top-up payments, oldest first.
func autoTopUps(t testing.TB, s *server, customer string) []client.Payment {
	t.Helper()
	var out []client.Payment
	gdb := openDB(t, s)
	var ids []string
	if err := gdb.Raw(`SELECT id FROM payments WHERE customer_id = ? AND method = 'auto_top_up' ORDER BY created_at, id`, customer).Scan(&ids).Error; err != nil {
		t.Fatal(err)
	}
	for _, id := range ids {
		out = append(out, getPayment(t, s, id))
	}
	return out
}

// waitCharged waits until the worker recorded the PaymentIntent of top-up
// pay (or failed it).
func waitCharged(t testing.TB, s *server, pay string) client.Payment {
	t.Helper()
	var p client.Payment
	waitFor(t, "the worker to charge "+pay, func() bool {
		p = getPayment(t, s, pay)
		return p.PaymentIntentId != nil || p.Status != client.PaymentStatusPending
	})
	return p
}

const topUpCard = "4242424242424242"

// A storm of consumes crossing the threshold together starts one top-up,
// charged once and credited once, even with payment_intent.succeeded
// delivered twice, concurrently.
func TestAutoTopUpStormStartsOneTopUpCreditedOnce(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	env := payEnv(t, fake.URL())
	s := startServer(t, env)
	evs := &stripeEvents{fake: fake}

	card := saveCard(t, s, evs, "storm", topUpCard)
	if card.Brand != "visa" || card.Last4 != "4242" || card.ExpMonth < 1 || card.ExpYear < 2026 {
		t.Fatalf("saved card %+v", card)
	}
	raw := getCustomerRaw(t, s, "storm")
	if strings.Contains(raw, "pm_") || strings.Contains(raw, "stripe_payment_method") {
		t.Fatalf("the customer shows more of the card than brand, last4 and expiry: %s", raw)
	}
	grantOverHTTP(t, s.service(t), "storm", 1000, "grant-storm")
	limit := 5
	a := putAutoTopUp(t, s, "storm", client.AutoTopUpSettings{Enabled: true, Threshold: 500, Item: "starter", MonthlyLimit: &limit})
	if a.Status != client.AutoTopUpStatusActive {
		t.Fatalf("settings %+v", a)
	}

	var wg sync.WaitGroup
	for i := range 40 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if st := spend(t, s, "storm", 20, fmt.Sprintf("storm-%d", i)); st != http.StatusOK {
				t.Errorf("consume %d: %d", i, st)
			}
		}()
	}
	wg.Wait()
	tops := autoTopUps(t, s, "storm")
	if len(tops) != 1 {
		t.Fatalf("%d automatic top-ups after the storm, want 1", len(tops))
	}
	p := waitCharged(t, s, tops[0].Id)
	if p.PaymentIntentId == nil || p.Method != client.PaymentMethodAutoTopUp || p.Item != "starter" {
		t.Fatalf("top-up %+v", p)
	}
	if got := getAutoTopUp(t, s, "storm"); got.InFlightPaymentId == nil || *got.InFlightPaymentId != p.Id || got.MonthCount != 1 {
		t.Fatalf("settings while in flight %+v", got)
	}
	// More consumes while it is in flight start nothing.
	if st := spend(t, s, "storm", 10, "storm-more"); st != http.StatusOK {
		t.Fatalf("consume while in flight: %d", st)
	}
	// The process dies between the charge and Stripe's webhook.
	s.shutdown(t)
	s = startServer(t, env)

	var succeeded []byte
	for _, ev := range evs.fake.Sandbox().Events() {
		if ev.Type == "payment_intent.succeeded" {
			succeeded = ev.Payload
		}
	}
	if succeeded == nil {
		t.Fatal("Stripe sent no payment_intent.succeeded")
	}
	var wg2 sync.WaitGroup
	for range 2 {
		wg2.Add(1)
		go func() { defer wg2.Done(); deliver(t, s, succeeded) }()
	}
	wg2.Wait()
	evs.deliverNew(t, s) // and everything else Stripe sent, the success a third time
	deliver(t, s, succeeded)

	waitPayment(t, s, p.Id, client.PaymentStatusSucceeded)
	gdb := openDB(t, s)
	if got := balanceOf(t, gdb, "storm"); got != 1000-800-10+starterCredits {
		t.Fatalf("balance %d, want %d", got, 1000-800-10+starterCredits)
	}
	if n := countRows(t, gdb, `SELECT count(*) FROM credit_grants WHERE payment_id = ?`, p.Id); n != 1 {
		t.Fatalf("%d grants for the top-up", n)
	}
	if n := len(fake.Sandbox().Objects("payment_intent")); n != 1 {
		t.Fatalf("Stripe holds %d PaymentIntents, want the one top-up", n)
	}
	if got := getAutoTopUp(t, s, "storm"); got.InFlightPaymentId != nil || got.ConsecutiveFailures != 0 || got.Status != client.AutoTopUpStatusActive {
		t.Fatalf("settings after the success %+v", got)
	}
	if n := len(autoTopUps(t, s, "storm")); n != 1 {
		t.Fatalf("%d top-ups", n)
	}
	assertInvariants(t, s)
}

func getCustomerRaw(t testing.TB, s *server, id string) string {
	t.Helper()
	r, err := s.service(t).GetCustomerWithResponse(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	return string(r.Body)
}

// The worker dies after Stripe charged the card and before it recorded the
// PaymentIntent: the success Stripe sends meanwhile cannot be confirmed yet
// and is retried; the restarted worker asks Stripe again with the same
// idempotency key, gets the same PaymentIntent and records it; the card is
// charged once and credited once.
func TestAutoTopUpCrashBetweenChargeAndRecordChargesOnce(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	env := payEnv(t, fake.URL())
	s := startServer(t, env)
	evs := &stripeEvents{fake: fake}
	withAutoTopUp(t, s, evs, "crash", topUpCard, 600, client.AutoTopUpSettings{Enabled: true, Threshold: 500, Item: "starter"})

	// Stripe acts on every charge request, but its answers are lost.
	fake.DropAnswers(func(r *http.Request) bool { return r.URL.Path == "/v1/payment_intents" })
	if st := spend(t, s, "crash", 200, "crash-1"); st != http.StatusOK {
		t.Fatalf("consume: %d", st)
	}
	tops := autoTopUps(t, s, "crash")
	if len(tops) != 1 {
		t.Fatalf("%d top-ups", len(tops))
	}
	waitFor(t, "Stripe to charge the card", func() bool { return len(fake.Sandbox().Objects("payment_intent")) == 1 })
	// The success arrives while the payment does not know its PaymentIntent.
	var succeeded sentEvent
	for _, ev := range evs.deliverNew(t, s) {
		if ev.Type == "payment_intent.succeeded" {
			succeeded = ev
		}
	}
	if succeeded.ID == "" {
		t.Fatal("no payment_intent.succeeded")
	}
	gdb := openDB(t, s)
	if got := balanceOf(t, gdb, "crash"); got != 400 {
		t.Fatalf("credited before the PaymentIntent was recorded: %d", got)
	}
	s.shutdown(t) // the worker dies with the answer lost

	fake.DropAnswers(func(*http.Request) bool { return false })
	s = startServer(t, env)
	waitFor(t, "the worker to record the PaymentIntent", func() bool { return getPayment(t, s, tops[0].Id).PaymentIntentId != nil })
	if status, lastErr := eventStatus(t, openDB(t, s), succeeded.ID); status == "parked" {
		t.Fatalf("the success event was parked: %s", lastErr)
	}
	var row struct {
		Status        string
		Attempts      int
		LastError     *string
		NextAttemptAt *time.Time
	}
	openDB(t, s).Raw(`SELECT status, attempts, last_error, next_attempt_at FROM stripe_events WHERE id = ?`, succeeded.ID).Scan(&row)
	t.Logf("event %+v %s now %s", row, deref(row.LastError), time.Now())
	waitPayment(t, s, tops[0].Id, client.PaymentStatusSucceeded)
	waitFor(t, "the credits", func() bool { return balanceOf(t, openDB(t, s), "crash") == 400+starterCredits })
	if n := len(fake.Sandbox().Objects("payment_intent")); n != 1 {
		t.Fatalf("Stripe holds %d PaymentIntents: charged more than once", n)
	}
	if n := len(fake.Sandbox().Objects("charge")); n != 1 {
		t.Fatalf("Stripe holds %d charges", n)
	}
	if status, _ := eventStatus(t, openDB(t, s), succeeded.ID); status != "processed" {
		t.Fatalf("the success event is %s", status)
	}
	assertInvariants(t, s)
}

// A card that keeps being declined fails three top-ups in a row
// (credits.auto_top_up_failed each), then automatic top-up disables itself
// (credits.auto_top_up_disabled) and starts no more. Stripe's own
// payment_intent.payment_failed, delivered too, counts no second failure.
// A card that asks for authentication off-session fails the same way.
func TestAutoTopUpDeclinedThreeTimesDisablesItself(t *testing.T) {
	t.Parallel()
	_, s, evs := cardServer(t)
	withAutoTopUp(t, s, evs, "decliner", "4000000000000341", 1000, client.AutoTopUpSettings{Enabled: true, Threshold: 500, Item: "starter"})

	if st := spend(t, s, "decliner", 600, "decl-0"); st != http.StatusOK {
		t.Fatalf("consume: %d", st)
	}
	for i := 1; i <= 3; i++ {
		tops := autoTopUps(t, s, "decliner")
		if len(tops) != i {
			t.Fatalf("after %d crossings: %d top-ups", i, len(tops))
		}
		p := waitPayment(t, s, tops[i-1].Id, client.PaymentStatusFailed)
		if p.FailureReason == nil || !strings.Contains(*p.FailureReason, "card_declined") {
			t.Fatalf("failure reason %v", p.FailureReason)
		}
		evs.deliverNew(t, s) // Stripe's payment_intent.payment_failed
		got := getAutoTopUp(t, s, "decliner")
		if got.ConsecutiveFailures != i {
			t.Fatalf("after failure %d: %+v", i, got)
		}
		if i < 3 {
			if got.Status != client.AutoTopUpStatusActive || got.InFlightPaymentId != nil {
				t.Fatalf("after failure %d: %+v", i, got)
			}
			if st := spend(t, s, "decliner", 10, fmt.Sprintf("decl-%d", i)); st != http.StatusOK {
				t.Fatalf("consume: %d", st)
			}
		}
	}
	got := getAutoTopUp(t, s, "decliner")
	if got.Status != client.AutoTopUpStatusDisabled || got.DisabledReason == nil || !strings.Contains(*got.DisabledReason, "3 automatic top-ups failed") {
		t.Fatalf("after three failures: %+v", got)
	}
	if st := spend(t, s, "decliner", 10, "decl-after"); st != http.StatusOK {
		t.Fatalf("consume: %d", st)
	}
	time.Sleep(300 * time.Millisecond)
	if n := len(autoTopUps(t, s, "decliner")); n != 3 {
		t.Fatalf("%d top-ups once disabled, want 3", n)
	}
	gdb := openDB(t, s)
	if n := countRows(t, gdb, `SELECT count(*) FROM events WHERE type = 'credits.auto_top_up_failed' AND customer_id = 'decliner'`); n != 3 {
		t.Fatalf("%d credits.auto_top_up_failed, want 3", n)
	}
	if n := countRows(t, gdb, `SELECT count(*) FROM events WHERE type = 'credits.auto_top_up_disabled' AND customer_id = 'decliner'`); n != 1 {
		t.Fatalf("%d credits.auto_top_up_disabled, want 1", n)
	}
	if n := countRows(t, gdb, `SELECT count(*) FROM events WHERE type = 'payment.failed' AND customer_id = 'decliner'`); n != 3 {
		t.Fatalf("%d payment.failed, want 3", n)
	}

	// Enabling again clears the failures.
	if a := putAutoTopUp(t, s, "decliner", client.AutoTopUpSettings{Enabled: true, Threshold: 500, Item: "starter"}); a.Status != client.AutoTopUpStatusActive || a.ConsecutiveFailures != 0 {
		t.Fatalf("re-enabled: %+v", a)
	}

	// Authentication required off-session.
	withAutoTopUp(t, s, evs, "authn", "4000002760003184", 600, client.AutoTopUpSettings{Enabled: true, Threshold: 500, Item: "starter"})
	spend(t, s, "authn", 200, "authn-1")
	tops := autoTopUps(t, s, "authn")
	if len(tops) != 1 {
		t.Fatalf("%d top-ups", len(tops))
	}
	p := waitPayment(t, s, tops[0].Id, client.PaymentStatusFailed)
	if p.FailureReason == nil || !strings.Contains(*p.FailureReason, "authentication_required") {
		t.Fatalf("failure reason %v", p.FailureReason)
	}
	if got := balanceOf(t, gdb, "authn"); got != 400 {
		t.Fatalf("balance %d", got)
	}
	assertInvariants(t, s)
}

// The monthly limit holds: with a limit of 2, the third crossing of the
// month starts nothing, and the settings say so.
func TestAutoTopUpMonthlyLimit(t *testing.T) {
	t.Parallel()
	_, s, evs := cardServer(t)
	saveCard(t, s, evs, "limited", topUpCard)
	grantOverHTTP(t, s.service(t), "limited", 600, "grant-limited")
	limit := 2
	putAutoTopUp(t, s, "limited", client.AutoTopUpSettings{Enabled: true, Threshold: 500, Item: "starter", MonthlyLimit: &limit})

	balance := int64(600)
	for i := range 3 {
		// Down to 400: below the threshold.
		amount := balance - 400
		if st := spend(t, s, "limited", amount, fmt.Sprintf("lim-%d", i)); st != http.StatusOK {
			t.Fatalf("consume %d: %d", i, st)
		}
		balance = 400
		tops := autoTopUps(t, s, "limited")
		if i == 2 {
			time.Sleep(300 * time.Millisecond)
			if len(tops) != 2 {
				t.Fatalf("the third crossing started a top-up over the limit: %d", len(tops))
			}
			break
		}
		if len(tops) != i+1 {
			t.Fatalf("crossing %d: %d top-ups", i, len(tops))
		}
		waitCharged(t, s, tops[i].Id)
		evs.deliverNew(t, s)
		waitPayment(t, s, tops[i].Id, client.PaymentStatusSucceeded)
		balance += starterCredits
	}
	got := getAutoTopUp(t, s, "limited")
	if got.MonthCount != 2 || got.InFlightPaymentId != nil {
		t.Fatalf("settings %+v", got)
	}
	assertInvariants(t, s)
}

// A credit pack checkout with save_payment_method keeps the card: once
// Stripe confirms the payment it is the customer's default, and automatic
// top-up charges it. A checkout without it saves nothing.
func TestPackCheckoutSavesTheCard(t *testing.T) {
	t.Parallel()
	fake, s, evs := cardServer(t)
	buy := func(customer string, save bool) string {
		t.Helper()
		one := int64(1)
		r, err := s.service(t).CreateCheckoutSessionWithResponse(context.Background(), &client.CreateCheckoutSessionParams{}, client.CheckoutSessionCreate{
			CustomerId: customer, Item: "starter", Quantity: &one, SavePaymentMethod: &save,
			SuccessUrl: "https://app.example.com/ok", CancelUrl: "https://app.example.com/no"})
		if err != nil {
			t.Fatal(err)
		}
		mustStatus(t, "checkout", r.StatusCode(), r.Body, http.StatusCreated)
		if res, err := fake.Sandbox().Pay(context.Background(), r.JSON201.CheckoutSessionId, "5555555555554444", customer+"@example.com"); err != nil || res.Outcome != "succeeds" {
			t.Fatalf("pay: %+v %v", res, err)
		}
		evs.deliverNew(t, s)
		waitPayment(t, s, r.JSON201.PaymentId, client.PaymentStatusSucceeded)
		return r.JSON201.PaymentId
	}
	buy("plain", false)
	if c := customerOverHTTP(t, s, "plain"); c.PaymentMethod != nil {
		t.Fatalf("a checkout without save_payment_method saved %+v", c.PaymentMethod)
	}
	buy("saver", true)
	c := customerOverHTTP(t, s, "saver")
	if c.PaymentMethod == nil || c.PaymentMethod.Brand != "mastercard" || c.PaymentMethod.Last4 != "4444" {
		t.Fatalf("saved card %+v", c.PaymentMethod)
	}
	// The saver's success is stored by the confirmation's transaction as
	// still to be processed (saving the card follows it), then recorded
	// processed once the card is saved: each success ends processed after
	// one attempt, nothing left due.
	gdb := openDB(t, s)
	if n := countRows(t, gdb, `SELECT count(*) FROM stripe_events WHERE type = 'payment_intent.succeeded'`); n != 2 {
		t.Fatalf("%d payment_intent.succeeded stored, want 2", n)
	}
	if n := countRows(t, gdb, `SELECT count(*) FROM stripe_events WHERE type = 'payment_intent.succeeded'
		AND (status <> 'processed' OR attempts <> 1 OR next_attempt_at IS NOT NULL OR processed_at IS NULL)`); n != 0 {
		t.Fatalf("%d payment_intent.succeeded not processed after exactly one attempt", n)
	}
	putAutoTopUp(t, s, "saver", client.AutoTopUpSettings{Enabled: true, Threshold: 500, Item: "starter"})
	spend(t, s, "saver", 600, "saver-1")
	tops := autoTopUps(t, s, "saver")
	if len(tops) != 1 {
		t.Fatalf("%d top-ups", len(tops))
	}
	waitCharged(t, s, tops[0].Id)
	evs.deliverNew(t, s)
	waitPayment(t, s, tops[0].Id, client.PaymentStatusSucceeded)
	if got := balanceOf(t, gdb, "saver"); got != 400+starterCredits {
		t.Fatalf("balance %d", got)
	}
	assertInvariants(t, s)
}
