package metering_test

import (
	"context"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/tallybilling/tally/internal/errs"
	"github.com/tallybilling/tally/internal/metering"
)

// Stripe's summary differs for one customer: the reconciliation names that
// customer, and only that one, with the difference.
func TestReconcileNamesTheDriftingCustomer(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ctx := context.Background()
	now := time.Now()
	for _, c := range []string{"mia", "noah", "olga"} {
		link(t, e.db, c)
	}
	at := func(ago time.Duration) time.Time { return now.Add(-ago) }
	ingest(t, e.svc,
		metering.EventInput{CustomerID: "mia", Meter: testMeter, Value: 5, Identifier: "r-1", Timestamp: new(at(20 * time.Minute))},
		metering.EventInput{CustomerID: "mia", Meter: testMeter, Value: 7, Identifier: "r-2", Timestamp: new(at(10 * time.Minute))},
		metering.EventInput{CustomerID: "noah", Meter: testMeter, Value: 11, Identifier: "r-3", Timestamp: new(at(15 * time.Minute))},
		metering.EventInput{CustomerID: "olga", Meter: testMeter, Value: 4, Identifier: "r-4", Timestamp: new(at(12 * time.Minute))},
		// Another meter and an event outside the window do not count.
		metering.EventInput{CustomerID: "noah", Meter: otherMeter, Value: 100, Identifier: "r-5", Timestamp: new(at(15 * time.Minute))},
		metering.EventInput{CustomerID: "noah", Meter: testMeter, Value: 1000, Identifier: "r-6", Timestamp: new(at(3 * time.Hour))},
	)
	w := metering.NewWorker(e.workerOptions(t, fastConfig()))
	if _, err := w.RunOnce(ctx); err != nil {
		t.Fatal(err)
	}
	assertDeliveredOnce(t, e, []string{"r-1", "r-2", "r-3", "r-4", "r-5", "r-6"})

	from, to := now.Add(-time.Hour), now.Add(time.Hour) // to in the future: clamped to now
	// The service reads its own clock: "now" is between these two, which
	// may lie in different minutes when the setup above ends near one's end.
	before := time.Now()
	rec, err := e.svc.Reconcile(ctx, testMeter, from, to)
	after := time.Now()
	if err != nil {
		t.Fatal(err)
	}
	if rec.Checked != 3 || len(rec.Mismatches) != 0 {
		t.Fatalf("before any drift: %+v, want 3 customers checked and no mismatch", rec)
	}
	if !rec.From.Equal(from.UTC().Truncate(time.Minute)) || rec.To.Before(before.Truncate(time.Minute)) || rec.To.After(after) ||
		rec.To.Second() != 0 || rec.To.Nanosecond() != 0 {
		t.Errorf("window %s..%s: want from floored to the minute and to clamped to now (between %s and %s), floored",
			rec.From, rec.To, before.UTC(), after.UTC())
	}

	e.fake.SetSummaryOverride("cus_noah", 9)
	rec, err = e.svc.Reconcile(ctx, testMeter, from, to)
	if err != nil {
		t.Fatal(err)
	}
	want := metering.Mismatch{CustomerID: "noah", LocalTotal: 11, StripeTotal: 9, Difference: -2}
	if rec.Checked != 3 || len(rec.Mismatches) != 1 || rec.Mismatches[0] != want {
		t.Fatalf("reconciliation %+v, want 3 checked and exactly %+v", rec, want)
	}

	if _, err := e.svc.Reconcile(ctx, testMeter, time.Time{}, to); !errs.Is(err, errs.Invalid) || !strings.Contains(err.Error(), "zero time") {
		t.Errorf("reconciliation from the zero time: %v, want invalid_request naming the zero time", err)
	}
	if _, err := e.svc.Reconcile(ctx, "nope", from, to); !errs.Is(err, errs.Invalid) {
		t.Errorf("unknown meter: %v, want invalid_request", err)
	}
	if _, err := e.svc.Reconcile(ctx, testMeter, now.Truncate(time.Minute), now.Truncate(time.Minute).Add(30*time.Second)); !errs.Is(err, errs.Invalid) {
		t.Errorf("window shorter than a minute: %v, want invalid_request", err)
	}
}

