package credits_test

import (
	"testing"
	"time"

	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/config"
	"github.com/tallybilling/tally/internal/credits"
	"github.com/tallybilling/tally/internal/db"
)

// heldRefund is a customer who bought 1,000 credits, holds 800 of them and
// spent the other 200, and then had the purchase refunded: the revoke could
// take nothing (what is not held is spent) and recorded 1,000 short.
func heldRefund(t *testing.T, f *fixture, customerID, paymentID string, expiresIn time.Duration) (credits.GrantResult, credits.HoldResult, credits.RevokeResult) {
	t.Helper()
	bought := purchase(t, f, customerID, paymentID, 1000)
	h := f.mustHold(customerID, 800, expiresIn)
	f.mustConsume(customerID, 200)
	r := f.revoke(customerID, paymentID, 1000, config.RevokeFromBalance)
	if r.Taken != 0 || r.Shortfall != 1000 {
		t.Fatalf("revoke while 800 are held = %+v, want nothing taken, 1000 short", r)
	}
	return bought, h, r
}

func (f *fixture) receivable(customerID string) int64 {
	f.t.Helper()
	for _, r := range f.verifyReport().Receivables {
		if r.CustomerID == customerID {
			return r.Shortfall
		}
	}
	return 0
}

// wantRecovered checks the customer's newest entry is the revoke that took
// n of what the hold gave back, for the refund's payment.
func (f *fixture) wantRecovered(customerID, paymentID, holdID string, n int64) {
	f.t.Helper()
	e := f.ledger(customerID)[0]
	if e.Kind != credits.KindRevoke || e.Amount != -n || e.PaymentID != paymentID || e.Metadata["hold_id"] != holdID || e.Shortfall != 0 || e.Metadata["recovers_transaction_id"] == "" {
		f.t.Fatalf("newest entry %+v, want a revoke of %d for %s naming hold %s and the revoke it recovers for", e, n, paymentID, holdID)
	}
}

// A hold only defers a refund's revoke: what the hold gives back goes to the
// shortfall first, so a release never makes refunded credits spendable.
func TestReleasedHeldCreditsPayARefundsShortfall(t *testing.T) {
	t.Parallel()
	f := newFixture(t, defaultCfg())
	_, h, _ := heldRefund(t, f, "amy", "pay_h1", 0)

	end, err := f.release("amy", h.HoldID)
	if err != nil {
		t.Fatal(err)
	}
	if end.Released != 800 || end.Balance != 0 || end.Available != 0 {
		t.Fatalf("release answer %+v, want 800 released and taken by the refund: balance 0", end)
	}
	if b := f.balance("amy"); b.Balance != 0 || b.Available != 0 || b.Held != 0 {
		t.Fatalf("balance %+v after the release, want nothing", b)
	}
	f.wantRecovered("amy", "pay_h1", h.HoldID, 800)
	if got := f.receivable("amy"); got != 200 {
		t.Fatalf("receivable %d, want the 200 spent before the refund", got)
	}
	if _, err := f.consume("amy", 1); err == nil {
		t.Fatal("a consume after the release spent refunded credits")
	}
}

// A capture spends what it captures (that stays owed); the rest pays the
// shortfall.
func TestCaptureAfterRefundPaysTheShortfallWithWhatItDoesNotSpend(t *testing.T) {
	t.Parallel()
	f := newFixture(t, defaultCfg())
	_, h, _ := heldRefund(t, f, "bea", "pay_h2", 0)

	end, _, err := f.capture("bea", h.HoldID, ptr(int64(300)), "cap-bea")
	if err != nil {
		t.Fatal(err)
	}
	if end.Captured != 300 || end.Released != 500 || end.Balance != 0 || end.Available != 0 {
		t.Fatalf("capture answer %+v, want 300 captured, 500 back and taken", end)
	}
	f.wantRecovered("bea", "pay_h2", h.HoldID, 500)
	if got := f.receivable("bea"); got != 500 {
		t.Fatalf("receivable %d, want 200 spent before plus 300 captured after", got)
	}
}

// The sweeper's expiry of an overdue hold gives back like a release.
func TestExpiredHoldPaysTheShortfall(t *testing.T) {
	t.Parallel()
	f := newFixture(t, defaultCfg())
	_, h, _ := heldRefund(t, f, "cal", "pay_h3", time.Minute)
	f.clock.Set(f.clock.Now().Add(2 * time.Minute))
	if _, err := f.sweep.SweepOnce(f.ctx); err != nil {
		t.Fatal(err)
	}
	if b := f.balance("cal"); b.Balance != 0 || b.Available != 0 || b.Held != 0 {
		t.Fatalf("balance %+v after the hold expired, want nothing", b)
	}
	f.wantRecovered("cal", "pay_h3", h.HoldID, 800)
	if got := f.receivable("cal"); got != 200 {
		t.Fatalf("receivable %d, want 200", got)
	}
}

