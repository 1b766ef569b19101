package main

import (
	"context"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/tallybilling/tally/internal/stripeapi/stripefake"
	"github.com/tallybilling/tally/pkg/client"
)

// syncEnv is payEnv with every pending payment old enough to look up and
// no background sync: tests sync on demand.
func syncEnv(t testing.TB, stripeURL string) map[string]string {
	env := payEnv(t, stripeURL)
	env["TALLY_PENDING_CHECK_AFTER"] = "0s"
	env["TALLY_STRIPE_SYNC_INTERVAL"] = "0"
	return env
}

// stripeSync runs POST /v1/admin/stripe-sync (since: nil for the default).
func stripeSync(t testing.TB, s *server, since *time.Time) client.StripeSyncResult {
	t.Helper()
	r, err := s.admin(t).SyncStripeWithResponse(context.Background(), client.StripeSyncRequest{Since: since})
	if err != nil {
		t.Fatal(err)
	}
	if r.StatusCode() != http.StatusOK {
		t.Logf("server logs:\n%s", s.logs)
	}
	mustStatus(t, "stripe sync", r.StatusCode(), r.Body, http.StatusOK)
	return *r.JSON200
}

// stripeSyncToTheEnd runs POST /v1/admin/stripe-sync until one finishes
// within the request's deadline, as an operator would: a sync that does not
// (a thousand events to store and process on a loaded machine) answers 503
// and keeps what it applied, and the next goes on from there.
func stripeSyncToTheEnd(t testing.TB, s *server, since *time.Time) client.StripeSyncResult {
	t.Helper()
	for attempt := 1; ; attempt++ {
		r, err := s.admin(t).SyncStripeWithResponse(context.Background(), client.StripeSyncRequest{Since: since})
		if err != nil {
			t.Fatal(err)
		}
		if r.StatusCode() == http.StatusServiceUnavailable && attempt < 5 {
			t.Logf("stripe sync %d did not finish within the request's deadline, run again: %s", attempt, r.Body)
			continue
		}
		mustStatus(t, "stripe sync", r.StatusCode(), r.Body, http.StatusOK)
		return *r.JSON200
	}
}

// future is a listing window that holds no event: the sync then only looks
// up pending payments.
func future() *time.Time {
	t := time.Now().Add(time.Hour)
	return &t
}

// No webhook ever arrives: the buyer paid at Stripe, and a sync that looks
// the pending payment up credits it once, through the guard, recorded as
// source sync; a second sync (and a late webhook) changes nothing. A pay-by-
// invoice payment paid at Stripe is credited by sync the same way, and an
// expired session fails its payment.
func TestSyncCreditsWithoutAnyWebhook(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	s := startServer(t, syncEnv(t, fake.URL()))
	gdb := openDB(t, s)

	pay := checkout(t, s, "quiet", "starter", 1)
	paidAtStripe(t, fake, s, pay)
	expiring := checkout(t, s, "quiet", "starter", 1)
	if err := fake.Sandbox().ExpireSession(context.Background(), *getPayment(t, s, expiring).CheckoutSessionId); err != nil {
		t.Fatal(err)
	}
	setBilling(t, s, "quiet-co")
	r := payByInvoice(t, s, "quiet-co", "starter", 1, "inv-quiet", "")
	mustStatus(t, "invoice payment", r.StatusCode(), r.Body, http.StatusCreated)
	invoicePay := r.JSON201.PaymentId
	invoiceActionAt(t, fake, r.JSON201.Invoice.Id, "pay")

	res := stripeSync(t, s, future())
	if res.PaymentsChecked < 3 || res.PaymentsChanged < 2 || res.EventsListed != 0 {
		t.Fatalf("sync %+v, want the three pending payments checked and at least two changed", res)
	}
	p := getPayment(t, s, pay)
	if p.Status != client.PaymentStatusSucceeded || p.ConfirmedBy == nil || *p.ConfirmedBy != client.PaymentConfirmedBySync {
		t.Fatalf("after the sync: %s confirmed by %v", p.Status, p.ConfirmedBy)
	}
	last := p.Transitions[len(p.Transitions)-1]
	if last.To != "succeeded" || last.Source == nil || *last.Source != client.PaymentTransitionSourceSync {
		t.Fatalf("last transition %+v, want succeeded from sync", last)
	}
	if p := getPayment(t, s, invoicePay); p.Status != client.PaymentStatusSucceeded || p.ConfirmedBy == nil || *p.ConfirmedBy != client.PaymentConfirmedBySync {
		t.Fatalf("the invoice payment after the sync: %s confirmed by %v", p.Status, p.ConfirmedBy)
	}
	if p := getPayment(t, s, expiring); p.Status != client.PaymentStatusFailed {
		t.Fatalf("the expired session's payment after the sync: %s", p.Status)
	}
	if bal := balanceOf(t, gdb, "quiet"); bal != starterCredits {
		t.Fatalf("balance %d, want %d", bal, starterCredits)
	}

	// Nothing more to do; the webhook that finally arrives is a no-op.
	if again := stripeSync(t, s, future()); again.PaymentsChanged != 0 {
		t.Fatalf("a second sync changed %d payments", again.PaymentsChanged)
	}
	deliver(t, s, stripeEvent(newEventID(), "payment_intent.succeeded", paymentIntent(pay, "quiet", "succeeded", starterAmount, starterAmount, "usd")))
	if bal := balanceOf(t, gdb, "quiet"); bal != starterCredits {
		t.Fatalf("the late webhook after the sync: balance %d", bal)
	}
	if n := confirmations(t, gdb, pay); n != 1 {
		t.Fatalf("%d confirmations", n)
	}
	assertInvariants(t, s)
}

