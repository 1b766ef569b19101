package payments_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/catalog"
	"github.com/tallybilling/tally/internal/config"
	"github.com/tallybilling/tally/internal/credits"
	"github.com/tallybilling/tally/internal/customers"
	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/db/dbtest"
	"github.com/tallybilling/tally/internal/payments"
	"github.com/tallybilling/tally/internal/stripeapi"
	"github.com/tallybilling/tally/internal/stripeapi/stripefake"
)

const catalogYAML = `
redirect_url_prefixes: ["https://app.example.com/"]
credit_packs:
  - {id: starter, name: Starter, amount: 1000, currency: usd, credits: 100, expires_after: 8760h}
products:
  - {id: ebook, name: E-book, amount: 1900, currency: usd}
plans:
  - {id: api, name: API, stripe_price: price_api, meter: api_calls, stripe_meter_id: mtr_1}
`

func newService(t *testing.T, gdb *gorm.DB, stripe stripeapi.Client, confirmOn string) *payments.Service {
	t.Helper()
	return newServiceWith(t, gdb, stripe, catalogYAML, func(o *payments.Options) { o.Config.ConfirmOn = confirmOn })
}

// newServiceWith builds a Service on the catalog file catalogYAML, with tweak
// applied to its options.
func newServiceWith(t *testing.T, gdb *gorm.DB, stripe stripeapi.Client, catalogYAML string, tweak func(*payments.Options)) *payments.Service {
	t.Helper()
	cat, err := catalog.Parse([]byte(catalogYAML))
	if err != nil {
		t.Fatal(err)
	}
	o := defaultOptions(gdb)
	o.Stripe, o.Catalog, o.Logger = stripe, cat, dbtest.Logger(t)
	o.Config.InvoiceCreation = true
	if tweak != nil {
		tweak(&o)
	}
	return payments.New(o)
}

// defaultOptions are the Options app.New passes on a default configuration
// (config.Default), except that checkouts are not rate limited: tests start
// many for one customer.
func defaultOptions(gdb *gorm.DB) payments.Options {
	cfg := config.Default()
	o := payments.Options{DB: gdb, Config: cfg.Checkout, RevokeFrom: cfg.Credits.RevokeFrom}
	o.Config.RateLimit = 0
	return o
}

func fakeClient(t *testing.T) (*stripefake.Fake, stripeapi.Client) {
	t.Helper()
	fake := stripefake.New(t)
	c, err := stripeapi.New(stripeapi.Config{SecretKey: "sk_test_payments", APIURL: fake.URL()})
	if err != nil {
		t.Fatal(err)
	}
	return fake, c
}

func buy(t *testing.T, svc *payments.Service, customer, item string, quantity int64) payments.CheckoutResult {
	t.Helper()
	res, _, err := svc.CreateCheckout(context.Background(), payments.CheckoutInput{
		CustomerID: customer, Item: item, Quantity: quantity,
		SuccessURL: "https://app.example.com/ok", CancelURL: "https://app.example.com/no",
	}, db.IdempotencyKey{})
	if err != nil {
		t.Fatalf("checkout: %v", err)
	}
	return res
}

func verifyClean(t *testing.T, gdb *gorm.DB) {
	t.Helper()
	rep, err := credits.Verify(context.Background(), gdb, payments.Verify)
	if err != nil || !rep.OK {
		t.Fatalf("verify: %v %+v", err, rep.Problems)
	}
}

