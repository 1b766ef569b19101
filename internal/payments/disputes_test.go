package payments_test

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/tallybilling/tally/internal/catalog"
	"github.com/tallybilling/tally/internal/config"
	"github.com/tallybilling/tally/internal/credits"
	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/db/dbtest"
	"github.com/tallybilling/tally/internal/payments"
	"github.com/tallybilling/tally/internal/stripeapi"
)

func disputeOf(res payments.CheckoutResult, pi, id, status string, amount int64) payments.Dispute {
	return payments.Dispute{ID: id, Charge: "ch_" + pi, PaymentIntent: pi, Amount: amount, Currency: "usd", Status: status,
		Reason: "fraudulent", Metadata: map[string]string{stripeapi.MetadataPaymentID: res.PaymentID}}
}

// Every stage of one chargeback delivered many times at once, under new and
// repeated event ids and in every order, to services sharing a database:
// one withdrawal, one loss, one event each.
func TestConcurrentDisputeEventsHaveOneEffect(t *testing.T) {
	t.Parallel()
	gdb := dbtest.New(t)
	fake, stripe := fakeClient(t)
	svc := newService(t, gdb, stripe, config.ConfirmOnPaymentIntent)
	other := newService(t, gdb, stripe, config.ConfirmOnPaymentIntent)
	w := newWallet(t, gdb)
	res := paidPack(t, fake, svc, "rush", "pi_rush")
	w.consume("rush", 40)

	stages := []string{"needs_response", "under_review", "lost", "warning_needs_response"}
	var wg sync.WaitGroup
	errc := make(chan error, 48)
	for i := range 48 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s := []*payments.Service{svc, other}[i%2]
			ev := payments.EventRef{ID: fmt.Sprintf("evt_dp_%d", i%12), Type: "charge.dispute.updated"}
			errc <- s.DisputeChanged(context.Background(), ev, disputeOf(res, "pi_rush", "dp_rush", stages[i%4], 1000))
		}()
	}
	wg.Wait()
	close(errc)
	for err := range errc {
		if err != nil {
			t.Fatal(err)
		}
	}
	p, err := svc.Get(context.Background(), res.PaymentID)
	if err != nil || p.Status != payments.DisputeLost || p.AmountDisputed != 1000 || p.CreditsRevoked != 100 {
		t.Fatalf("payment = %+v, %v; want dispute_lost, 1000 disputed, all 100 credits taken back", p, err)
	}
	for q, want := range map[string]int64{
		`SELECT count(*) FROM credit_ledger WHERE kind = 'revoke'`:                              1,
		`SELECT count(*) FROM events WHERE type = 'payment.disputed'`:                           1,
		`SELECT count(*) FROM events WHERE type = 'payment.dispute_lost'`:                       1,
		`SELECT count(*) FROM payment_transitions WHERE applied AND to_status = 'dispute_lost'`: 1,
		// Withdrawn then lost, or first seen lost: at most one move into disputed.
		`SELECT (count(*) <= 1)::int FROM payment_transitions WHERE applied AND to_status = 'disputed'`: 1,
	} {
		if n := count(t, gdb, q); n != want {
			t.Errorf("%s = %d, want %d", q, n, want)
		}
	}
	if got := w.balance("rush"); got != 0 {
		t.Fatalf("balance = %d, want 0 (60 taken, 40 short)", got)
	}
	verifyClean(t, gdb)
}