// A payment_intent.succeeded that was never delivered is found by listing
// Stripe's events: the sync stores it (source sync) and processes it as a
// delivery would, so the payment is confirmed by its PaymentIntent. The
// `tally sync` command does the same.
func TestSyncFindsAMissedEventByListing(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	env := syncEnv(t, fake.URL())
	env["TALLY_PENDING_CHECK_AFTER"] = "1h" // only the listing may find it
	s := startServer(t, env)
	gdb := openDB(t, s)

	pay := checkout(t, s, "missed", "starter", 1)
	p := getPayment(t, s, pay)
	// The buyer pays on Stripe's page; Stripe's events are recorded, never delivered.
	if _, err := fake.Sandbox().Pay(context.Background(), *p.CheckoutSessionId, "4242424242424242", ""); err != nil {
		t.Fatal(err)
	}
	res := stripeSync(t, s, nil)
	if res.EventsNew == 0 || res.EventsListed < res.EventsNew {
		t.Fatalf("sync %+v, want the missed events found", res)
	}
	p = getPayment(t, s, pay)
	if p.Status != client.PaymentStatusSucceeded || p.ConfirmedBy == nil || *p.ConfirmedBy != client.PaymentConfirmedByPaymentIntent {
		t.Fatalf("after the listing: %s confirmed by %v", p.Status, p.ConfirmedBy)
	}
	if n := countRows(t, gdb, `SELECT count(*) FROM stripe_events WHERE source = 'sync' AND type = 'payment_intent.succeeded' AND status = 'processed'`); n != 1 {
		t.Fatalf("%d listed payment_intent.succeeded processed, want 1", n)
	}

	// The command finds nothing new: every listed event is stored.
	out, err := s.tallyCmd(t, "sync", "--since", "1h")
	if err != nil || !strings.Contains(out, "new 0") {
		t.Fatalf("tally sync: %v\n%s", err, out)
	}
	if bal := balanceOf(t, gdb, "missed"); bal != starterCredits {
		t.Fatalf("balance %d, want %d", bal, starterCredits)
	}
	if m := metrics(t, s); !strings.Contains(m, `tally_stripe_sync_runs_total{result="ok"} 1`) || !strings.Contains(m, "tally_stripe_event_lag_seconds_bucket") {
		t.Fatalf("metrics lack the sync run or the event lag:\n%s", grepLines(m, "tally_stripe_"))
	}
	assertInvariants(t, s)
}

// grepLines keeps the lines of s that contain sub.
func grepLines(s, sub string) string {
	var out []string
	for line := range strings.SplitSeq(s, "\n") {
		if strings.Contains(line, sub) {
			out = append(out, line)
		}
	}
	return strings.Join(out, "\n")
}

