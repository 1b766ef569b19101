package main

import (
	"context"
	"net/http"
	"strings"
	"testing"

	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/stripeapi"
	"github.com/tallybilling/tally/internal/stripeapi/stripefake"
	"github.com/tallybilling/tally/pkg/client"
)

func paymentEvents(t testing.TB, gdb *gorm.DB, pay, typ string) int64 {
	t.Helper()
	return countRows(t, gdb, `SELECT count(*) FROM events WHERE type = ? AND data->>'payment_id' = ?`, typ, pay)
}

func moves(p client.Payment) string {
	var out []string
	for _, tr := range p.Transitions {
		if tr.Applied {
			out = append(out, move(tr))
		}
	}
	return strings.Join(out, " ")
}

// TestDisputes drives chargebacks through signed webhooks: a dispute opened
// after the credits were partly spent takes back the disputed share from
// the whole balance; won, the credits come back with their expiry; lost,
// the payment ends dispute_lost. Inquiries only record, and redeliveries,
// reordering and replays have one effect each.
func TestDisputes(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	s := startServer(t, payEnv(t, fake.URL()))
	gdb := openDB(t, s)
	svc := s.service(t)
	ctx := context.Background()

	t.Run("lost after spending", func(t *testing.T) {
		grantOverHTTP(t, svc, "dp-lost", 100, "dp-lost-welcome")
		pay := buyStarter(t, fake, s, "dp-lost")
		consumeOverHTTP(t, s, "dp-lost", 600) // from the purchase (it expires first): 400 left
		d := dispute(pay, "dp_lost_1", "needs_response", starterAmount)
		deliver(t, s, disputeEvent("created", d))
		p := getPayment(t, s, pay)
		if p.Status != client.PaymentStatusDisputed || p.AmountDisputed != starterAmount {
			t.Fatalf("after the dispute opened: %+v", p)
		}
		if b := balanceOverHTTP(t, svc, "dp-lost"); b.Balance != 0 {
			t.Fatalf("balance = %d, want 0 (400 left of the purchase and the 100 others taken, 500 short)", b.Balance)
		}
		e := ledgerOverHTTP(t, svc, "dp-lost")[0]
		if e.Kind != client.Revoke || e.Amount != -500 || e.Shortfall == nil || *e.Shortfall != 500 {
			t.Fatalf("revoke entry %+v, want -500 with 500 short", e)
		}
		// The same state again under new event ids, and the dispute moving on.
		deliver(t, s, disputeEvent("funds_withdrawn", d))
		d["status"] = "under_review"
		deliver(t, s, disputeEvent("updated", d))
		if n := countRows(t, gdb, `SELECT count(*) FROM credit_ledger WHERE customer_id = 'dp-lost' AND kind = 'revoke'`); n != 1 {
			t.Fatalf("%d revoke entries, want 1", n)
		}
		d["status"] = "lost"
		closed := disputeEvent("closed", d)
		deliver(t, s, closed)
		deliver(t, s, closed) // a redelivery of the same event
		p = getPayment(t, s, pay)
		if p.Status != client.PaymentStatusDisputeLost || p.AmountDisputed != starterAmount {
			t.Fatalf("after the dispute was lost: %+v", p)
		}
		if got := moves(p); got != ">pending pending>succeeded succeeded>disputed disputed>dispute_lost" {
			t.Fatalf("moves = %s", got)
		}
		for typ, want := range map[string]int64{"payment.disputed": 1, "payment.dispute_lost": 1, "payment.dispute_won": 0} {
			if n := paymentEvents(t, gdb, pay, typ); n != want {
				t.Fatalf("%d %s events, want %d", n, typ, want)
			}
		}
		if b := balanceOverHTTP(t, svc, "dp-lost"); b.Balance != 0 {
			t.Fatalf("balance after the loss = %d, want 0", b.Balance)
		}
	})

	t.Run("won", func(t *testing.T) {
		pay := buyStarter(t, fake, s, "dp-won")
		consumeOverHTTP(t, s, "dp-won", 300)
		purchase := balanceOverHTTP(t, svc, "dp-won").Grants[0]
		d := dispute(pay, "dp_won_1", "needs_response", starterAmount)
		deliver(t, s, disputeEvent("created", d))
		if b := balanceOverHTTP(t, svc, "dp-won"); b.Balance != 0 {
			t.Fatalf("balance while disputed = %d, want 0", b.Balance)
		}
		d["status"] = "won"
		won := disputeEvent("closed", d)
		deliver(t, s, won)
		deliver(t, s, disputeEvent("funds_reinstated", d))
		p := getPayment(t, s, pay)
		if p.Status != client.PaymentStatusSucceeded || p.AmountDisputed != 0 {
			t.Fatalf("after the dispute was won: %+v", p)
		}
		if got := moves(p); got != ">pending pending>succeeded succeeded>disputed disputed>succeeded" {
			t.Fatalf("moves = %s", got)
		}
		b := balanceOverHTTP(t, svc, "dp-won")
		if b.Balance != 700 || len(b.Grants) != 1 || b.Grants[0].Source != client.DisputeWon ||
			b.Grants[0].Remaining != 700 || b.Grants[0].ExpiresAt == nil || !b.Grants[0].ExpiresAt.Equal(*purchase.ExpiresAt) {
			t.Fatalf("balance after the win = %+v, want the 700 taken back as a dispute_won grant expiring with the purchase (%v)", b, purchase.ExpiresAt)
		}
		if n := paymentEvents(t, gdb, pay, "payment.dispute_won"); n != 1 {
			t.Fatalf("%d payment.dispute_won events, want 1", n)
		}
		// An operator replaying the win changes nothing more.
		var wonID string
		if err := gdb.Raw(`SELECT id FROM stripe_events WHERE type = 'charge.dispute.closed' AND payload LIKE '%dp_won_1%'`).Scan(&wonID).Error; err != nil || wonID == "" {
			t.Fatalf("stored win: %q %v", wonID, err)
		}
		r, err := s.admin(t).ReplayStripeEventWithResponse(ctx, wonID)
		if err != nil {
			t.Fatal(err)
		}
		mustStatus(t, "replay", r.StatusCode(), r.Body, http.StatusOK)
		if b := balanceOverHTTP(t, svc, "dp-won"); b.Balance != 700 {
			t.Fatalf("balance after replaying the win = %d, want 700", b.Balance)
		}
	})

	t.Run("won after a partial refund", func(t *testing.T) {
		pay := buyStarter(t, fake, s, "dp-refunded")
		deliver(t, s, stripeEvent(newEventID(), "charge.refunded", refundedCharge(pay, starterAmount, 400)))
		d := dispute(pay, "dp_refunded_1", "needs_response", starterAmount-400)
		deliver(t, s, disputeEvent("created", d))
		if b := balanceOverHTTP(t, svc, "dp-refunded"); b.Balance != 0 {
			t.Fatalf("balance refunded and disputed = %d, want 0", b.Balance)
		}
		d["status"] = "won"
		deliver(t, s, disputeEvent("closed", d))
		p := getPayment(t, s, pay)
		if p.Status != client.PaymentStatusRefunded || p.AmountRefunded != 400 || p.AmountDisputed != 0 {
			t.Fatalf("after the win: %+v, want back to refunded", p)
		}
		if b := balanceOverHTTP(t, svc, "dp-refunded"); b.Balance != 600 {
			t.Fatalf("balance = %d, want the 600 not refunded", b.Balance)
		}
	})

	t.Run("an inquiry only records", func(t *testing.T) {
		pay := buyStarter(t, fake, s, "dp-inquiry")
		d := dispute(pay, "dp_inquiry_1", "warning_needs_response", starterAmount)
		deliver(t, s, disputeEvent("created", d))
		d["status"] = "warning_closed"
		deliver(t, s, disputeEvent("closed", d))
		p := getPayment(t, s, pay)
		if p.Status != client.PaymentStatusSucceeded || p.AmountDisputed != 0 {
			t.Fatalf("after an inquiry: %+v", p)
		}
		if last := p.Transitions[len(p.Transitions)-1]; last.Applied || last.Reason == nil || !strings.Contains(*last.Reason, "warning_closed") {
			t.Fatalf("the inquiry is not in the history: %+v", p.Transitions)
		}
		if b := balanceOverHTTP(t, svc, "dp-inquiry"); b.Balance != starterCredits {
			t.Fatalf("balance = %d, want %d", b.Balance, starterCredits)
		}
		if n := paymentEvents(t, gdb, pay, "payment.disputed"); n != 0 {
			t.Fatalf("an inquiry sent %d payment.disputed", n)
		}
	})

	t.Run("an inquiry that escalates", func(t *testing.T) {
		pay := buyStarter(t, fake, s, "dp-escalated")
		d := dispute(pay, "dp_escalated_1", "warning_needs_response", starterAmount)
		deliver(t, s, disputeEvent("created", d))
		d["status"] = "needs_response"
		deliver(t, s, disputeEvent("funds_withdrawn", d))
		if p := getPayment(t, s, pay); p.Status != client.PaymentStatusDisputed {
			t.Fatalf("after the escalation: %s", p.Status)
		}
		if b := balanceOverHTTP(t, svc, "dp-escalated"); b.Balance != 0 {
			t.Fatalf("balance = %d, want 0", b.Balance)
		}
	})

	t.Run("closed lost before it was seen opened", func(t *testing.T) {
		pay := buyStarter(t, fake, s, "dp-reordered")
		d := dispute(pay, "dp_reordered_1", "lost", starterAmount)
		deliver(t, s, disputeEvent("closed", d))
		for _, st := range []string{"needs_response", "under_review", "warning_needs_response"} {
			d["status"] = st
			deliver(t, s, disputeEvent("updated", d))
		}
		d["status"] = "needs_response"
		deliver(t, s, disputeEvent("created", d))
		p := getPayment(t, s, pay)
		if p.Status != client.PaymentStatusDisputeLost || p.AmountDisputed != starterAmount {
			t.Fatalf("payment = %+v", p)
		}
		if got := moves(p); got != ">pending pending>succeeded succeeded>dispute_lost" {
			t.Fatalf("moves = %s", got)
		}
		if b := balanceOverHTTP(t, svc, "dp-reordered"); b.Balance != 0 {
			t.Fatalf("balance = %d, want 0", b.Balance)
		}
		if n := countRows(t, gdb, `SELECT count(*) FROM credit_ledger WHERE customer_id = 'dp-reordered' AND kind = 'revoke'`); n != 1 {
			t.Fatalf("%d revoke entries, want 1", n)
		}
		for typ, want := range map[string]int64{"payment.disputed": 1, "payment.dispute_lost": 1} {
			if n := paymentEvents(t, gdb, pay, typ); n != want {
				t.Fatalf("%d %s events, want %d", n, typ, want)
			}
		}
	})

	t.Run("closed won before it was seen opened", func(t *testing.T) {
		pay := buyStarter(t, fake, s, "dp-won-first")
		d := dispute(pay, "dp_won_first_1", "won", starterAmount)
		deliver(t, s, disputeEvent("closed", d))
		d["status"] = "needs_response"
		deliver(t, s, disputeEvent("created", d))
		if p := getPayment(t, s, pay); p.Status != client.PaymentStatusSucceeded || p.AmountDisputed != 0 {
			t.Fatalf("payment = %+v", p)
		}
		if b := balanceOverHTTP(t, svc, "dp-won-first"); b.Balance != starterCredits {
			t.Fatalf("balance = %d, want %d (the dispute was over before anything was taken)", b.Balance, starterCredits)
		}
	})

	t.Run("another PaymentIntent's dispute is parked", func(t *testing.T) {
		pay := buyStarter(t, fake, s, "dp-foreign")
		d := dispute(pay, "dp_foreign_1", "needs_response", starterAmount)
		d["payment_intent"] = "pi_someone_else"
		d["metadata"] = map[string]string{stripeapi.MetadataPaymentID: pay}
		id := newEventID()
		deliver(t, s, stripeEvent(id, "charge.dispute.created", d))
		if st, le := eventStatus(t, gdb, id); st != "parked" || !strings.Contains(le, "pi_someone_else") {
			t.Fatalf("foreign dispute: %s %q, want parked", st, le)
		}
		if p := getPayment(t, s, pay); p.Status != client.PaymentStatusSucceeded {
			t.Fatalf("a foreign dispute moved the payment to %s", p.Status)
		}
	})

	// dp-won's shortfall was settled by the win; dp-lost's 500 stays owed.
	if owed, body := receivablesOverHTTP(t, s); owed["dp-lost"] != 500 || owed["dp-won"] != 0 {
		t.Fatalf("verify = %s", body)
	}
	assertInvariants(t, s)
}
