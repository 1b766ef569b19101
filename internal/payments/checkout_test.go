package payments_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/db/dbtest"
	"github.com/tallybilling/tally/internal/errs"
	"github.com/tallybilling/tally/internal/payments"
)

// whaleCatalog sells a pack of a tenth of the largest grant: ten of them are
// the most one checkout may buy.
const whaleCatalog = `
redirect_url_prefixes: ["https://app.example.com/"]
credit_packs:
  - {id: whale, name: Whale, amount: 100, currency: usd, credits: 100000000000}
  - {id: dear, name: Dear, amount: 10000000, currency: usd, credits: 1}
`

// payAtStripe stands for the buyer paying res's Checkout Session with
// PaymentIntent pi (a no-op until the confirmation checks the session).
func payAtStripe(t *testing.T, svc *payments.Service, res payments.CheckoutResult, pi string) {
	t.Helper()
}

func count(t *testing.T, gdb *gorm.DB, query string, args ...any) int64 {
	t.Helper()
	var n int64
	if err := db.ScanRow(gdb.Raw(query, args...), &n); err != nil {
		t.Fatalf("%s: %v", query, err)
	}
	return n
}

// A quantity whose credits exceed the largest grant (or whose price exceeds
// what Stripe charges in one payment) is refused before anything is written
// or sent to Stripe, so money is never taken for credits that cannot be
// granted; the largest quantity that fits goes through.
func TestCheckoutRefusesQuantityBeyondTheLargestGrant(t *testing.T) {
	gdb := dbtest.New(t)
	fake, stripe := fakeClient(t)
	svc := newServiceWith(t, gdb, stripe, whaleCatalog, nil)
	ctx := context.Background()

	for _, c := range []struct {
		item     string
		quantity int64
	}{{"whale", 11}, {"whale", 100}, {"dear", 10}} {
		_, _, err := svc.CreateCheckout(ctx, payments.CheckoutInput{
			CustomerID: "whale-buyer", Item: c.item, Quantity: c.quantity,
			SuccessURL: "https://app.example.com/ok", CancelURL: "https://app.example.com/no",
		}, db.IdempotencyKey{})
		e, ok := errs.As(err)
		if !ok || e.Code != errs.Invalid || !e.Unprocessable || len(e.Fields) != 1 || e.Fields[0].Pointer != "/quantity" {
			t.Fatalf("%d × %s: %v, want an unprocessable invalid_request naming /quantity", c.quantity, c.item, err)
		}
	}
	if n := count(t, gdb, `SELECT count(*) FROM payments`) + count(t, gdb, `SELECT count(*) FROM customers`); n != 0 {
		t.Fatalf("refused checkouts wrote %d rows", n)
	}
	if n := len(fake.Requests()); n != 0 {
		t.Fatalf("refused checkouts sent %d requests to Stripe", n)
	}

	res := buy(t, svc, "whale-buyer", "whale", 10)
	p, err := svc.Get(ctx, res.PaymentID)
	if err != nil || p.Credits != 1_000_000_000_000 {
		t.Fatalf("10 × whale = %+v, %v; want 1e12 credits", p, err)
	}
}

const expiryCatalog = `
redirect_url_prefixes: ["https://app.example.com/"]
credit_packs:
  - {id: yearly, name: Yearly, amount: 100, currency: usd, credits: 10}
  - {id: half, name: Half, amount: 100, currency: usd, credits: 10, expires_after: 6mo}
  - {id: month, name: Month, amount: 100, currency: usd, credits: 10, expires_after: 720h}
  - {id: forever, name: Forever, amount: 100, currency: usd, credits: 10, expires_after: never}
`

// A pack without expires_after grants credits that expire 12 calendar
// months after the purchase is confirmed; a pack may say otherwise, or
// never. The payment remembers the rule it was sold under.
func TestPurchasedCreditsExpireByThePacksRule(t *testing.T) {
	gdb := dbtest.New(t)
	_, stripe := fakeClient(t)
	confirmedAt := time.Date(2028, 2, 29, 12, 0, 0, 0, time.UTC)
	svc := newServiceWith(t, gdb, stripe, expiryCatalog, func(o *payments.Options) {
		o.Now = func() time.Time { return confirmedAt }
	})
	ctx := context.Background()
	for i, c := range []struct {
		item string
		want string // "" for never
	}{
		{"yearly", "2029-02-28T12:00:00Z"},
		{"half", "2028-08-29T12:00:00Z"},
		{"month", "2028-03-30T12:00:00Z"},
		{"forever", ""},
	} {
		res := buy(t, svc, "expiring", c.item, 1)
		pi := fmt.Sprintf("pi_expiry_%d", i)
		payAtStripe(t, svc, res, pi)
		if err := svc.PaymentIntentSucceeded(ctx, payments.EventRef{ID: "evt_" + pi, Type: "payment_intent.succeeded"},
			payments.PaymentIntent{ID: pi, AmountReceived: 100, Currency: "usd", Metadata: map[string]string{"tally_payment_id": res.PaymentID}}); err != nil {
			t.Fatalf("%s: %v", c.item, err)
		}
		var expires *time.Time
		if err := db.ScanRow(gdb.Raw(`SELECT expires_at FROM credit_grants WHERE payment_id = ?`, res.PaymentID), &expires); err != nil {
			t.Fatalf("%s: grant: %v", c.item, err)
		}
		switch {
		case c.want == "" && expires != nil:
			t.Errorf("%s: credits expire at %s, want never", c.item, expires)
		case c.want != "" && (expires == nil || expires.UTC().Format(time.RFC3339) != c.want):
			t.Errorf("%s: credits expire at %v, want %s", c.item, expires, c.want)
		}
	}
	verifyClean(t, gdb)
}
