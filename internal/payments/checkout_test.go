package payments_test

import (
	"context"
	"testing"

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
