package payments_test

import (
	"context"
	"fmt"
	"net/http"
	"testing"

	"github.com/tallybilling/tally/internal/config"
	"github.com/tallybilling/tally/internal/credits"
	"github.com/tallybilling/tally/internal/db/dbtest"
	"github.com/tallybilling/tally/internal/payments"
	"github.com/tallybilling/tally/internal/stripeapi"
	"github.com/tallybilling/tally/internal/stripeapi/stripefake"
)

func balanceOf(t *testing.T, svc *credits.Service, customer string) int64 {
	t.Helper()
	b, err := svc.Balance(context.Background(), customer)
	if err != nil {
		t.Fatalf("balance of %s: %v", customer, err)
	}
	return b.Balance
}

func ptr(n int64) *int64 { return &n }

// sessionGets counts the retrievals of Checkout Sessions the fake answered.
func sessionGets(fake *stripefake.Fake) int {
	n := 0
	for _, r := range fake.Requests() {
		if r.Method == http.MethodGet && len(r.Path) > len("/v1/checkout/sessions/") && r.Path[:len("/v1/checkout/sessions/")] == "/v1/checkout/sessions/" {
			n++
		}
	}
	return n
}

// A PaymentIntent tally did not create (another integration on the
// account, a forged object) carrying a payment's metadata and the right
// amount does not credit it: the payment's own Checkout Session names
// another PaymentIntent, or none, so the event is refused (parked). A
// session that is not the payment's cannot link one either, nor can a
// PaymentIntent's failure. The genuine PaymentIntent still credits once.
func TestPaymentIntentTallyDidNotCreateIsRefused(t *testing.T) {
	t.Parallel()
	gdb := dbtest.New(t)
	fake, stripe := fakeClient(t)
	svc := newService(t, gdb, stripe, config.ConfirmOnPaymentIntent)
	wallet := credits.New(credits.Options{DB: gdb, Config: config.Default().Credits})
	ctx := context.Background()
	res := buy(t, svc, "target", "starter", 1)
	meta := map[string]string{stripeapi.MetadataPaymentID: res.PaymentID, stripeapi.MetadataCustomerID: "target"}
	forged := payments.PaymentIntent{ID: "pi_forged", Amount: 1000, AmountReceived: 1000, Currency: "usd", Status: "succeeded", Metadata: meta}

	// The buyer has not paid yet: the session names no PaymentIntent, so
	// the forged one cannot be confirmed (retried, never credited).
	if err := svc.PaymentIntentSucceeded(ctx, payments.EventRef{ID: "evt_forged_early", Type: "payment_intent.succeeded"}, forged); err == nil || payments.IsRejection(err) {
		t.Fatalf("a PaymentIntent before its session names one: %v, want an error to retry", err)
	}
	// A foreign session naming the forged PaymentIntent cannot link it, nor its failure.
	err := svc.CheckoutSessionCompleted(ctx, payments.EventRef{ID: "evt_foreign_cs", Type: "checkout.session.completed"}, payments.CheckoutSession{
		ID: "cs_foreign", Mode: "payment", Status: "complete", PaymentStatus: "paid", PaymentIntent: "pi_forged",
		Currency: "usd", AmountSubtotal: ptr(1000), AmountTotal: ptr(1000), Metadata: meta})
	if !payments.IsRejection(err) {
		t.Fatalf("a foreign session naming our payment: %v, want a rejection", err)
	}
	if err := svc.PaymentIntentFailed(ctx, payments.EventRef{ID: "evt_forged_fail", Type: "payment_intent.payment_failed"},
		payments.PaymentIntent{ID: "pi_forged", Currency: "usd", LastError: "declined", Metadata: meta}); err != nil {
		t.Fatalf("a failure of an unlinked PaymentIntent: %v", err)
	}
	if p, err := svc.Get(ctx, res.PaymentID); err != nil || p.PaymentIntentID != "" {
		t.Fatalf("payment after foreign events = %+v, %v; want no PaymentIntent linked", p, err)
	}

	// The buyer pays with the genuine PaymentIntent: the forged one is refused.
	payAtStripe(t, fake, res, "pi_genuine")
	if err := svc.PaymentIntentSucceeded(ctx, payments.EventRef{ID: "evt_forged", Type: "payment_intent.succeeded"}, forged); !payments.IsRejection(err) {
		t.Fatalf("a PaymentIntent the session does not name: %v, want a rejection", err)
	}
	if got := balanceOf(t, wallet, "target"); got != 0 {
		t.Fatalf("the forged PaymentIntent credited %d", got)
	}
	genuine := forged
	genuine.ID = "pi_genuine"
	if err := svc.PaymentIntentSucceeded(ctx, payments.EventRef{ID: "evt_genuine", Type: "payment_intent.succeeded"}, genuine); err != nil {
		t.Fatalf("the genuine PaymentIntent: %v", err)
	}
	if err := svc.PaymentIntentSucceeded(ctx, payments.EventRef{ID: "evt_forged_again", Type: "payment_intent.succeeded"}, forged); !payments.IsRejection(err) {
		t.Fatalf("the forged PaymentIntent after the genuine one: %v, want a rejection", err)
	}
	if got := balanceOf(t, wallet, "target"); got != 100 {
		t.Fatalf("balance = %d, want 100 (credited once, by the genuine PaymentIntent)", got)
	}
	p, err := svc.Get(ctx, res.PaymentID)
	if err != nil || p.Status != payments.Succeeded || p.PaymentIntentID != "pi_genuine" {
		t.Fatalf("payment = %+v, %v", p, err)
	}
	verifyClean(t, gdb)
}