func TestTransitionTable(t *testing.T) {
	t.Parallel()
	all := []payments.Status{payments.Pending, payments.Succeeded, payments.Failed, payments.Refunded, payments.Disputed, payments.DisputeLost}
	want := map[[2]payments.Status]bool{
		{payments.Pending, payments.Succeeded}:       true,
		{payments.Pending, payments.Failed}:          true,
		{payments.Failed, payments.Succeeded}:        true,
		{payments.Failed, payments.Failed}:           true,
		{payments.Succeeded, payments.Refunded}:      true,
		{payments.Refunded, payments.Refunded}:       true,
		{payments.Succeeded, payments.Disputed}:      true,
		{payments.Refunded, payments.Disputed}:       true,
		{payments.Succeeded, payments.DisputeLost}:   true, // first seen lost
		{payments.Refunded, payments.DisputeLost}:    true,
		{payments.Disputed, payments.Disputed}:       true, // a late refund, a second dispute
		{payments.Disputed, payments.DisputeLost}:    true,
		{payments.Disputed, payments.Succeeded}:      true, // won
		{payments.Disputed, payments.Refunded}:       true, // won, refunded before
		{payments.DisputeLost, payments.DisputeLost}: true, // a late refund
	}
	for _, from := range all {
		for _, to := range all {
			if got := payments.Allowed(from, to); got != want[[2]payments.Status{from, to}] {
				t.Errorf("Allowed(%s, %s) = %t", from, to, got)
			}
		}
	}
}

// Both confirmation strategies racing on one payment (as during a switch
// of confirm_on across replicas), many times over: one grant.
func TestConfirmationGuardAcrossStrategies(t *testing.T) {
	t.Parallel()
	gdb := dbtest.New(t)
	fake, stripe := fakeClient(t)
	byIntent := newService(t, gdb, stripe, config.ConfirmOnPaymentIntent)
	bySession := newService(t, gdb, stripe, config.ConfirmOnCheckoutSession)
	ctx := context.Background()

	res := buy(t, byIntent, "racer", "starter", 2)
	payAtStripe(t, fake, res, "pi_race")
	pi := payments.PaymentIntent{ID: "pi_race", Amount: 2000, AmountReceived: 2000, Currency: "usd", Status: "succeeded",
		Metadata: map[string]string{stripeapi.MetadataPaymentID: res.PaymentID}}
	total := int64(2000)
	cs := payments.CheckoutSession{ID: res.CheckoutSessionID, Mode: "payment", Status: "complete", PaymentStatus: "paid",
		PaymentIntent: "pi_race", AmountSubtotal: &total, AmountTotal: &total, Currency: "usd", Metadata: map[string]string{stripeapi.MetadataPaymentID: res.PaymentID}}

	var wg sync.WaitGroup
	errc := make(chan error, 40)
	for i := range 40 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ev := payments.EventRef{ID: fmt.Sprintf("evt_%d", i), Created: time.Now().Unix()}
			var err error
			switch i % 3 {
			case 0:
				ev.Type = "payment_intent.succeeded"
				err = byIntent.PaymentIntentSucceeded(ctx, ev, pi)
			case 1:
				ev.Type = "checkout.session.completed"
				err = bySession.CheckoutSessionCompleted(ctx, ev, cs)
			default:
				ev.Type = "checkout.session.async_payment_succeeded"
				err = bySession.CheckoutSessionAsyncSucceeded(ctx, ev, cs)
			}
			errc <- err
		}()
	}
	wg.Wait()
	close(errc)
	for err := range errc {
		if err != nil {
			t.Fatalf("a confirmation failed: %v", err)
		}
	}
	b, err := credits.New(credits.Options{DB: gdb, Config: config.Default().Credits}).Balance(ctx, "racer")
	if err != nil || b.Balance != 200 {
		t.Fatalf("balance = %+v, %v; want 200 (2 × 100, once)", b, err)
	}
	p, err := byIntent.Get(ctx, res.PaymentID)
	if err != nil || p.Status != payments.Succeeded || p.PaymentIntentID != "pi_race" {
		t.Fatalf("payment = %+v, %v", p, err)
	}
	verifyClean(t, gdb)
}

