package credits_test

import (
	"encoding/json"
	"fmt"
	"testing"
	"time"

	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/config"
	"github.com/tallybilling/tally/internal/credits"
	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/errs"
)

func (f *fixture) revoke(customerID, paymentID string, n int64, from string) credits.RevokeResult {
	f.t.Helper()
	var r credits.RevokeResult
	err := db.InTx(f.ctx, f.db, func(tx *gorm.DB) error {
		var err error
		r, err = credits.Revoke(f.ctx, tx, f.clock.Now, credits.RevokeInput{
			CustomerID: customerID, PaymentID: paymentID, Credits: n, Reason: "refund", From: from,
		})
		return err
	})
	if err != nil {
		f.t.Fatalf("revoke %d from %s: %v", n, customerID, err)
	}
	return r
}

func (f *fixture) verifyReport() credits.VerifyReport {
	f.t.Helper()
	rep, err := f.svc.Verify(f.ctx)
	if err != nil {
		f.t.Fatalf("verify: %v", err)
	}
	if !rep.OK {
		f.t.Fatalf("verify found problems: %+v", rep.Problems)
	}
	return rep
}

// A customer spent most of a purchase before its refund: the revoke takes
// what is left of the purchase grant, then the other grants in draw order,
// never below zero, and records the rest as a shortfall.
func TestRevokeTakesFromTheWholeBalanceAndRecordsTheShortfall(t *testing.T) {
	t.Parallel()
	f := newFixture(t, defaultCfg())
	now := f.clock.Now()
	bought := purchase(t, f, "hal", "pay_a", 100)
	f.grant("hal", 30, ptr(now.Add(24*time.Hour)))
	later := f.grant("hal", 50, nil)
	f.mustConsume("hal", 90) // the expiring grant (30), then the purchase (60): 40 of it left

	r := f.revoke("hal", "pay_a", 100, config.RevokeFromBalance)
	want := []credits.Draw{{GrantID: bought.GrantID, Amount: 40}, {GrantID: later.GrantID, Amount: 50}}
	if r.Taken != 90 || r.Shortfall != 10 || r.Balance != 0 || fmt.Sprint(r.Draws) != fmt.Sprint(want) {
		t.Fatalf("revoke = %+v, want 90 taken (draws %v), 10 short, balance 0", r, want)
	}
	e := f.ledger("hal")[0]
	if e.Kind != credits.KindRevoke || e.Amount != -90 || e.Shortfall != 10 || e.GrantID != bought.GrantID ||
		e.PaymentID != "pay_a" || fmt.Sprint(e.Draws) != fmt.Sprint(want) || e.BalanceAfter != 0 {
		t.Fatalf("revoke entry %+v", e)
	}
	var data struct {
		Amount    int64          `json:"amount"`
		Shortfall int64          `json:"shortfall"`
		Draws     []credits.Draw `json:"draws"`
		PaymentID string         `json:"payment_id"`
	}
	var raw string
	if err := f.db.Raw(`SELECT data::text FROM events WHERE type = 'credits.revoked'`).Scan(&raw).Error; err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal([]byte(raw), &data); err != nil || data.Amount != 90 || data.Shortfall != 10 || data.PaymentID != "pay_a" || len(data.Draws) != 2 {
		t.Fatalf("credits.revoked = %s (%v)", raw, err)
	}
	rep := f.verifyReport()
	if len(rep.Receivables) != 1 || rep.Receivables[0] != (credits.Receivable{CustomerID: "hal", Shortfall: 10, Revokes: 1}) {
		t.Fatalf("receivables = %+v, want hal short 10", rep.Receivables)
	}

	// A later grant does not pay the shortfall off: it stays open, and the
	// new credits are spendable.
	f.grant("hal", 25, nil)
	if b := f.balance("hal"); b.Balance != 25 {
		t.Fatalf("balance after a new grant = %d, want 25", b.Balance)
	}
	if rep := f.verifyReport(); len(rep.Receivables) != 1 || rep.Receivables[0].Shortfall != 10 {
		t.Fatalf("receivables after a new grant = %+v", rep.Receivables)
	}

	// Nothing left at all: the revoke takes 0 and records all of it.
	f.mustConsume("hal", 25)
	r = f.revoke("hal", "pay_a", 7, config.RevokeFromBalance)
	if r.Taken != 0 || r.Shortfall != 7 || r.TransactionID == "" {
		t.Fatalf("revoke from an empty balance = %+v, want 7 short in an entry", r)
	}
	if e := f.ledger("hal")[0]; e.Kind != credits.KindRevoke || e.Amount != 0 || e.Shortfall != 7 {
		t.Fatalf("entry of an empty revoke %+v", e)
	}
	if rep := f.verifyReport(); rep.Receivables[0].Shortfall != 17 || rep.Receivables[0].Revokes != 2 {
		t.Fatalf("receivables = %+v, want 17 over 2 revokes", rep.Receivables)
	}
}