func TestTotalsCountEverythingButDead(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ctx := context.Background()
	now := time.Now()
	link(t, e.db, "pia")
	ingest(t, e.svc,
		metering.EventInput{CustomerID: "pia", Meter: testMeter, Value: 3, Identifier: "t-1", Timestamp: new(now.Add(-time.Hour))},
		metering.EventInput{CustomerID: "pia", Meter: testMeter, Value: 4, Identifier: "t-2", Timestamp: new(now.Add(-2 * time.Hour))},
		metering.EventInput{CustomerID: "pia", Meter: otherMeter, Value: 10, Identifier: "t-3", Timestamp: new(now.Add(-time.Hour))},
		metering.EventInput{CustomerID: "pia", Meter: testMeter, Value: 50, Identifier: "t-dead", Timestamp: new(now.Add(-time.Hour))},
	)
	e.db.Exec(`UPDATE usage_events SET status = 'dead' WHERE identifier = 't-dead'`)

	got, err := e.svc.Totals(ctx, metering.TotalsQuery{CustomerID: "pia"})
	if err != nil {
		t.Fatal(err)
	}
	want := []metering.MeterTotal{{Meter: testMeter, Total: 7, Events: 2}, {Meter: otherMeter, Total: 10, Events: 1}}
	if len(got.Meters) != 2 || got.Meters[0] != want[0] || got.Meters[1] != want[1] {
		t.Errorf("totals %+v, want %+v", got.Meters, want)
	}
	got, err = e.svc.Totals(ctx, metering.TotalsQuery{CustomerID: "pia", Meter: testMeter, From: new(now.Add(-90 * time.Minute))})
	if err != nil || len(got.Meters) != 1 || got.Meters[0] != (metering.MeterTotal{Meter: testMeter, Total: 3, Events: 1}) {
		t.Errorf("one meter, last 90 minutes: %+v %v, want 3 from one event", got.Meters, err)
	}
	if _, err := e.svc.Totals(ctx, metering.TotalsQuery{CustomerID: "nobody"}); !errs.Is(err, errs.NotFound) {
		t.Errorf("unknown customer: %v, want not_found", err)
	}
	if _, err := e.svc.Totals(ctx, metering.TotalsQuery{CustomerID: "pia", From: &now, To: new(now.Add(-time.Hour))}); !errs.Is(err, errs.Invalid) {
		t.Errorf("from after to: %v, want invalid_request", err)
	}
	zero := time.Time{}
	for _, q := range []metering.TotalsQuery{{CustomerID: "pia", From: &zero}, {CustomerID: "pia", To: &zero}} {
		if _, err := e.svc.Totals(ctx, q); !errs.Is(err, errs.Invalid) || !strings.Contains(err.Error(), "zero time") {
			t.Errorf("totals with the zero time as a bound: %v, want invalid_request naming the zero time", err)
		}
	}
}

// A customer whose only event in the window is dead, but whom Stripe counts
// anyway (a send that timed out after Stripe kept it), is exactly the drift
// reconciliation exists to find: compared, and reported with local total 0.
// A customer with only pending usage is compared too, and agrees.
func TestReconcileComparesCustomersWithoutDeliveredUsage(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ctx := context.Background()
	now := time.Now()
	for _, c := range []string{"quin", "rosa", "sam"} {
		link(t, e.db, c)
	}
	at := now.Add(-10 * time.Minute)
	ingest(t, e.svc,
		metering.EventInput{CustomerID: "quin", Meter: testMeter, Value: 6, Identifier: "d-1", Timestamp: new(at)},
		metering.EventInput{CustomerID: "rosa", Meter: testMeter, Value: 2, Identifier: "d-2", Timestamp: new(at)},
		metering.EventInput{CustomerID: "sam", Meter: testMeter, Value: 3, Identifier: "d-3", Timestamp: new(at)},
	)
	w := metering.NewWorker(e.workerOptions(t, fastConfig()))
	if _, err := w.RunOnce(ctx); err != nil {
		t.Fatal(err)
	}
	// quin's event timed out, Stripe kept it, and we dead-lettered it; rosa's
	// has not been sent again yet.
	e.db.Exec(`UPDATE usage_events SET status = 'dead', delivered_at = NULL WHERE identifier = 'd-1'`)
	e.db.Exec(`UPDATE usage_events SET status = 'pending', delivered_at = NULL WHERE identifier = 'd-2'`)
	e.fake.SetSummaryOverride("cus_rosa", 0)

	rec, err := e.svc.Reconcile(ctx, testMeter, now.Add(-time.Hour), now)
	if err != nil {
		t.Fatal(err)
	}
	want := metering.Mismatch{CustomerID: "quin", LocalTotal: 0, StripeTotal: 6, Difference: 6}
	if rec.Checked != 3 || len(rec.Mismatches) != 1 || rec.Mismatches[0] != want {
		t.Fatalf("reconciliation %+v, want 3 checked and exactly %+v", rec, want)
	}
}

// Stripe failing for one customer is retried; when it keeps failing the
// reconciliation fails naming that customer instead of reporting the
// customers it did compare as if that were all of them.
func TestReconcileRetriesStripeAndNeverAnswersPartially(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ctx := context.Background()
	now := time.Now()
	link(t, e.db, "tess")
	ingest(t, e.svc, metering.EventInput{CustomerID: "tess", Meter: testMeter, Value: 1, Identifier: "f-1", Timestamp: new(now.Add(-10 * time.Minute))})
	w := metering.NewWorker(e.workerOptions(t, fastConfig()))
	if _, err := w.RunOnce(ctx); err != nil {
		t.Fatal(err)
	}

	e.fake.FailNext(2, http.StatusServiceUnavailable, "")
	rec, err := e.svc.Reconcile(ctx, testMeter, now.Add(-time.Hour), now)
	if err != nil || rec.Checked != 1 || len(rec.Mismatches) != 0 {
		t.Fatalf("after two 503s: %+v %v, want tess checked and in agreement", rec, err)
	}

	e.fake.FailNext(100, http.StatusServiceUnavailable, "")
	rec, err = e.svc.Reconcile(ctx, testMeter, now.Add(-time.Hour), now)
	if err == nil || !strings.Contains(err.Error(), "tess") || errs.CodeOf(err) == errs.Internal {
		t.Fatalf("Stripe down: %+v %v, want an error with a code that names customer tess", rec, err)
	}
}
