package main

import (
	"strings"
	"testing"

	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/stripeapi/stripefake"
	"github.com/tallybilling/tally/pkg/client"
)

// TestRefundOfUnlinkedPaymentIntentWaitsForIt: after a webhook outage
// Stripe redelivers out of order, so a charge.refunded or
// charge.dispute.created can come before anything linked its PaymentIntent
// to a payment (no checkout.session.completed, no payment_intent.succeeded
// yet). Neither carries our metadata (a dispute never does), but the
// PaymentIntent does: tally asks Stripe for it, and the event waits for the
// success like one whose PaymentIntent was linked. Ignoring it as not ours
// granted the credits when the success came, and the refund or dispute
// never took them back. A PaymentIntent without our metadata stays
// another integration's (ignored); Stripe not answering is retried.
func TestRefundOfUnlinkedPaymentIntentWaitsForIt(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	env := payEnv(t, fake.URL())
	env["TALLY_STRIPE_EVENT_RETRY_INTERVAL"] = "1s"
	s := startServer(t, env)
	gdb := openDB(t, s)

	pis := answerPaymentIntents(fake)

	// A refund, then a chargeback, each before anything of its payment.
	refunded := pis.checkout(t, s, "unlinked-2")
	refund := newEventID()
	// Stripe does not answer at first: the refund is retried, not ignored.
	// Nothing else asks Stripe while it is down: a retry of the chargeback
	// that overlapped the outage recorded Stripe's 503 over the wait the
	// loop below had just seen, and the success found nothing waiting.
	pis.setDown(true)
	deliver(t, s, stripeEvent(refund, "charge.refunded", refundedCharge(refunded, starterAmount, starterAmount)))
	if st, le := eventStatus(t, gdb, refund); st != "failed" {
		t.Fatalf("refund while Stripe is down: %s %q, want failed (retried)", st, le)
	}
	pis.setDown(false)
	disputed := pis.checkout(t, s, "unlinked-1")
	chargeback := newEventID()
	deliver(t, s, stripeEvent(chargeback, "charge.dispute.created", dispute(disputed, "dp_unlinked_1", "needs_response", starterAmount)))

	for _, id := range []string{chargeback, refund} {
		waitFor(t, "the early event waiting for its success", func() bool {
			st, le := eventStatus(t, gdb, id)
			return st == "failed" && strings.Contains(le, "waiting for")
		})
	}

	// The successes apply them at once, as if delivered in order.
	deliverSuccess(t, s, disputed, "unlinked-1")
	deliverSuccess(t, s, refunded, "unlinked-2")
	mustTakeBackAtOnce(t, s, gdb, refund, refunded, "unlinked-2", chargeback, disputed, "unlinked-1")

	// A PaymentIntent without our metadata is another integration's.
	foreign := newEventID()
	deliver(t, s, stripeEvent(foreign, "charge.dispute.created", dispute("pay_someone_else", "dp_foreign", "needs_response", starterAmount)))
	if st, le := eventStatus(t, gdb, foreign); st != "ignored" {
		t.Fatalf("dispute of a foreign PaymentIntent: %s %q, want ignored", st, le)
	}
	foreignRefund := newEventID()
	deliver(t, s, stripeEvent(foreignRefund, "charge.refunded", refundedCharge("pay_someone_else", starterAmount, starterAmount)))
	if st, le := eventStatus(t, gdb, foreignRefund); st != "ignored" {
		t.Fatalf("refund of a foreign PaymentIntent: %s %q, want ignored", st, le)
	}
	assertInvariants(t, s)
}

