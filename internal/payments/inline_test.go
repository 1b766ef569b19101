package payments_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/config"
	"github.com/tallybilling/tally/internal/credits"
	"github.com/tallybilling/tally/internal/db/dbtest"
	"github.com/tallybilling/tally/internal/payments"
	"github.com/tallybilling/tally/internal/stripeapi"
)

// inlineStore is an InlineStore over stripe_events as the webhook intake's
// is, for event id: errStored when a copy stored it first.
func inlineStore(id string) *payments.InlineStore {
	return &payments.InlineStore{
		Store: func(ctx context.Context, tx *gorm.DB, processed bool) error {
			status := "processed"
			if !processed {
				status = "received"
			}
			r := tx.WithContext(ctx).Exec(`INSERT INTO stripe_events (id, type, livemode, payload, status, attempts)
				VALUES (?, 'payment_intent.succeeded', false, '{}', ?, 1) ON CONFLICT DO NOTHING`, id, status)
			if r.Error != nil {
				return r.Error
			}
			if r.RowsAffected == 0 {
				return errStored
			}
			return nil
		},
		Pending: func(ctx context.Context, tx *gorm.DB) error {
			return tx.WithContext(ctx).Exec(`UPDATE stripe_events SET status = 'received', attempts = 0 WHERE id = ?`, id).Error
		},
	}
}

var errStored = errors.New("stored by a copy first")

// A copy of a delivery racing the first waits on the event's insert, the
// first statement of the payment's transaction, holding nothing; when the
// first's transaction then rolls back (it failed after storing), the copy
// stores and applies the event itself: credited once, by the copy, and the
// first learns that it stored nothing.
func TestInlineStoreCopyTakesOverWhenTheFirstRollsBack(t *testing.T) {
	t.Parallel()
	gdb := dbtest.New(t)
	fake, stripe := fakeClient(t)
	svc := newService(t, gdb, stripe, config.ConfirmOnPaymentIntent)
	ctx := context.Background()
	res := buy(t, svc, "copier", "starter", 1)
	payAtStripe(t, fake, res, "pi_copy")
	pi := payments.PaymentIntent{ID: "pi_copy", Amount: 1000, AmountReceived: 1000, Currency: "usd", Status: "succeeded",
		Metadata: map[string]string{stripeapi.MetadataPaymentID: res.PaymentID}}
	ref := payments.EventRef{ID: "evt_copy", Type: "payment_intent.succeeded", Created: time.Now().Unix()}
	// The session event that links the PaymentIntent first, as Stripe
	// sends it: the success then needs no question to Stripe.
	total := int64(1000)
	err := svc.CheckoutSessionCompleted(ctx, payments.EventRef{ID: "evt_cs", Type: "checkout.session.completed"}, payments.CheckoutSession{
		ID: res.CheckoutSessionID, Mode: "payment", Status: "complete", PaymentStatus: "paid", PaymentIntent: "pi_copy",
		AmountSubtotal: &total, AmountTotal: &total, Currency: "usd", Metadata: map[string]string{stripeapi.MetadataPaymentID: res.PaymentID}})
	if err != nil {
		t.Fatal(err)
	}

	errBoom := errors.New("boom")
	stored, release := make(chan struct{}), make(chan struct{})
	first := inlineStore("evt_copy")
	insert := first.Store
	first.Store = func(ctx context.Context, tx *gorm.DB, processed bool) error {
		if err := insert(ctx, tx, processed); err != nil {
			return err
		}
		close(stored)
		<-release
		return errBoom // fails after storing: its transaction rolls back
	}
	firstErr := make(chan error, 1)
	go func() {
		ref := ref
		ref.Inline = first
		firstErr <- svc.PaymentIntentSucceeded(ctx, ref, pi)
	}()
	<-stored
	copied := inlineStore("evt_copy")
	copyErr := make(chan error, 1)
	go func() {
		ref := ref
		ref.Inline = copied
		copyErr <- svc.PaymentIntentSucceeded(ctx, ref, pi)
	}()
	// The copy waits on the first's insert.
	deadline := time.Now().Add(10 * time.Second)
	for count(t, gdb, `SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'`) == 0 {
		if time.Now().After(deadline) {
			t.Fatal("the copy never waited for the first's transaction")
		}
		time.Sleep(10 * time.Millisecond)
	}
	close(release)
	if err := <-firstErr; !errors.Is(err, errBoom) {
		t.Fatalf("first = %v, want its failure", err)
	}
	if err := <-copyErr; err != nil {
		t.Fatalf("copy = %v", err)
	}
	if s, p := first.Stored(); s || p {
		t.Fatalf("first Stored() = %t, %t; want nothing stored (rolled back)", s, p)
	}
	if s, p := copied.Stored(); !s || !p {
		t.Fatalf("copy Stored() = %t, %t; want stored as processed", s, p)
	}
	if n := count(t, gdb, `SELECT count(*) FROM stripe_events WHERE id = 'evt_copy' AND status = 'processed'`); n != 1 {
		t.Fatalf("%d processed rows of the event, want 1", n)
	}
	b, err := credits.New(credits.Options{DB: gdb, Config: config.Default().Credits}).Balance(ctx, "copier")
	if err != nil || b.Balance != 100 {
		t.Fatalf("balance = %+v, %v; want 100 (credited once)", b, err)
	}
	if n := count(t, gdb, `SELECT count(*) FROM payment_confirmations WHERE payment_id = ?`, res.PaymentID); n != 1 {
		t.Fatalf("%d confirmations, want 1", n)
	}
	verifyClean(t, gdb)
}
