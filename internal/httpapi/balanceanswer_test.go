package httpapi

import (
	"net/http/httptest"
	"reflect"
	"testing"
	"time"

	"github.com/tallybilling/tally/api"
)

// The balance answer encoded once is byte for byte the generated union's,
// headers and status included.
func TestBalanceAnswerIsTheGeneratedOne(t *testing.T) {
	t.Parallel()
	at := time.Date(2026, 12, 1, 14, 0, 0, 123456789, time.FixedZone("x", 3600))
	amount := int64(7)
	payment := "pay_<&>\u2028"
	for _, b := range []api.Balance{
		{CustomerId: "c1", Grants: []api.GrantSummary{}},
		{CustomerId: "a<b>&c", Balance: 10, Held: 2, Pending: 3, Available: 5, LowBalanceThreshold: 1, NextExpiry: &at, NextExpiryAmount: &amount,
			Grants: []api.GrantSummary{
				{Id: "g1", Amount: 10, Remaining: 10, Held: 2, Source: "purchase", Category: "paid", Priority: -1, CreatedAt: at, ExpiresAt: &at, EffectiveAt: &at, PaymentId: &payment},
				{Id: "g2\u00e9", Amount: 1 << 62, Remaining: -1, Source: "service", Category: "promo", CreatedAt: at.UTC()},
			}},
		{CustomerId: "nil grants"},
	} {
		var generated api.GetBalance200JSONResponse
		if err := generated.FromBalance(b); err != nil {
			t.Fatal(err)
		}
		want, got := httptest.NewRecorder(), httptest.NewRecorder()
		if err := generated.VisitGetBalanceResponse(want); err != nil {
			t.Fatal(err)
		}
		if err := balanceAnswer(b).VisitGetBalanceResponse(got); err != nil {
			t.Fatal(err)
		}
		if got.Code != want.Code || !reflect.DeepEqual(got.Header(), want.Header()) || got.Body.String() != want.Body.String() {
			t.Errorf("encoded once: %d %v %s\ngenerated: %d %v %s", got.Code, got.Header(), got.Body, want.Code, want.Header(), want.Body)
		}
	}
}
