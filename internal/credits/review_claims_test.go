package credits_test

import (
	"testing"
	"time"

	"github.com/tallybilling/tally/internal/credits"
)

func (f *fixture) mustVoid(customerID, grantID string) credits.VoidResult {
	f.t.Helper()
	in := credits.VoidInput{CustomerID: customerID, GrantID: grantID, Reason: "granted by mistake"}
	r, _, err := f.svc.Void(f.ctx, in, key(customerID, freshKey(), in))
	if err != nil {
		f.t.Fatalf("void of %s: %v", grantID, err)
	}
	return r
}

// Two holds keep credits of one grant, the grant is voided, and both holds
// expire together: what each gives back is voided once, and the customer's
// next write (and the sweeper) still work.
func TestTwoExpiredHoldsOfOneVoidedGrant(t *testing.T) {
	t.Parallel()
	for _, by := range []string{"sweeper", "next write"} {
		f := newFixture(t, defaultCfg())
		g := f.grant("vic", 1000, nil)
		f.mustHold("vic", 300, time.Minute)
		f.mustHold("vic", 200, time.Minute)
		f.mustVoid("vic", g.GrantID)
		f.grant("vic", 50, nil)
		f.clock.Set(f.clock.Now().Add(2 * time.Minute))
		if by == "sweeper" {
			if _, err := f.sweep.SweepOnce(f.ctx); err != nil {
				t.Fatalf("%s: %v", by, err)
			}
		} else if _, err := f.consume("vic", 10); err != nil {
			t.Fatalf("%s: consume after both holds expired: %v", by, err)
		}
		b := f.balance("vic")
		if b.Held != 0 || b.Balance > 50 {
			t.Fatalf("%s: balance %+v, want the voided grant's credits gone", by, b)
		}
		f.verifyReport()
	}
}