// A confirmation for a payment another PaymentIntent already paid is
// refused, not credited a second time.
func TestSecondPaymentIntentIsRejected(t *testing.T) {
	t.Parallel()
	gdb := dbtest.New(t)
	fake, stripe := fakeClient(t)
	svc := newService(t, gdb, stripe, config.ConfirmOnPaymentIntent)
	ctx := context.Background()
	res := buy(t, svc, "twice", "starter", 1)
	payAtStripe(t, fake, res, "pi_a")
	meta := map[string]string{stripeapi.MetadataPaymentID: res.PaymentID}
	ev := payments.EventRef{ID: "evt_a", Type: "payment_intent.succeeded"}
	if err := svc.PaymentIntentSucceeded(ctx, ev, payments.PaymentIntent{ID: "pi_a", AmountReceived: 1000, Currency: "usd", Metadata: meta}); err != nil {
		t.Fatal(err)
	}
	err := svc.PaymentIntentSucceeded(ctx, payments.EventRef{ID: "evt_b", Type: ev.Type}, payments.PaymentIntent{ID: "pi_b", AmountReceived: 1000, Currency: "usd", Metadata: meta})
	if !payments.IsRejection(err) {
		t.Fatalf("a second PaymentIntent for one payment: %v, want a rejection", err)
	}
	if err := svc.PaymentIntentSucceeded(ctx, ev, payments.PaymentIntent{ID: "pi_a", AmountReceived: 1000, Currency: "usd", Livemode: true, Metadata: meta}); !payments.IsRejection(err) {
		t.Fatalf("a live event for a test key: %v, want a rejection", err)
	}
	other := buy(t, svc, "someone-else", "starter", 1)
	if err := svc.PaymentIntentSucceeded(ctx, payments.EventRef{ID: "evt_c", Type: ev.Type}, payments.PaymentIntent{ID: "pi_c", AmountReceived: 1000, Currency: "usd",
		Metadata: map[string]string{stripeapi.MetadataPaymentID: other.PaymentID, stripeapi.MetadataCustomerID: "twice"}}); !payments.IsRejection(err) {
		t.Fatalf("metadata naming another customer's payment: %v, want a rejection", err)
	}
	if err := svc.PaymentIntentSucceeded(ctx, ev, payments.PaymentIntent{ID: "pi_other", AmountReceived: 1000, Currency: "usd"}); err != payments.ErrNotOurs {
		t.Fatalf("a PaymentIntent without our metadata: %v, want ErrNotOurs", err)
	}
	verifyClean(t, gdb)
}