// A genuine payment whose charge includes tax (Stripe Tax) or was
// converted into the buyer's currency (Adaptive Pricing) is credited: the
// catalog price is compared with the session's amount before tax in the
// catalog currency, and the PaymentIntent with the session's total. A real
// mismatch is still refused.
func TestTaxAndLocalCurrencies(t *testing.T) {
	t.Parallel()
	gdb := dbtest.New(t)
	fake, stripe := fakeClient(t)
	svc := newService(t, gdb, stripe, config.ConfirmOnPaymentIntent)
	wallet := credits.New(credits.Options{DB: gdb, Config: config.Default().Credits})
	ctx := context.Background()

	for i, c := range []struct {
		name     string
		session  map[string]any // fields Stripe filled in the session
		received int64
		currency string
		refused  bool
	}{
		{name: "Stripe Tax on top", received: 1190, currency: "usd", session: map[string]any{
			"amount_total": 1190, "total_details": map[string]any{"amount_discount": 0, "amount_shipping": 0, "amount_tax": 190}}},
		{name: "tax included in the price", received: 1000, currency: "usd", session: map[string]any{
			"total_details": map[string]any{"amount_discount": 0, "amount_shipping": 0, "amount_tax": 160}}},
		{name: "Adaptive Pricing in EUR", received: 950, currency: "eur", session: map[string]any{
			"currency": "eur", "amount_subtotal": 920, "amount_total": 950,
			"total_details":       map[string]any{"amount_discount": 0, "amount_shipping": 0, "amount_tax": 30},
			"currency_conversion": map[string]any{"source_currency": "usd", "amount_subtotal": 1000, "amount_total": 1033, "fx_rate": "0.92"}}},
		{name: "a price that is not the catalog's", received: 999, currency: "usd", refused: true, session: map[string]any{
			"amount_subtotal": 999, "amount_total": 999}},
		{name: "a PaymentIntent short of the total", received: 1000, currency: "usd", refused: true, session: map[string]any{
			"amount_total": 1190, "total_details": map[string]any{"amount_discount": 0, "amount_shipping": 0, "amount_tax": 190}}},
		{name: "a conversion from another currency", received: 920, currency: "eur", refused: true, session: map[string]any{
			"currency": "eur", "amount_subtotal": 920, "amount_total": 920,
			"currency_conversion": map[string]any{"source_currency": "gbp", "amount_subtotal": 1000, "amount_total": 1000, "fx_rate": "1.1"}}},
		{name: "a PaymentIntent in another currency than the session", received: 1000, currency: "eur", refused: true},
	} {
		t.Run(c.name, func(t *testing.T) {
			customer := fmt.Sprintf("buyer-%d", i)
			res := buy(t, svc, customer, "starter", 1)
			payAtStripe(t, fake, res, "pi_"+res.PaymentID)
			if c.session != nil {
				fake.UpdateCheckoutSession(res.CheckoutSessionID, c.session)
			}
			err := svc.PaymentIntentSucceeded(ctx, payments.EventRef{ID: "evt_" + res.PaymentID, Type: "payment_intent.succeeded"},
				payments.PaymentIntent{ID: "pi_" + res.PaymentID, Amount: c.received, AmountReceived: c.received, Currency: c.currency,
					Status: "succeeded", Metadata: map[string]string{stripeapi.MetadataPaymentID: res.PaymentID}})
			p, gerr := svc.Get(ctx, res.PaymentID)
			if gerr != nil {
				t.Fatal(gerr)
			}
			if c.refused {
				if !payments.IsRejection(err) || p.Status != payments.Pending || balanceOf(t, wallet, customer) != 0 {
					t.Fatalf("%v; payment %s; want a rejection and nothing credited", err, p.Status)
				}
				return
			}
			if err != nil {
				t.Fatalf("a genuine payment was refused: %v", err)
			}
			if p.Status != payments.Succeeded || p.AmountReceived == nil || *p.AmountReceived != c.received || p.ReceivedCurrency != c.currency {
				t.Fatalf("payment = %+v", p)
			}
			if got := balanceOf(t, wallet, customer); got != 100 {
				t.Fatalf("balance = %d, want 100", got)
			}
			// A full refund comes in the currency and amount the buyer paid.
			if err := svc.ChargeRefunded(ctx, payments.EventRef{ID: "evt_refund_" + res.PaymentID, Type: "charge.refunded"}, payments.Charge{
				ID: "ch_" + res.PaymentID, PaymentIntent: "pi_" + res.PaymentID, Amount: c.received, AmountRefunded: c.received,
				Currency: c.currency, Metadata: map[string]string{stripeapi.MetadataPaymentID: res.PaymentID}}); err != nil {
				t.Fatalf("the refund: %v", err)
			}
			if got := balanceOf(t, wallet, customer); got != 0 {
				t.Fatalf("balance after a full refund = %d, want 0", got)
			}
		})
	}
	verifyClean(t, gdb)
}