// A won dispute returns each grant's credits with that grant's expiry;
// credits whose grant expired while the dispute ran do not come back
// (they would have expired anyway; nothing returns already expired).
func TestDisputeWonReturnsCreditsWithTheirExpiry(t *testing.T) {
	t.Parallel()
	gdb := dbtest.New(t)
	fake, stripe := fakeClient(t)
	cat, err := catalog.Parse([]byte(catalogYAML))
	if err != nil {
		t.Fatal(err)
	}
	now := time.Date(2026, 5, 1, 9, 0, 0, 0, time.UTC)
	var mu sync.Mutex
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	o := defaultOptions(gdb)
	o.Stripe, o.Catalog, o.Logger, o.Now = stripe, cat, dbtest.Logger(t), clock
	svc := payments.New(o)
	wallet := credits.New(credits.Options{DB: gdb, Config: config.Default().Credits, Now: clock, Logger: dbtest.Logger(t)})
	ctx := context.Background()
	n := 0
	key := func() db.IdempotencyKey {
		n++
		return db.IdempotencyKey{Scope: "customer:back", Key: fmt.Sprint(n), RequestHash: []byte(fmt.Sprint(n))}
	}

	res := paidPack(t, fake, svc, "back", "pi_back")
	b, err := wallet.Balance(ctx, "back")
	if err != nil || len(b.Grants) != 1 || b.Grants[0].ExpiresAt == nil {
		t.Fatalf("balance after the purchase = %+v, %v; want one expiring grant", b, err)
	}
	pack := *b.Grants[0].ExpiresAt
	if _, _, err := wallet.Consume(ctx, credits.ConsumeInput{CustomerID: "back", Amount: 80, Reason: "use"}, key()); err != nil {
		t.Fatal(err)
	}
	soon := now.Add(24 * time.Hour)
	for _, g := range []credits.GrantInput{
		{CustomerID: "back", Amount: 50, Reason: "promo", ExpiresAt: &soon},
		{CustomerID: "back", Amount: 30, Reason: "gift"},
	} {
		if _, _, err := wallet.Grant(ctx, g, key()); err != nil {
			t.Fatal(err)
		}
	}
	// Withdrawn: 20 left of the pack, then the promo (soonest expiry), then the gift.
	if err := svc.DisputeChanged(ctx, payments.EventRef{ID: "evt_open", Type: "charge.dispute.created"},
		disputeOf(res, "pi_back", "dp_back", "needs_response", 1000)); err != nil {
		t.Fatal(err)
	}
	if b, _ = wallet.Balance(ctx, "back"); b.Balance != 0 {
		t.Fatalf("balance while disputed = %d, want 0", b.Balance)
	}
	mu.Lock()
	now = now.Add(48 * time.Hour) // the promo's expiry passes during the dispute
	mu.Unlock()
	if err := svc.DisputeChanged(ctx, payments.EventRef{ID: "evt_won", Type: "charge.dispute.closed"},
		disputeOf(res, "pi_back", "dp_back", "won", 1000)); err != nil {
		t.Fatal(err)
	}
	b, err = wallet.Balance(ctx, "back")
	if err != nil {
		t.Fatal(err)
	}
	if b.Balance != 50 || len(b.Grants) != 2 ||
		b.Grants[0].Source != credits.SourceDisputeWon || b.Grants[0].Remaining != 20 || b.Grants[0].ExpiresAt == nil || !b.Grants[0].ExpiresAt.Equal(pack) ||
		b.Grants[1].Source != credits.SourceDisputeWon || b.Grants[1].Remaining != 30 || b.Grants[1].ExpiresAt != nil {
		t.Fatalf("balance after the win = %+v; want 20 expiring with the pack (%s) and 30 that never expire", b, pack)
	}
	var won struct{ CreditsRestored, CreditsExpired int64 }
	if r := gdb.Raw(`SELECT credits_restored, credits_expired FROM payment_disputes WHERE stripe_dispute_id = 'dp_back'`).Scan(&won); r.Error != nil || r.RowsAffected != 1 {
		t.Fatalf("dispute dp_back: %v (%d rows)", r.Error, r.RowsAffected)
	}
	if restored, expired := won.CreditsRestored, won.CreditsExpired; restored != 50 || expired != 50 {
		t.Fatalf("restored %d and expired %d, want 50 and 50", restored, expired)
	}
	p, err := svc.Get(ctx, res.PaymentID)
	if err != nil || p.Status != payments.Succeeded || p.AmountDisputed != 0 || p.CreditsRevoked != 0 {
		t.Fatalf("payment = %+v, %v; want succeeded again with nothing taken back", p, err)
	}
	verifyClean(t, gdb)
}

// verify names a payment whose dispute bookkeeping disagrees.
func TestVerifyChecksDisputes(t *testing.T) {
	t.Parallel()
	gdb := dbtest.New(t)
	fake, stripe := fakeClient(t)
	svc := newService(t, gdb, stripe, config.ConfirmOnPaymentIntent)
	ctx := context.Background()
	res := paidPack(t, fake, svc, "tamper", "pi_tamper")
	for i, st := range []string{"needs_response", "won"} {
		if err := svc.DisputeChanged(ctx, payments.EventRef{ID: fmt.Sprintf("evt_t%d", i), Type: "charge.dispute.updated"},
			disputeOf(res, "pi_tamper", "dp_tamper", st, 1000)); err != nil {
			t.Fatal(err)
		}
	}
	verifyClean(t, gdb)
	for _, c := range []struct{ tamper, kind string }{
		{`UPDATE payments SET amount_disputed = 5`, "dispute_amount_mismatch"},
		{`UPDATE payment_disputes SET credits_restored = 10`, "dispute_won_grants_mismatch"},
		{`UPDATE payment_disputes SET credits_shortfall = 3`, "dispute_revoke_mismatch"},
		{`UPDATE payments SET credits_revoked = 100`, "revoke_ledger_mismatch"},
	} {
		tx := gdb.Begin()
		if err := tx.Exec(c.tamper).Error; err != nil {
			t.Fatal(err)
		}
		problems, _, err := payments.Verify(ctx, tx)
		tx.Rollback()
		found := false
		for _, p := range problems {
			found = found || (p.Kind == c.kind && p.PaymentID == res.PaymentID)
		}
		if err != nil || !found {
			t.Errorf("after %q: problems %+v (%v), want %s", c.tamper, problems, err, c.kind)
		}
	}
}
