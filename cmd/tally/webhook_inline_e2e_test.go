package main

import (
	"encoding/json"
	"net/http"
	"sync"
	"testing"
	"time"

	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/stripeapi/stripefake"
)

// storedEvent is a stripe_events row as the inline store leaves it.
type storedEvent struct {
	Status        string
	Attempts      int
	NextAttemptAt *time.Time
	ProcessedAt   *time.Time
	LastError     *string
}

func loadStoredEvent(t *testing.T, gdb *gorm.DB, id string) storedEvent {
	t.Helper()
	var e storedEvent
	res := gdb.Raw(`SELECT status, attempts, next_attempt_at, processed_at, last_error FROM stripe_events WHERE id = ?`, id).Scan(&e)
	if res.Error != nil || res.RowsAffected != 1 {
		t.Fatalf("stored event %s: %v (%d rows)", id, res.Error, res.RowsAffected)
	}
	return e
}

// TestDeliveryStoredByThePaymentTransaction: checkout.session.completed
// and payment_intent.succeeded are stored by the transaction that applies
// them (payments.InlineStore): processed after one attempt, nothing left
// for the retry worker, whether each arrives once or as concurrent copies
// to two instances; every copy is acknowledged, and the payment is
// credited once. A delivery whose processing is refused rolls that
// transaction back and is still stored, parked, with nothing applied; one
// whose processing needs a step after the payment's transaction (the
// legacy strategy's session confirmation) is stored before that step and
// recorded processed after it.
func TestDeliveryStoredByThePaymentTransaction(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	envA := payEnv(t, fake.URL())
	a, b := twoServers(t, envA)
	gdb := openDB(t, a)

	for i, copies := range []int{1, 6} {
		customer := []string{"inline-once", "inline-copies"}[i]
		pay := checkout(t, a, customer, "starter", 1)
		p := getPayment(t, a, pay)
		csID, piEventID := newEventID(), newEventID()
		for _, ev := range []struct {
			id   string
			body []byte
		}{
			{csID, stripeEvent(csID, "checkout.session.completed", checkoutSession(pay, customer, *p.CheckoutSessionId, "complete", "paid", starterAmount))},
			{piEventID, stripeEvent(piEventID, "payment_intent.succeeded", paymentIntent(pay, customer, "succeeded", starterAmount, starterAmount, "usd"))},
		} {
			var wg sync.WaitGroup
			acks := make(chan string, copies)
			for k := range copies {
				wg.Go(func() {
					st, out := postWebhook(t, []*server{a, b}[k%2], ev.body, sign(ev.body, testWebhookSecret, time.Now()))
					if st != http.StatusOK {
						t.Errorf("%s: a copy got %d: %s", ev.id, st, out)
						return
					}
					var ack struct {
						Status    string `json:"status"`
						Duplicate bool   `json:"duplicate"`
					}
					if err := json.Unmarshal(out, &ack); err != nil {
						t.Errorf("%s: ack %s: %v", ev.id, out, err)
					}
					if !ack.Duplicate {
						acks <- ack.Status
					}
				})
			}
			wg.Wait()
			close(acks)
			var first []string
			for st := range acks {
				first = append(first, st)
			}
			if len(first) != 1 || first[0] != "processed" {
				t.Fatalf("%s: %d copies, the ones not answered as duplicates said %v; want exactly one, processed", ev.id, copies, first)
			}
			e := loadStoredEvent(t, gdb, ev.id)
			if e.Status != "processed" || e.Attempts != 1 || e.NextAttemptAt != nil || e.ProcessedAt == nil || e.LastError != nil {
				t.Fatalf("%s stored as %+v; want processed after 1 attempt, nothing due", ev.id, e)
			}
		}
		if got := balanceOf(t, gdb, customer); got != starterCredits {
			t.Fatalf("%s: balance %d, want %d (credited once)", customer, got, starterCredits)
		}
		if n := countRows(t, gdb, `SELECT count(*) FROM payment_confirmations WHERE payment_id = ?`, pay); n != 1 {
			t.Fatalf("%s: %d confirmations, want 1", customer, n)
		}
	}

	// Refused (the amount is not the price): the payment's transaction
	// rolled back, the event is stored all the same, parked.
	pay := checkout(t, a, "inline-refused", "starter", 1)
	paidAtStripe(t, fake, a, pay)
	refused := newEventID()
	deliver(t, a, stripeEvent(refused, "payment_intent.succeeded", paymentIntent(pay, "inline-refused", "succeeded", starterAmount-1, starterAmount-1, "usd")))
	if e := loadStoredEvent(t, gdb, refused); e.Status != "parked" || e.Attempts != 1 || e.LastError == nil {
		t.Fatalf("refused event stored as %+v; want parked after 1 attempt with its reason", e)
	}
	if got := balanceOf(t, gdb, "inline-refused"); got != 0 {
		t.Fatalf("a refused success credited %d", got)
	}
	if n := countRows(t, gdb, `SELECT count(*) FROM payment_confirmations WHERE payment_id = ?`, pay); n != 0 {
		t.Fatalf("a refused success left %d confirmations", n)
	}
	assertInvariants(t, a)

	// The legacy strategy: linking the session is stored first (a step
	// follows it in another transaction), then recorded processed.
	a.shutdown(t)
	b.shutdown(t)
	envA["TALLY_CONFIRM_ON"] = "checkout_session"
	s := startServer(t, envA)
	legacy := checkout(t, s, "inline-legacy", "starter", 1)
	lp := getPayment(t, s, legacy)
	completed := newEventID()
	deliver(t, s, stripeEvent(completed, "checkout.session.completed", checkoutSession(legacy, "inline-legacy", *lp.CheckoutSessionId, "complete", "paid", starterAmount)))
	if e := loadStoredEvent(t, gdb, completed); e.Status != "processed" || e.Attempts != 1 || e.NextAttemptAt != nil || e.ProcessedAt == nil {
		t.Fatalf("legacy completion stored as %+v; want processed after 1 attempt", e)
	}
	if got := balanceOf(t, gdb, "inline-legacy"); got != starterCredits {
		t.Fatalf("legacy completion credited %d, want %d", got, starterCredits)
	}
	assertInvariants(t, s)
}