// Plans open subscription sessions on the plan's Stripe price; one-time
// payments (products, credit packs) ask for an invoice when configured; the
// session carries our ids.
func TestCheckoutModes(t *testing.T) {
	t.Parallel()
	gdb := dbtest.New(t)
	fake, stripe := fakeClient(t)
	svc := newService(t, gdb, stripe, config.ConfirmOnPaymentIntent)
	plan := buy(t, svc, "sub-1", "api", 1)
	book := buy(t, svc, "sub-1", "ebook", 2)
	forms := fake.CheckoutSessions()
	if len(forms) != 2 {
		t.Fatalf("%d sessions", len(forms))
	}
	p, s := forms[0], forms[1]
	for k, want := range map[string]string{
		"mode": "subscription", "line_items[0][price]": "price_api",
		"subscription_data[metadata][tally_payment_id]": plan.PaymentID, "metadata[tally_item]": "api",
	} {
		if p.Get(k) != want {
			t.Errorf("plan session %s = %q, want %q (%v)", k, p.Get(k), want, p)
		}
	}
	for k, want := range map[string]string{
		"mode": "payment", "invoice_creation[enabled]": "true", "line_items[0][quantity]": "2",
		"payment_intent_data[metadata][tally_payment_id]": book.PaymentID,
	} {
		if s.Get(k) != want {
			t.Errorf("product session %s = %q, want %q (%v)", k, s.Get(k), want, s)
		}
	}
	if len(fake.Customers()) != 1 {
		t.Fatalf("%d Stripe customers created for one tally customer", len(fake.Customers()))
	}
	// Invoice creation, when configured, is for every one-time payment
	// (TALLY_CHECKOUT_INVOICE_CREATION in the README): credit packs too,
	// never a subscription.
	pack := buy(t, svc, "sub-1", "starter", 1)
	forms = fake.CheckoutSessions()
	if len(forms) != 3 {
		t.Fatalf("%d sessions", len(forms))
	}
	for k, want := range map[string]string{
		"mode": "payment", "invoice_creation[enabled]": "true", "payment_intent_data[metadata][tally_payment_id]": pack.PaymentID,
	} {
		if forms[2].Get(k) != want {
			t.Errorf("credit pack session %s = %q, want %q (%v)", k, forms[2].Get(k), want, forms[2])
		}
	}
	if p.Get("invoice_creation[enabled]") != "" {
		t.Errorf("the subscription session asks for an invoice: %v", p)
	}

	// The plan's subscription session completing starts it (no credits).
	ctx := context.Background()
	err := svc.CheckoutSessionCompleted(ctx, payments.EventRef{ID: "evt_sub", Type: "checkout.session.completed"}, payments.CheckoutSession{
		ID: plan.CheckoutSessionID, Mode: "subscription", Status: "complete", PaymentStatus: "paid", Subscription: "sub_1",
		Metadata: map[string]string{stripeapi.MetadataPaymentID: plan.PaymentID}})
	if err != nil {
		t.Fatal(err)
	}
	got, err := svc.Get(ctx, plan.PaymentID)
	if err != nil || got.Status != payments.Succeeded || got.SubscriptionID != "sub_1" {
		t.Fatalf("plan payment = %+v, %v", got, err)
	}
	// Its payment.succeeded has every field a purchase's has: a plan moves
	// no money through tally, so its amounts are 0, its currencies empty,
	// and only payment_intent_id (it has none) is absent.
	var data string
	if r := gdb.Raw(`SELECT data::text FROM events WHERE type = 'payment.succeeded' AND data->>'payment_id' = ?`, plan.PaymentID).Scan(&data); r.Error != nil || r.RowsAffected != 1 {
		t.Fatalf("the plan's payment.succeeded: %v (%d rows)", r.Error, r.RowsAffected)
	}
	var gotData, wantData map[string]any
	_ = json.Unmarshal([]byte(data), &gotData)
	_ = json.Unmarshal([]byte(`{"payment_id": "`+plan.PaymentID+`", "item": "api", "item_kind": "plan", "quantity": 1,
		"amount": 0, "currency": "", "amount_tax": 0, "price": 0, "price_currency": "", "credits": 0, "stripe_event_id": "evt_sub"}`), &wantData)
	if !reflect.DeepEqual(gotData, wantData) {
		t.Errorf("plan's payment.succeeded data = %s, want %v", data, wantData)
	}

	// Subscription status follows the newest event; an older one is ignored.
	sub := payments.Subscription{ID: "sub_1", Customer: "cus_x", Status: "active", Metadata: map[string]string{stripeapi.MetadataCustomerID: "sub-1", stripeapi.MetadataItem: "api"}}
	if err := svc.SubscriptionChanged(ctx, payments.EventRef{ID: "evt_s2", Created: 200}, sub); err != nil {
		t.Fatal(err)
	}
	sub.Status = "incomplete"
	if err := svc.SubscriptionChanged(ctx, payments.EventRef{ID: "evt_s1", Created: 100}, sub); err != nil {
		t.Fatal(err)
	}
	var status string
	if err := gdb.Raw(`SELECT status FROM subscriptions WHERE stripe_subscription_id = 'sub_1'`).Scan(&status).Error; err != nil || status != "active" {
		t.Fatalf("subscription status = %q, %v; want active", status, err)
	}
	verifyClean(t, gdb)
}

