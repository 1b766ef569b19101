package credits_test

import (
	"testing"
	"time"

	"github.com/tallybilling/tally/internal/config"
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

// A hold keeps credits of a grant that expired before the refund and of the
// refunded purchase. The refund claims only the purchase's part (the
// expired credits would never come back spendable); when the hold ends, it
// is paid from that part, never from the expired credits, which expire.
func TestAClaimIsNotPaidWithCreditsDeadBeforeIt(t *testing.T) {
	t.Parallel()
	f := newFixture(t, defaultCfg())
	soon := f.clock.Now().Add(time.Minute)
	f.grant("exa", 800, &soon)
	purchase(t, f, "exa", "pay_ex", 200)
	h := f.mustHold("exa", 1000, time.Hour)
	f.clock.Set(f.clock.Now().Add(2 * time.Minute))
	if r := f.revoke("exa", "pay_ex", 200, config.RevokeFromBalance); r.Taken != 0 || r.Shortfall != 200 {
		t.Fatalf("revoke = %+v, want 200 short", r)
	}
	if _, err := f.release("exa", h.HoldID); err != nil {
		t.Fatal(err)
	}
	if b := f.balance("exa"); b.Balance != 0 || b.Available != 0 {
		t.Fatalf("balance %+v after the release, want 0: the refunded credits came back spendable", b)
	}
	if got := f.receivable("exa"); got != 0 {
		t.Fatalf("receivable %d, want 0", got)
	}
	f.verifyReport()
}

// A refund claims what a hold keeps of a grant that is voided later: the
// release voids it, and the refund still counts it as taken back, as it
// would have taken it had the hold not been there. The customer never owes
// credits it no longer has.
func TestClaimedCreditsOfAVoidedGrantAreNotOwedTwice(t *testing.T) {
	t.Parallel()
	f := newFixture(t, defaultCfg())
	bought, h, _ := heldRefund(t, f, "val", "pay_rv", 0)
	f.clock.Set(f.clock.Now().Add(time.Second))
	f.mustVoid("val", bought.GrantID)
	if _, err := f.release("val", h.HoldID); err != nil {
		t.Fatal(err)
	}
	if b := f.balance("val"); b.Balance != 0 {
		t.Fatalf("balance %+v after the release, want 0", b)
	}
	if got := f.receivable("val"); got != 200 {
		t.Fatalf("receivable %d, want only the 200 spent before the refund (800 came back and are gone)", got)
	}
	f.verifyReport()
}

// The capture spends the refunded purchase's credits the hold kept (drawn
// first) and gives back only credits of a grant that expired before the
// refund: those never pay the claim, so what was spent stays owed.
func TestCapturedRefundedCreditsStayOwedWhenOnlyDeadCreditsComeBack(t *testing.T) {
	t.Parallel()
	f := newFixture(t, defaultCfg())
	purchase(t, f, "cap", "pay_cap", 500)
	soon, late := f.clock.Now().Add(time.Minute), 90
	f.grantWith(credits.GrantInput{CustomerID: "cap", Amount: 500, ExpiresAt: &soon, Priority: &late})
	h := f.mustHold("cap", 1000, time.Hour)
	f.clock.Set(f.clock.Now().Add(2 * time.Minute))
	if r := f.revoke("cap", "pay_cap", 500, config.RevokeFromBalance); r.Shortfall != 500 {
		t.Fatalf("revoke = %+v, want 500 short", r)
	}
	if _, _, err := f.capture("cap", h.HoldID, ptr(int64(500)), "cap-500"); err != nil {
		t.Fatal(err)
	}
	if b := f.balance("cap"); b.Balance != 0 {
		t.Fatalf("balance %+v, want 0", b)
	}
	if got := f.receivable("cap"); got != 500 {
		t.Fatalf("receivable %d, want the 500 refunded credits the capture spent", got)
	}
	f.verifyReport()
}