// TestAWaitingRefundThatMeetsStripeDownStillWaitsForItsSuccess: a refund
// waiting for its payment's success is retried on its backoff, and a retry
// asks Stripe for the PaymentIntent. Stripe down at that moment said
// nothing about the wait, yet the failure was recorded without it: the
// success then found nothing waiting for it, and the refund stayed
// unapplied until its next backoff (up to an hour apart in production)
// while the customer could spend the refunded credits. It is applied with
// the success, as before the outage.
func TestAWaitingRefundThatMeetsStripeDownStillWaitsForItsSuccess(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	env := payEnv(t, fake.URL())
	// Long enough that no retry of the refund comes between the success
	// and the check after it: only the success can apply it in time.
	env["TALLY_STRIPE_EVENT_RETRY_INTERVAL"] = "4s"
	s := startServer(t, env)
	gdb := openDB(t, s)

	const customer = "waits-down-1"
	pis := answerPaymentIntents(fake)
	pay := pis.checkout(t, s, customer)
	refund := newEventID()
	deliver(t, s, stripeEvent(refund, "charge.refunded", refundedCharge(pay, starterAmount, starterAmount)))
	if st, le := eventStatus(t, gdb, refund); st != "failed" || !strings.Contains(le, "waiting for") {
		t.Fatalf("refund before its success: %s %q, want failed, waiting for it", st, le)
	}
	pis.setDown(true)
	waitFor(t, "a retry of the refund to meet Stripe down", func() bool {
		_, le := eventStatus(t, gdb, refund)
		return strings.Contains(le, "status 503")
	})
	pis.setDown(false)

	deliverSuccess(t, s, pay, customer)
	if st, le := eventStatus(t, gdb, refund); st != "processed" {
		t.Fatalf("refund right after its success: %s %q, want processed", st, le)
	}
	if p := getPayment(t, s, pay); p.Status != client.PaymentStatusRefunded || p.AmountRefunded != starterAmount {
		t.Fatalf("payment = %+v, want refunded", p)
	}
	if got := balanceOf(t, gdb, customer); got != 0 {
		t.Fatalf("balance = %d, want 0 (the credits taken back)", got)
	}
	assertInvariants(t, s)
}

// TestARefundThatMetStripeDownFirstIsAppliedWithItsSuccess: a refund or
// dispute delivered while Stripe does not answer (an outage, a 429 storm)
// never learnt which success it waits for: its PaymentIntent is linked to
// nothing yet, and Stripe could not be asked whose it is. Recorded without
// a wait, the success that came once Stripe answered again found nothing
// waiting for it, and the refund stayed unapplied until its next backoff
// (which an outage had grown to up to an hour) while the customer could
// spend the refunded credits. The PaymentIntent the charge names is what
// it would wait for: its success applies it at once.
func TestARefundThatMetStripeDownFirstIsAppliedWithItsSuccess(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	env := payEnv(t, fake.URL())
	// Long enough that no retry comes between the success and the check
	// after it: only the success can apply them in time.
	env["TALLY_STRIPE_EVENT_RETRY_INTERVAL"] = "30s"
	s := startServer(t, env)
	gdb := openDB(t, s)

	pis := answerPaymentIntents(fake)
	refunded, disputed := pis.checkout(t, s, "down-first-1"), pis.checkout(t, s, "down-first-2")
	pis.setDown(true)
	refund, chargeback := newEventID(), newEventID()
	deliver(t, s, stripeEvent(refund, "charge.refunded", refundedCharge(refunded, starterAmount, starterAmount)))
	deliver(t, s, stripeEvent(chargeback, "charge.dispute.created", dispute(disputed, "dp_down_first", "needs_response", starterAmount)))
	for _, id := range []string{refund, chargeback} {
		if st, le := eventStatus(t, gdb, id); st != "failed" || !strings.Contains(le, "status 503") {
			t.Fatalf("event %s while Stripe is down: %s %q, want failed on Stripe's 503", id, st, le)
		}
	}
	pis.setDown(false)

	deliverSuccess(t, s, refunded, "down-first-1")
	deliverSuccess(t, s, disputed, "down-first-2")
	mustTakeBackAtOnce(t, s, gdb, refund, refunded, "down-first-1", chargeback, disputed, "down-first-2")
	assertInvariants(t, s)
}

// mustTakeBackAtOnce checks, right after the successes of payments
// refunded and disputed were delivered, that the early refund and
// chargeback events are processed and took the credits back: the
// successes applied them, not a later retry.
func mustTakeBackAtOnce(t *testing.T, s *server, gdb *gorm.DB, refund, refunded, refundedCustomer, chargeback, disputed, disputedCustomer string) {
	t.Helper()
	for _, id := range []string{refund, chargeback} {
		if st, le := eventStatus(t, gdb, id); st != "processed" {
			t.Fatalf("event %s right after its success: %s %q, want processed", id, st, le)
		}
	}
	if p := getPayment(t, s, refunded); p.Status != client.PaymentStatusRefunded || p.AmountRefunded != starterAmount {
		t.Fatalf("refunded payment = %+v", p)
	}
	if p := getPayment(t, s, disputed); p.Status != client.PaymentStatusDisputed || p.AmountDisputed != starterAmount {
		t.Fatalf("disputed payment = %+v", p)
	}
	for _, c := range []string{refundedCustomer, disputedCustomer} {
		if got := balanceOf(t, gdb, c); got != 0 {
			t.Fatalf("balance of %s = %d, want 0 (the credits taken back)", c, got)
		}
	}
}