// A subscription created outside tally's checkout carries none of tally's
// metadata: its Stripe customer says whose it is. A Stripe customer tally
// never linked is another integration's (ignored), and metadata naming a
// customer tally does not know is refused; neither writes a status.
func TestSubscriptionFoundByItsStripeCustomer(t *testing.T) {
	t.Parallel()
	gdb := dbtest.New(t)
	_, stripe := fakeClient(t)
	svc := newService(t, gdb, stripe, config.ConfirmOnPaymentIntent)
	ctx := context.Background()
	linked := "cus_linked"
	if _, _, err := customers.New(customers.Options{DB: gdb}).Upsert(ctx, customers.UpsertInput{ID: "owner", StripeCustomerID: &linked}); err != nil {
		t.Fatal(err)
	}

	if err := svc.SubscriptionChanged(ctx, payments.EventRef{ID: "evt_own", Created: 1},
		payments.Subscription{ID: "sub_own", Customer: linked, Status: "active"}); err != nil {
		t.Fatalf("subscription of a linked Stripe customer: %v", err)
	}
	var owner string
	if err := gdb.Raw(`SELECT customer_id FROM subscriptions WHERE stripe_subscription_id = 'sub_own'`).Scan(&owner).Error; err != nil || owner != "owner" {
		t.Fatalf("sub_own belongs to %q (%v), want owner", owner, err)
	}
	if err := svc.SubscriptionChanged(ctx, payments.EventRef{ID: "evt_stranger", Created: 1},
		payments.Subscription{ID: "sub_stranger", Customer: "cus_stranger", Status: "active"}); !errors.Is(err, payments.ErrNotOurs) {
		t.Fatalf("subscription of an unknown Stripe customer: %v, want ErrNotOurs", err)
	}
	if err := svc.SubscriptionChanged(ctx, payments.EventRef{ID: "evt_ghost", Created: 1},
		payments.Subscription{ID: "sub_ghost", Customer: linked, Status: "active", Metadata: map[string]string{stripeapi.MetadataCustomerID: "ghost"}}); !payments.IsRejection(err) {
		t.Fatalf("subscription naming an unknown customer: %v, want a rejection", err)
	}
	if n := count(t, gdb, `SELECT count(*) FROM subscriptions`); n != 1 {
		t.Fatalf("%d subscriptions stored, want only sub_own", n)
	}
	if n := count(t, gdb, `SELECT count(*) FROM events WHERE type = 'subscription.updated'`); n != 1 {
		t.Fatalf("%d subscription.updated events, want 1", n)
	}
}

// The payments check must see a breach, or `tally verify` passing means nothing.
func TestVerifyPurchasesFindsBreaches(t *testing.T) {
	t.Parallel()
	gdb := dbtest.New(t)
	fake, stripe := fakeClient(t)
	svc := newService(t, gdb, stripe, config.ConfirmOnPaymentIntent)
	ctx := context.Background()
	paid := buy(t, svc, "audit", "starter", 1)
	payAtStripe(t, fake, paid, "pi_1")
	unpaid := buy(t, svc, "audit", "starter", 1)
	if err := svc.PaymentIntentSucceeded(ctx, payments.EventRef{ID: "evt_1", Type: "payment_intent.succeeded"},
		payments.PaymentIntent{ID: "pi_1", AmountReceived: 1000, Currency: "usd", Metadata: map[string]string{stripeapi.MetadataPaymentID: paid.PaymentID}}); err != nil {
		t.Fatal(err)
	}
	problems, checked, err := payments.VerifyPurchases(ctx, gdb)
	if err != nil || len(problems) != 0 || checked != 2 {
		t.Fatalf("clean state: %+v, %d, %v", problems, checked, err)
	}
	// Tamper behind the service's back: the paid payment loses its success,
	// the unpaid one claims one.
	if err := gdb.Exec(`UPDATE payments SET status = CASE WHEN id = ? THEN 'failed' ELSE 'succeeded' END WHERE id IN (?, ?)`,
		paid.PaymentID, paid.PaymentID, unpaid.PaymentID).Error; err != nil {
		t.Fatal(err)
	}
	problems, _, err = payments.VerifyPurchases(ctx, gdb)
	if err != nil || len(problems) != 2 {
		t.Fatalf("problems = %+v, %v; want 2", problems, err)
	}
	kinds := map[string]string{}
	for _, p := range problems {
		kinds[p.PaymentID] = p.Kind
	}
	if kinds[paid.PaymentID] != "unpaid_payment_granted" || kinds[unpaid.PaymentID] != "succeeded_payment_grants" {
		t.Fatalf("problems = %+v", problems)
	}
}

