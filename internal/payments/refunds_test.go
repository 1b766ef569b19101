package payments_test

import (
	"context"
	"errors"
	"fmt"
	"testing"

	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/catalog"
	"github.com/tallybilling/tally/internal/config"
	"github.com/tallybilling/tally/internal/credits"
	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/db/dbtest"
	"github.com/tallybilling/tally/internal/payments"
	"github.com/tallybilling/tally/internal/stripeapi"
	"github.com/tallybilling/tally/internal/stripeapi/stripefake"
)

// wallet is the credits service over gdb, for grants, consumes and balances.
type wallet struct {
	t   *testing.T
	svc *credits.Service
	n   int
}

func newWallet(t *testing.T, gdb *gorm.DB) *wallet {
	return &wallet{t: t, svc: credits.New(credits.Options{DB: gdb, Config: config.Default().Credits, Logger: dbtest.Logger(t)})}
}

func (w *wallet) key(customer string) db.IdempotencyKey {
	w.n++
	k := fmt.Sprintf("k-%d", w.n)
	return db.IdempotencyKey{Scope: "customer:" + customer, Key: k, RequestHash: []byte(k)}
}

func (w *wallet) grant(customer string, n int64) {
	w.t.Helper()
	if _, _, err := w.svc.Grant(context.Background(), credits.GrantInput{CustomerID: customer, Amount: n, Reason: "promo"}, w.key(customer)); err != nil {
		w.t.Fatal(err)
	}
}

func (w *wallet) consume(customer string, n int64) {
	w.t.Helper()
	if _, _, err := w.svc.Consume(context.Background(), credits.ConsumeInput{CustomerID: customer, Amount: n, Reason: "use"}, w.key(customer)); err != nil {
		w.t.Fatal(err)
	}
}

func (w *wallet) balance(customer string) int64 {
	w.t.Helper()
	b, err := w.svc.Balance(context.Background(), customer)
	if err != nil {
		w.t.Fatal(err)
	}
	return b.Balance
}

// paidPack buys one starter pack (100 credits for 1000) and confirms it.
func paidPack(t *testing.T, fake *stripefake.Fake, svc *payments.Service, customer, pi string) payments.CheckoutResult {
	t.Helper()
	res := buy(t, svc, customer, "starter", 1)
	payAtStripe(t, fake, res, pi)
	if err := svc.PaymentIntentSucceeded(context.Background(), payments.EventRef{ID: "evt_paid_" + pi, Type: "payment_intent.succeeded"},
		payments.PaymentIntent{ID: pi, AmountReceived: 1000, Currency: "usd", Metadata: map[string]string{stripeapi.MetadataPaymentID: res.PaymentID}}); err != nil {
		t.Fatal(err)
	}
	return res
}

func refund(t *testing.T, svc *payments.Service, res payments.CheckoutResult, pi, event string, total int64) {
	t.Helper()
	if err := svc.ChargeRefunded(context.Background(), payments.EventRef{ID: event, Type: "charge.refunded"}, payments.Charge{
		ID: "ch_" + pi, PaymentIntent: pi, Amount: 1000, AmountRefunded: total, Currency: "usd",
		Metadata: map[string]string{stripeapi.MetadataPaymentID: res.PaymentID}}); err != nil {
		t.Fatalf("refund %s: %v", event, err)
	}
}

// Refunds are cumulative: each revokes the share of the credits its
// increase paid for, from the whole balance; what was recorded short is
// never asked for again.
func TestRefundsRevokeTheirShareOnceFromTheWholeBalance(t *testing.T) {
	t.Parallel()
	gdb := dbtest.New(t)
	fake, stripe := fakeClient(t)
	svc := newService(t, gdb, stripe, config.ConfirmOnPaymentIntent)
	w := newWallet(t, gdb)

	res := paidPack(t, fake, svc, "hal", "pi_hal")
	w.grant("hal", 50)   // never expires: drawn after the pack (which expires)
	w.consume("hal", 30) // from the pack: 70 left

	for _, step := range []struct {
		event   string
		total   int64
		balance int64
	}{
		{"evt_r1", 250, 95},  // 25% of 100 credits: 25
		{"evt_r1b", 250, 95}, // the same total again: nothing
		{"evt_r2", 600, 60},  // 60%: 35 more
		{"evt_r3", 1000, 20}, // all: 40 more, 10 left of the pack then 30 of the promo
	} {
		refund(t, svc, res, "pi_hal", step.event, step.total)
		if got := w.balance("hal"); got != step.balance {
			t.Fatalf("after %s (refunded %d): balance %d, want %d", step.event, step.total, got, step.balance)
		}
	}
	p, err := svc.Get(context.Background(), res.PaymentID)
	if err != nil || p.Status != payments.Refunded || p.AmountRefunded != 1000 || p.CreditsRevoked != 100 {
		t.Fatalf("payment = %+v, %v; want refunded 1000 with all 100 credits taken back", p, err)
	}
	verifyClean(t, gdb)

	// Spent nearly everything first: the rest is short, recorded once.
	res = paidPack(t, fake, svc, "ida", "pi_ida")
	w.consume("ida", 90)
	refund(t, svc, res, "pi_ida", "evt_i1", 500) // 50 due: 10 taken, 40 short
	refund(t, svc, res, "pi_ida", "evt_i2", 500)
	w.grant("ida", 100)                           // a later grant does not pay the shortfall
	refund(t, svc, res, "pi_ida", "evt_i3", 1000) // 50 more due: taken from the new grant
	if got := w.balance("ida"); got != 50 {
		t.Fatalf("balance = %d, want 50", got)
	}
	var sums struct{ Taken, Short int64 }
	if err := gdb.Raw(`SELECT sum(credits_revoked) AS taken, sum(credits_shortfall) AS short FROM payment_refunds WHERE payment_id = ?`, res.PaymentID).Scan(&sums).Error; err != nil {
		t.Fatal(err)
	}
	if taken, short := sums.Taken, sums.Short; taken != 60 || short != 40 {
		t.Fatalf("refunds took %d and recorded %d short, want 60 and 40", taken, short)
	}
	rep, err := credits.Verify(context.Background(), gdb, payments.Verify)
	if err != nil || !rep.OK || len(rep.Receivables) != 1 || rep.Receivables[0].CustomerID != "ida" || rep.Receivables[0].Shortfall != 40 {
		t.Fatalf("verify = %+v, %v; want ok with ida short 40", rep, err)
	}
}