// An operator dismisses a parked event with a reason: it is dismissed, on
// record with who and why, out of the parked gauge, with an outbound
// event; a processed event cannot be dismissed; an unknown one is 404.
func TestDismissParkedEvent(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	s := startServer(t, payEnv(t, fake.URL()))
	gdb := openDB(t, s)
	ctx := context.Background()

	pay := checkout(t, s, "dismiss-me", "starter", 1)
	paidAtStripe(t, fake, s, pay)
	parked := newEventID()
	deliver(t, s, stripeEvent(parked, "payment_intent.succeeded", paymentIntent(pay, "dismiss-me", "succeeded", starterAmount, 1, "usd")))
	good := newEventID()
	deliver(t, s, stripeEvent(good, "payment_intent.succeeded", paymentIntent(pay, "dismiss-me", "succeeded", starterAmount, starterAmount, "usd")))
	if status, _ := eventStatus(t, gdb, parked); status != "parked" {
		t.Fatalf("the mismatched event is %s", status)
	}
	if m := metrics(t, s); !strings.Contains(m, "tally_stripe_events_parked 1") {
		t.Fatalf("parked gauge:\n%s", grepLines(m, "parked"))
	}
	admin := s.admin(t)
	r, err := admin.DismissStripeEventWithResponse(ctx, parked, client.StripeEventDismiss{Reason: "test amount; the real payment was credited"})
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "dismiss", r.StatusCode(), r.Body, http.StatusOK)
	if r.JSON200.Status != client.StripeEventStatusDismissed || !strings.HasPrefix(deref(r.JSON200.DismissedBy), "admin key ") ||
		deref(r.JSON200.DismissedReason) == "" || r.JSON200.DismissedAt == nil {
		t.Fatalf("dismissed event %+v", r.JSON200)
	}
	if m := metrics(t, s); !strings.Contains(m, "tally_stripe_events_parked 0") {
		t.Fatalf("parked gauge after dismissing:\n%s", grepLines(m, "parked"))
	}
	if n := countRows(t, gdb, `SELECT count(*) FROM events WHERE type = 'stripe_event.dismissed' AND data->>'stripe_event_id' = ?`, parked); n != 1 {
		t.Fatalf("%d stripe_event.dismissed events", n)
	}
	again, _ := admin.DismissStripeEventWithResponse(ctx, parked, client.StripeEventDismiss{Reason: "again"})
	mustStatus(t, "dismiss again", again.StatusCode(), again.Body, http.StatusOK)
	processed, _ := admin.DismissStripeEventWithResponse(ctx, good, client.StripeEventDismiss{Reason: "no"})
	mustStatus(t, "dismiss a processed event", processed.StatusCode(), processed.Body, http.StatusConflict)
	unknown, _ := admin.DismissStripeEventWithResponse(ctx, "evt_unknown", client.StripeEventDismiss{Reason: "no"})
	mustStatus(t, "dismiss an unknown event", unknown.StatusCode(), unknown.Body, http.StatusNotFound)
	svc, _ := s.service(t).DismissStripeEventWithResponse(ctx, parked, client.StripeEventDismiss{Reason: "no"})
	mustStatus(t, "a service key dismissing", svc.StatusCode(), svc.Body, http.StatusForbidden)
	list, _ := admin.ListStripeEventsWithResponse(ctx, &client.ListStripeEventsParams{Status: ptr(client.StripeEventStatusDismissed)})
	mustStatus(t, "list dismissed", list.StatusCode(), list.Body, http.StatusOK)
	if len(list.JSON200.Data) != 1 || list.JSON200.Data[0].Id != parked {
		t.Fatalf("dismissed events listed: %+v", list.JSON200.Data)
	}
	if bal := balanceOf(t, gdb, "dismiss-me"); bal != starterCredits {
		t.Fatalf("balance %d", bal)
	}
	assertInvariants(t, s)
}

func ptr[T any](v T) *T { return &v }

// An automatic top-up whose payment_intent.succeeded never arrives stays
// pending, and while it is in flight no other top-up starts: the sync looks
// its PaymentIntent up and credits it once (confirmed_by sync), so the next
// crossing can top up again.
func TestSyncSettlesAnAutomaticTopUpWhoseWebhookWasLost(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	s := startServer(t, syncEnv(t, fake.URL()))
	evs := &stripeEvents{fake: fake}
	gdb := openDB(t, s)
	withAutoTopUp(t, s, evs, "lost", topUpCard, 1000, client.AutoTopUpSettings{Enabled: true, Threshold: 500, Item: "starter"})
	spend(t, s, "lost", 600, "lost-1")
	tops := autoTopUps(t, s, "lost")
	if len(tops) != 1 {
		t.Fatalf("%d top-ups, want 1", len(tops))
	}
	waitCharged(t, s, tops[0].Id) // charged at Stripe; its webhook is never delivered

	res := stripeSync(t, s, future())
	if res.PaymentsChanged < 1 {
		t.Fatalf("sync %+v, want the top-up changed", res)
	}
	p := getPayment(t, s, tops[0].Id)
	if p.Status != client.PaymentStatusSucceeded || p.ConfirmedBy == nil || *p.ConfirmedBy != client.PaymentConfirmedBySync {
		t.Fatalf("the top-up after the sync: %s confirmed by %v", p.Status, p.ConfirmedBy)
	}
	if bal := balanceOf(t, gdb, "lost"); bal != 400+starterCredits {
		t.Fatalf("balance %d, want %d", bal, 400+starterCredits)
	}
	if a := getAutoTopUp(t, s, "lost"); a.InFlightPaymentId != nil || a.Status != client.AutoTopUpStatusActive {
		t.Fatalf("settings after the sync %+v, want nothing in flight", a)
	}
	// The webhook, delivered at last, credits nothing more.
	evs.deliverNew(t, s)
	if bal := balanceOf(t, gdb, "lost"); bal != 400+starterCredits {
		t.Fatalf("balance %d after the late webhook", bal)
	}
	if n := confirmations(t, gdb, p.Id); n != 1 {
		t.Fatalf("%d confirmations", n)
	}
	// The next crossing tops up again.
	spend(t, s, "lost", 1000, "lost-2")
	if n := len(autoTopUps(t, s, "lost")); n != 2 {
		t.Fatalf("%d top-ups after the next crossing, want 2", n)
	}
	assertInvariants(t, s)
}