// A Stripe object that carries a payment's metadata but belongs to another
// PaymentIntent (copied metadata, another integration, a forged object) must
// not refund or fail that payment, nor may a charge whose amounts do not
// fit what was paid. The event is refused (parked), and nothing moves.
func TestForeignPaymentIntentIsRejected(t *testing.T) {
	t.Parallel()
	gdb := dbtest.New(t)
	fake, stripe := fakeClient(t)
	svc := newService(t, gdb, stripe, config.ConfirmOnPaymentIntent)
	ctx := context.Background()
	balance := func(customer string) int64 {
		t.Helper()
		b, err := credits.New(credits.Options{DB: gdb, Config: config.Default().Credits}).Balance(ctx, customer)
		if err != nil {
			t.Fatal(err)
		}
		return b.Balance
	}

	paid := buy(t, svc, "victim", "starter", 1)
	payAtStripe(t, fake, paid, "pi_victim")
	meta := map[string]string{stripeapi.MetadataPaymentID: paid.PaymentID}
	if err := svc.PaymentIntentSucceeded(ctx, payments.EventRef{ID: "evt_paid", Type: "payment_intent.succeeded"},
		payments.PaymentIntent{ID: "pi_victim", AmountReceived: 1000, Currency: "usd", Metadata: meta}); err != nil {
		t.Fatal(err)
	}
	for i, c := range []struct {
		name string
		ch   payments.Charge
	}{
		{"another PaymentIntent", payments.Charge{ID: "ch_other", PaymentIntent: "pi_attacker", Amount: 1000, AmountRefunded: 1000}},
		{"no PaymentIntent", payments.Charge{ID: "ch_none", Amount: 1000, AmountRefunded: 1000}},
		{"another amount", payments.Charge{ID: "ch_big", PaymentIntent: "pi_victim", Amount: 50000, AmountRefunded: 1000}},
		{"more refunded than charged", payments.Charge{ID: "ch_over", PaymentIntent: "pi_victim", Amount: 1000, AmountRefunded: 2000}},
	} {
		c.ch.Currency, c.ch.Metadata = "usd", meta
		err := svc.ChargeRefunded(ctx, payments.EventRef{ID: fmt.Sprintf("evt_refund_%d", i), Type: "charge.refunded"}, c.ch)
		if !payments.IsRejection(err) {
			t.Errorf("refund from %s: %v, want a rejection", c.name, err)
		}
	}
	if got := balance("victim"); got != 100 {
		t.Fatalf("foreign refunds revoked credits: balance %d, want 100", got)
	}
	err := svc.PaymentIntentFailed(ctx, payments.EventRef{ID: "evt_fail_paid", Type: "payment_intent.payment_failed"},
		payments.PaymentIntent{ID: "pi_attacker", Currency: "usd", LastError: "declined", Metadata: meta})
	if !payments.IsRejection(err) {
		t.Errorf("a failure of another PaymentIntent for a succeeded payment: %v, want a rejection", err)
	}
	p, err := svc.Get(ctx, paid.PaymentID)
	if err != nil || p.Status != payments.Succeeded || p.AmountRefunded != 0 || len(p.Transitions) != 2 {
		t.Fatalf("payment after foreign events = %+v, %v; want succeeded, nothing refunded, 2 transitions", p, err)
	}

	// A pending payment whose PaymentIntent is known is not failed by another one's decline.
	pending := buy(t, svc, "victim", "starter", 1)
	pmeta := map[string]string{stripeapi.MetadataPaymentID: pending.PaymentID}
	if err := svc.CheckoutSessionCompleted(ctx, payments.EventRef{ID: "evt_unpaid", Type: "checkout.session.completed"}, payments.CheckoutSession{
		ID: pending.CheckoutSessionID, Mode: "payment", Status: "complete", PaymentStatus: "unpaid", PaymentIntent: "pi_pending", Metadata: pmeta}); err != nil {
		t.Fatal(err)
	}
	for _, typ := range []string{"payment_intent.payment_failed", "payment_intent.canceled"} {
		err := svc.PaymentIntentFailed(ctx, payments.EventRef{ID: "evt_" + typ, Type: typ},
			payments.PaymentIntent{ID: "pi_attacker", Currency: "usd", LastError: "declined", CancellationReason: "abandoned", Metadata: pmeta})
		if !payments.IsRejection(err) {
			t.Errorf("%s of another PaymentIntent: %v, want a rejection", typ, err)
		}
	}
	if p, err := svc.Get(ctx, pending.PaymentID); err != nil || p.Status != payments.Pending {
		t.Fatalf("pending payment after foreign failures = %+v, %v; want pending", p, err)
	}
	if n := count(t, gdb, `SELECT count(*) FROM events WHERE type = 'payment.failed'`); n != 0 {
		t.Fatalf("%d payment.failed events, want 0", n)
	}

	// The real refund still applies.
	if err := svc.ChargeRefunded(ctx, payments.EventRef{ID: "evt_refund_ok", Type: "charge.refunded"},
		payments.Charge{ID: "ch_victim", PaymentIntent: "pi_victim", Amount: 1000, AmountRefunded: 1000, Currency: "usd", Metadata: meta}); err != nil {
		t.Fatalf("the genuine refund: %v", err)
	}
	if got := balance("victim"); got != 0 {
		t.Fatalf("balance after the genuine refund = %d, want 0", got)
	}
	verifyClean(t, gdb)
}