// Under TALLY_REVOKE_FROM=purchase_grant a refund takes only what is left of
// the purchase grant; what it could not take is not counted, so a later
// refund of the same payment tries again (tally's first behaviour).
func TestRefundsFromThePurchaseGrantOnly(t *testing.T) {
	t.Parallel()
	gdb := dbtest.New(t)
	fake, stripe := fakeClient(t)
	cat, err := catalog.Parse([]byte(catalogYAML))
	if err != nil {
		t.Fatal(err)
	}
	o := defaultOptions(gdb)
	o.Stripe, o.Catalog, o.Logger, o.RevokeFrom = stripe, cat, dbtest.Logger(t), config.RevokeFromPurchaseGrant
	svc := payments.New(o)
	w := newWallet(t, gdb)

	res := paidPack(t, fake, svc, "joe", "pi_joe")
	w.grant("joe", 50)
	w.consume("joe", 80)                         // 20 left of the pack
	refund(t, svc, res, "pi_joe", "evt_j1", 500) // 50 due, 20 taken
	if got := w.balance("joe"); got != 50 {
		t.Fatalf("balance = %d, want the 50 promo credits untouched", got)
	}
	p, err := svc.Get(context.Background(), res.PaymentID)
	if err != nil || p.CreditsRevoked != 20 {
		t.Fatalf("payment = %+v, %v; want 20 credits taken back", p, err)
	}
	verifyClean(t, gdb)
}

// A refund or dispute that overtakes the success of its payment is told to
// wait for that PaymentIntent, not refused: it changes nothing meanwhile.
func TestRefundAndDisputeBeforeTheSuccessWait(t *testing.T) {
	t.Parallel()
	gdb := dbtest.New(t)
	_, stripe := fakeClient(t)
	svc := newService(t, gdb, stripe, config.ConfirmOnPaymentIntent)
	ctx := context.Background()
	res := buy(t, svc, "early", "starter", 1)
	meta := map[string]string{stripeapi.MetadataPaymentID: res.PaymentID}
	if err := svc.CheckoutSessionCompleted(ctx, payments.EventRef{ID: "evt_unpaid", Type: "checkout.session.completed"}, payments.CheckoutSession{
		ID: res.CheckoutSessionID, Mode: "payment", Status: "complete", PaymentStatus: "unpaid", PaymentIntent: "pi_early", Metadata: meta}); err != nil {
		t.Fatal(err)
	}
	for name, err := range map[string]error{
		"refund": svc.ChargeRefunded(ctx, payments.EventRef{ID: "evt_refund", Type: "charge.refunded"},
			payments.Charge{ID: "ch_early", PaymentIntent: "pi_early", Amount: 1000, AmountRefunded: 1000, Currency: "usd", Metadata: meta}),
		"dispute": svc.DisputeChanged(ctx, payments.EventRef{ID: "evt_dispute", Type: "charge.dispute.created"},
			disputeOf(res, "pi_early", "dp_early", "needs_response", 1000)),
	} {
		var w *payments.Waiting
		if !errors.As(err, &w) || w.PaymentIntentID != "pi_early" || payments.IsRejection(err) {
			t.Errorf("%s before the success: %v, want to wait for pi_early", name, err)
		}
	}
	p, err := svc.Get(ctx, res.PaymentID)
	if err != nil || p.Status != payments.Pending || len(p.Transitions) != 1 {
		t.Fatalf("payment = %+v, %v; want pending with only its creation in the history", p, err)
	}
}