// What a checkout.session.completed event told (the PaymentIntent and the
// amounts of the payment's own session) spares a call to Stripe when the
// success arrives; a success that must ask Stripe while Stripe is down is
// retried, not refused.
func TestSessionFactsSpareAStripeCall(t *testing.T) {
	t.Parallel()
	gdb := dbtest.New(t)
	fake, stripe := fakeClient(t)
	svc := newService(t, gdb, stripe, config.ConfirmOnPaymentIntent)
	ctx := context.Background()

	known := buy(t, svc, "known", "starter", 1)
	if err := svc.CheckoutSessionCompleted(ctx, payments.EventRef{ID: "evt_cs_known", Type: "checkout.session.completed"}, payments.CheckoutSession{
		ID: known.CheckoutSessionID, Mode: "payment", Status: "complete", PaymentStatus: "paid", PaymentIntent: "pi_known",
		Currency: "usd", AmountSubtotal: ptr(1000), AmountTotal: ptr(1080), AmountTax: ptr(80),
		Metadata: map[string]string{stripeapi.MetadataPaymentID: known.PaymentID}}); err != nil {
		t.Fatal(err)
	}
	before := sessionGets(fake)
	if err := svc.PaymentIntentSucceeded(ctx, payments.EventRef{ID: "evt_pi_known", Type: "payment_intent.succeeded"},
		payments.PaymentIntent{ID: "pi_known", AmountReceived: 1080, Currency: "usd", Metadata: map[string]string{stripeapi.MetadataPaymentID: known.PaymentID}}); err != nil {
		t.Fatal(err)
	}
	if n := sessionGets(fake) - before; n != 0 {
		t.Fatalf("%d Checkout Session retrievals for a payment whose session was known", n)
	}
	if p, _ := svc.Get(ctx, known.PaymentID); p.Status != payments.Succeeded || p.Checkout.AmountTax != 80 {
		t.Fatalf("payment = %+v", p)
	}

	unknown := buy(t, svc, "unknown", "starter", 1)
	payAtStripe(t, fake, unknown, "pi_unknown")
	fake.FailNext(1, http.StatusServiceUnavailable, "")
	pi := payments.PaymentIntent{ID: "pi_unknown", AmountReceived: 1000, Currency: "usd", Metadata: map[string]string{stripeapi.MetadataPaymentID: unknown.PaymentID}}
	err := svc.PaymentIntentSucceeded(ctx, payments.EventRef{ID: "evt_pi_unknown", Type: "payment_intent.succeeded"}, pi)
	if err == nil || payments.IsRejection(err) {
		t.Fatalf("a success while Stripe is down: %v, want an error to retry", err)
	}
	if err := svc.PaymentIntentSucceeded(ctx, payments.EventRef{ID: "evt_pi_unknown", Type: "payment_intent.succeeded"}, pi); err != nil {
		t.Fatalf("the retry once Stripe is back: %v", err)
	}
	if p, _ := svc.Get(ctx, unknown.PaymentID); p.Status != payments.Succeeded {
		t.Fatalf("payment = %+v", p)
	}
	verifyClean(t, gdb)
}