// The same failure delivered again (Stripe's redelivery under the same id,
// an operator's replay) and further failure events for a payment already
// failed tell the host app once: one payment.failed, one applied move into
// failed, each Stripe event in the history at most once.
func TestFailuresAreIdempotent(t *testing.T) {
	t.Parallel()
	gdb := dbtest.New(t)
	fake, stripe := fakeClient(t)
	svc := newService(t, gdb, stripe, config.ConfirmOnPaymentIntent)
	ctx := context.Background()
	res := buy(t, svc, "decliner", "starter", 1)
	meta := map[string]string{stripeapi.MetadataPaymentID: res.PaymentID}
	pi := payments.PaymentIntent{ID: "pi_decline", Currency: "usd", LastError: "Your card was declined.", Metadata: meta}
	for range 3 {
		if err := svc.PaymentIntentFailed(ctx, payments.EventRef{ID: "evt_decline", Type: "payment_intent.payment_failed"}, pi); err != nil {
			t.Fatal(err)
		}
	}
	canceled := pi
	canceled.CancellationReason = "abandoned"
	if err := svc.PaymentIntentFailed(ctx, payments.EventRef{ID: "evt_cancel", Type: "payment_intent.canceled"}, canceled); err != nil {
		t.Fatal(err)
	}
	cs := payments.CheckoutSession{ID: res.CheckoutSessionID, Mode: "payment", PaymentStatus: "unpaid", PaymentIntent: "pi_decline", Metadata: meta}
	for _, typ := range []string{"checkout.session.async_payment_failed", "checkout.session.expired"} {
		if err := svc.CheckoutSessionFailed(ctx, payments.EventRef{ID: "evt_" + typ, Type: typ}, cs); err != nil {
			t.Fatal(err)
		}
	}

	if failedEvents := count(t, gdb, `SELECT count(*) FROM events WHERE type = 'payment.failed' AND data->>'payment_id' = ?`, res.PaymentID); failedEvents != 1 {
		t.Errorf("%d payment.failed events, want 1", failedEvents)
	}
	p, err := svc.Get(ctx, res.PaymentID)
	if err != nil {
		t.Fatal(err)
	}
	if p.Status != payments.Failed || p.FailureReason != "Your card was declined." {
		t.Errorf("payment = %s (%q), want failed for the first decline", p.Status, p.FailureReason)
	}
	appliedFailures, seen := 0, map[string]int{}
	for _, tr := range p.Transitions {
		if tr.Applied && tr.To == payments.Failed {
			appliedFailures++
		}
		if tr.StripeEventID != "" {
			seen[tr.StripeEventID]++
		}
	}
	if appliedFailures != 1 {
		t.Errorf("%d applied moves into failed, want 1: %+v", appliedFailures, p.Transitions)
	}
	for id, n := range seen {
		if n != 1 {
			t.Errorf("event %s recorded %d times, want once", id, n)
		}
	}

	// A failed payment may still succeed (a retried card), once.
	payAtStripe(t, fake, res, "pi_decline")
	if err := svc.PaymentIntentSucceeded(ctx, payments.EventRef{ID: "evt_paid", Type: "payment_intent.succeeded"},
		payments.PaymentIntent{ID: "pi_decline", AmountReceived: 1000, Currency: "usd", Metadata: meta}); err != nil {
		t.Fatal(err)
	}
	if p, err := svc.Get(ctx, res.PaymentID); err != nil || p.Status != payments.Succeeded {
		t.Fatalf("after the retried card: %+v, %v", p, err)
	}
	verifyClean(t, gdb)
}