// A hold placed after the refund holds credits granted after it, which
// never pay an older shortfall; a second refund's shortfall only claims
// what earlier claims left of a hold.
func TestOnlyHoldsOpenAtTheRevokePayItsShortfall(t *testing.T) {
	t.Parallel()
	f := newFixture(t, defaultCfg())
	heldRefund(t, f, "dan", "pay_h4", 0)
	f.grant("dan", 50, nil)
	later := f.mustHold("dan", 50, 0)
	if _, err := f.release("dan", later.HoldID); err != nil {
		t.Fatal(err)
	}
	if b := f.balance("dan"); b.Available != 50 || b.Held != 800 {
		t.Fatalf("balance %+v, want the later grant's 50 spendable", b)
	}

	// Two refunds share one hold of 800: the first claims 800 of it, the
	// second nothing more.
	f2 := newFixture(t, defaultCfg())
	purchase(t, f2, "eve", "pay_h5", 500)
	purchase(t, f2, "eve", "pay_h6", 500)
	h := f2.mustHold("eve", 800, 0)
	f2.mustConsume("eve", 200)
	f2.revoke("eve", "pay_h5", 500, config.RevokeFromBalance)
	f2.revoke("eve", "pay_h6", 500, config.RevokeFromBalance)
	if got := f2.receivable("eve"); got != 1000 {
		t.Fatalf("receivable %d before the release, want 1000", got)
	}
	if _, err := f2.release("eve", h.HoldID); err != nil {
		t.Fatal(err)
	}
	if b := f2.balance("eve"); b.Balance != 0 {
		t.Fatalf("balance %+v after the release, want 0", b)
	}
	if got := f2.receivable("eve"); got != 200 {
		t.Fatalf("receivable %d after the release, want 200", got)
	}
}

func (f *fixture) restore(customerID, paymentID, revokeID string) credits.RestoreResult {
	f.t.Helper()
	var r credits.RestoreResult
	err := db.InTx(f.ctx, f.db, func(tx *gorm.DB) error {
		var err error
		r, err = credits.Restore(f.ctx, tx, f.clock.Now, credits.RestoreInput{
			CustomerID: customerID, PaymentID: paymentID, RevokeTransactionID: revokeID, Reason: "dispute won",
		})
		return err
	})
	if err != nil {
		f.t.Fatalf("restore of %s: %v", revokeID, err)
	}
	return r
}

// A dispute won gives back everything its revoke took, also what a hold
// paid later; won before the release, the hold's credits stay the
// customer's.
func TestDisputeWonGivesBackWhatAHoldPaid(t *testing.T) {
	t.Parallel()
	f := newFixture(t, defaultCfg())
	_, h, r := heldRefund(t, f, "fay", "pay_h7", 0)
	if _, err := f.release("fay", h.HoldID); err != nil {
		t.Fatal(err)
	}
	res := f.restore("fay", "pay_h7", r.TransactionID)
	if res.Restored != 800 || res.ShortfallSettled != 200 {
		t.Fatalf("restore = %+v, want 800 back and the 200 still owed settled", res)
	}
	if b := f.balance("fay"); b.Balance != 800 || b.Available != 800 {
		t.Fatalf("balance %+v, want 800", b)
	}
	if got := f.receivable("fay"); got != 0 {
		t.Fatalf("receivable %d, want none", got)
	}

	f2 := newFixture(t, defaultCfg())
	_, h2, r2 := heldRefund(t, f2, "gus", "pay_h8", 0)
	res = f2.restore("gus", "pay_h8", r2.TransactionID)
	if res.Restored != 0 || res.ShortfallSettled != 1000 {
		t.Fatalf("restore before the release = %+v, want nothing to give back, 1000 settled", res)
	}
	if _, err := f2.release("gus", h2.HoldID); err != nil {
		t.Fatal(err)
	}
	if b := f2.balance("gus"); b.Balance != 800 || b.Available != 800 {
		t.Fatalf("balance %+v after a release once the dispute was won, want 800", b)
	}
	f2.verifyReport()
}

// Verify notices a hold whose claims were lost, and a shortfall whose
// recovered no revoke entry accounts for.
func TestVerifyDetectsBrokenHoldClaims(t *testing.T) {
	t.Parallel()
	for name, corrupt := range map[string]string{
		"claim lost":         `UPDATE credit_holds SET claimed = 0`,
		"recovered unearned": `UPDATE credit_shortfalls SET recovered = 100`,
		"claim ended unpaid": `UPDATE credit_hold_claims SET ended_at = now(), recovered = 0`,
	} {
		f := newFixture(t, defaultCfg())
		heldRefund(t, f, "ike", "pay_v1", 0)
		f.mustVerify()
		if err := f.db.Exec(corrupt).Error; err != nil {
			t.Fatal(err)
		}
		rep, err := f.svc.Verify(f.ctx)
		if err != nil {
			t.Fatal(err)
		}
		if rep.OK || rep.Problems[0].Kind != credits.ProblemHoldClaims {
			t.Errorf("%s: report %+v, want hold_claims", name, rep.Problems)
		}
	}
}