// TALLY_REVOKE_FROM=purchase_grant: only what is left of the purchase grant
// is taken; other grants are untouched and nothing is recorded short.
func TestRevokeFromThePurchaseGrantOnly(t *testing.T) {
	t.Parallel()
	f := newFixture(t, defaultCfg())
	bought := purchase(t, f, "ida", "pay_b", 100)
	f.grant("ida", 50, nil)
	f.mustConsume("ida", 90) // both never expire: the purchase, granted first, is drawn first

	r := f.revoke("ida", "pay_b", 100, config.RevokeFromPurchaseGrant)
	if r.Taken != 10 || r.Shortfall != 0 || r.Balance != 50 || len(r.Draws) != 1 || r.Draws[0].GrantID != bought.GrantID {
		t.Fatalf("revoke = %+v, want the 10 left of the purchase only", r)
	}
	r = f.revoke("ida", "pay_b", 5, config.RevokeFromPurchaseGrant)
	if r.Taken != 0 || r.Shortfall != 0 || r.TransactionID != "" {
		t.Fatalf("revoke with nothing left of the purchase = %+v, want nothing written", r)
	}
	if n := f.count(`SELECT count(*) FROM credit_ledger WHERE kind = 'revoke'`); n != 1 {
		t.Fatalf("%d revoke entries, want 1", n)
	}
	if rep := f.verifyReport(); len(rep.Receivables) != 0 {
		t.Fatalf("receivables = %+v, want none", rep.Receivables)
	}
}

// Expired credits are gone already: a revoke neither takes them nor counts them.
func TestRevokeSkipsExpiredGrants(t *testing.T) {
	t.Parallel()
	f := newFixture(t, defaultCfg())
	start := f.clock.Now()
	var bought credits.GrantResult
	err := db.InTx(f.ctx, f.db, func(tx *gorm.DB) error {
		var err error
		bought, err = credits.Grant(f.ctx, tx, f.clock.Now, credits.GrantInput{CustomerID: "joe", Amount: 100, Reason: "pack",
			Source: credits.SourcePurchase, PaymentID: "pay_c", ExpiresAt: ptr(start.Add(time.Hour))})
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	other := f.grant("joe", 40, nil)
	f.clock.Set(start.Add(2 * time.Hour))
	r := f.revoke("joe", "pay_c", 60, config.RevokeFromBalance)
	if r.Taken != 40 || r.Shortfall != 20 || len(r.Draws) != 1 || r.Draws[0].GrantID != other.GrantID {
		t.Fatalf("revoke = %+v, want 40 from the unexpired grant, 20 short (purchase %s expired)", r, bought.GrantID)
	}
	f.verifyReport()
}

func TestRevokeRefusesBadInput(t *testing.T) {
	t.Parallel()
	f := newFixture(t, defaultCfg())
	purchase(t, f, "kim", "pay_d", 10)
	for _, in := range []credits.RevokeInput{
		{CustomerID: "kim", PaymentID: "pay_d", Credits: 0, Reason: "refund", From: config.RevokeFromBalance},
		{CustomerID: "kim", PaymentID: "pay_d", Credits: 1, Reason: "refund", From: "everything"},
		{CustomerID: "kim", PaymentID: "pay_d", Credits: 1, Reason: "", From: config.RevokeFromBalance},
	} {
		err := db.InTx(f.ctx, f.db, func(tx *gorm.DB) error {
			_, err := credits.Revoke(f.ctx, tx, f.clock.Now, in)
			return err
		})
		if !errs.Is(err, errs.Invalid) {
			t.Errorf("revoke %+v: %v, want invalid", in, err)
		}
	}
	if b := f.balance("kim"); b.Balance != 10 {
		t.Fatalf("balance %d after refused revokes, want 10", b.Balance)
	}
}