// A Stripe id already linked to one payment cannot be linked to another:
// the event is refused (parked), not a 500 nor a silent second owner.
func TestStripeIDOfAnotherPaymentIsRejected(t *testing.T) {
	t.Parallel()
	gdb := dbtest.New(t)
	_, stripe := fakeClient(t)
	svc := newService(t, gdb, stripe, config.ConfirmOnPaymentIntent)
	ctx := context.Background()
	first := buy(t, svc, "linker", "starter", 1)
	second := buy(t, svc, "linker", "starter", 1)
	completed := func(res payments.CheckoutResult, ev string) error {
		return svc.CheckoutSessionCompleted(ctx, payments.EventRef{ID: ev, Type: "checkout.session.completed"}, payments.CheckoutSession{
			ID: res.CheckoutSessionID, Mode: "payment", Status: "complete", PaymentStatus: "unpaid", PaymentIntent: "pi_shared",
			Metadata: map[string]string{stripeapi.MetadataPaymentID: res.PaymentID}})
	}
	if err := completed(first, "evt_first"); err != nil {
		t.Fatal(err)
	}
	if err := completed(second, "evt_second"); !payments.IsRejection(err) || !strings.Contains(err.Error(), "payment_intent_id pi_shared already belongs to another payment") {
		t.Fatalf("linking another payment's PaymentIntent: %v, want a rejection naming it", err)
	}
	p, err := svc.Get(ctx, second.PaymentID)
	if err != nil || p.PaymentIntentID != "" || p.Status != payments.Pending {
		t.Fatalf("second payment = %+v, %v; want pending without a PaymentIntent", p, err)
	}
}

// Settings come from config, which holds every default: an unset checkout
// setting or revoke source in hand-built Options is a programming error
// that New refuses, naming it, rather than quietly choosing a value
// of its own.
func TestNewRefusesUnsetSettings(t *testing.T) {
	t.Parallel()
	for name, tc := range map[string]struct {
		tweak func(*payments.Options)
		want  string
	}{
		"confirm on":  {func(o *payments.Options) { o.Config.ConfirmOn = "" }, "TALLY_CONFIRM_ON"},
		"expiry":      {func(o *payments.Options) { o.Config.ExpiresAfter = 0 }, "TALLY_CHECKOUT_EXPIRES_AFTER"},
		"revoke from": {func(o *payments.Options) { o.RevokeFrom = "" }, "TALLY_REVOKE_FROM"},
	} {
		t.Run(name, func(t *testing.T) {
			o := defaultOptions(nil)
			tc.tweak(&o)
			defer func() {
				if msg := fmt.Sprint(recover()); !strings.Contains(msg, tc.want) {
					t.Fatalf("New panicked with %q, want the unset %s named", msg, tc.want)
				}
			}()
			payments.New(o)
		})
	}
}
