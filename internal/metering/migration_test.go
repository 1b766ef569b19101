package metering_test

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/tallybilling/tally/internal/catalog"
	"github.com/tallybilling/tally/internal/errs"
	"github.com/tallybilling/tally/internal/metering"
)

func (e *env) status(t *testing.T, id string) metering.Status {
	t.Helper()
	return statusOf(t, e.svc, id)
}

// Cancel before delivery: never sent. Cancel after: one adjustment reaches
// Stripe, the event stops counting there and in tally. Too late: 409.
func TestCancelBeforeAndAfterDelivery(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	link(t, e.db, "ann")
	ingest(t, e.svc, ev("ann", "c-before", 3), ev("ann", "c-after", 4), ev("ann", "c-kept", 5))
	got, err := e.svc.Cancel(context.Background(), "c-before")
	if err != nil || got.Status != metering.StatusCancelled {
		t.Fatalf("cancel before delivery: %+v, %v; want cancelled", got, err)
	}
	stop := startWorker(t, metering.NewWorker(e.workerOptions(t, fastConfig())))
	waitFor(t, "delivery", 20*time.Second, func() bool { return e.status(t, "c-after") == metering.StatusDelivered })
	got, err = e.svc.Cancel(context.Background(), "c-after")
	if err != nil || got.Status != metering.StatusCancelPending {
		t.Fatalf("cancel after delivery: %+v, %v; want cancel_pending", got, err)
	}
	waitFor(t, "the adjustment", 20*time.Second, func() bool { return e.status(t, "c-after") == metering.StatusCancelled })
	again, err := e.svc.Cancel(context.Background(), "c-after")
	if err != nil || again.Status != metering.StatusCancelled {
		t.Errorf("cancel again: %+v, %v; want cancelled, unchanged", again, err)
	}
	stop()
	if n := e.fake.Count("c-before"); n != 0 {
		t.Errorf("c-before reached Stripe %d times, want never", n)
	}
	if n := e.fake.MeterEventAdjustments("c-after"); n != 1 {
		t.Errorf("c-after adjusted %d times at Stripe, want once", n)
	}
	now := time.Now()
	tot, err := e.svc.Totals(context.Background(), metering.TotalsQuery{CustomerID: "ann", Meter: testMeter})
	if err != nil || tot.Meters[0].Total != 5 {
		t.Errorf("ann's total %+v (%v), want 5: cancelled events are left out", tot, err)
	}
	rec, err := e.svc.Reconcile(context.Background(), testMeter, now.Add(-time.Hour), now.Add(time.Hour))
	if err != nil || len(rec.Mismatches) != 0 {
		t.Errorf("reconciliation %+v (%v), want no drift: Stripe and tally both leave c-after out", rec, err)
	}

	late := metering.New(metering.Options{DB: e.db, Stripe: newClient(t, e.fake, 0), Catalog: testCatalog(),
		Now: func() time.Time { return time.Now().Add(metering.CancelWindow + time.Minute) }})
	if _, err := late.Cancel(context.Background(), "c-kept"); !errs.Is(err, errs.Conflict) {
		t.Errorf("cancel a day after delivery: %v, want conflict", err)
	}
	if got := e.status(t, "c-kept"); got != metering.StatusDelivered {
		t.Errorf("c-kept is %s after a refused cancel, want delivered", got)
	}
	if _, err := e.svc.Cancel(context.Background(), "nope"); !errs.Is(err, errs.NotFound) {
		t.Errorf("cancel of an unknown event: %v, want not_found", err)
	}
}

// Cancels racing delivery: whatever the order, every event ends
// cancelled, and each one Stripe received was adjusted exactly once, so
// Stripe's total ends at zero.
func TestCancelRacingDelivery(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	link(t, e.db, "race")
	const n = 200
	var evs []metering.EventInput
	for i := range n {
		evs = append(evs, ev("race", fmt.Sprintf("race-%03d", i), 1))
	}
	ingest(t, e.svc, evs...)
	startWorker(t, metering.NewWorker(e.workerOptions(t, fastConfig())))
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			if i%3 == 0 {
				time.Sleep(time.Duration(i) * time.Millisecond)
			}
			if _, err := e.svc.Cancel(context.Background(), fmt.Sprintf("race-%03d", i)); err != nil {
				t.Errorf("cancel race-%03d: %v", i, err)
			}
		})
	}
	wg.Wait()
	waitFor(t, "every cancel settled", 60*time.Second, func() bool { return countRows(t, e.db, `status = 'cancelled'`) == n })
	sent := 0
	for i := range n {
		id := fmt.Sprintf("race-%03d", i)
		c, a := e.fake.Count(id), e.fake.MeterEventAdjustments(id)
		if c > 1 || a > 1 || (c == 1 && a != 1) {
			t.Errorf("%s: received %d times, adjusted %d times; want an adjustment for every one received", id, c, a)
		}
		sent += c
	}
	now := time.Now()
	rec, err := e.svc.Reconcile(context.Background(), testMeter, now.Add(-time.Hour), now.Add(time.Hour))
	if err != nil || len(rec.Mismatches) != 0 {
		t.Errorf("reconciliation %+v (%v), want Stripe at 0 like tally", rec, err)
	}
	t.Logf("%d of %d events reached Stripe before their cancel", sent, n)
}

func migrationCatalog(liveFrom *time.Time, nextPeriod bool, delivery string) catalog.Catalog {
	c := testCatalog()
	c.Plans[0].LiveFrom, c.Plans[0].LiveFromNextPeriod, c.Plans[0].Delivery = liveFrom, nextPeriod, delivery
	c.Plans[1].Delivery = catalog.DeliveryLive
	return c
}

// A shadow meter stores and counts, never sends; a fixed live_from keeps
// events before it as legacy_period.
func TestShadowAndFixedLiveFrom(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	link(t, e.db, "sam")
	shadow := metering.New(metering.Options{DB: e.db, Stripe: newClient(t, e.fake, 0), Catalog: migrationCatalog(nil, false, catalog.DeliveryShadow)})
	ingest(t, shadow, ev("sam", "s-1", 2))
	if got := e.status(t, "s-1"); got != metering.StatusShadow {
		t.Fatalf("s-1 is %s, want shadow", got)
	}
	cut := time.Now().Add(-10 * time.Minute)
	fixed := metering.New(metering.Options{DB: e.db, Stripe: newClient(t, e.fake, 0), Catalog: migrationCatalog(&cut, false, catalog.DeliveryLive)})
	before, after := time.Now().Add(-20*time.Minute), time.Now().Add(-5*time.Minute)
	a, b := ev("sam", "f-before", 3), ev("sam", "f-after", 4)
	a.Timestamp, b.Timestamp = &before, &after
	ingest(t, fixed, a, b)
	opts := e.workerOptions(t, fastConfig())
	startWorker(t, metering.NewWorker(opts))
	waitFor(t, "f-after delivered", 20*time.Second, func() bool { return e.status(t, "f-after") == metering.StatusDelivered })
	if got := e.status(t, "f-before"); got != metering.StatusLegacyPeriod {
		t.Errorf("f-before is %s, want legacy_period", got)
	}
	if e.fake.Count("s-1")+e.fake.Count("f-before") != 0 {
		t.Errorf("a shadow or legacy-period event reached Stripe")
	}
	tot, err := fixed.Totals(context.Background(), metering.TotalsQuery{CustomerID: "sam", Meter: testMeter})
	if err != nil || tot.Meters[0].Total != 9 || tot.Meters[0].LiveFrom == nil || !tot.Meters[0].LiveFrom.Equal(cut.UTC()) {
		t.Errorf("totals %+v (%v), want 9 counting every event, live_from %s", tot.Meters, err, cut)
	}
}

// live_from: next_period: each customer's cut-over is the end of their
// current Stripe billing period, decided once by the worker; events before
// it are legacy_period, events after it are sent.
func TestNextPeriodCutover(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	link(t, e.db, "nia")
	link(t, e.db, "noa") // no subscription: live from the decision
	periodEnd := time.Now().Add(-30 * time.Minute).Truncate(time.Second)
	e.fake.StartSubscription("cus_nia", "price_api", periodEnd.AddDate(0, -1, 0), periodEnd)
	cat := migrationCatalog(nil, true, catalog.DeliveryLive)
	svc := metering.New(metering.Options{DB: e.db, Stripe: newClient(t, e.fake, 0), Catalog: cat})
	at := func(d time.Duration) *time.Time { x := time.Now().Add(d); return &x }
	b1, a1, n1 := ev("nia", "np-before", 1), ev("nia", "np-after", 2), ev("noa", "np-noa", 3)
	b1.Timestamp, a1.Timestamp, n1.Timestamp = at(-40*time.Minute), at(-10*time.Minute), at(-time.Minute)
	ingest(t, svc, b1, a1, n1)
	tot, err := svc.Totals(context.Background(), metering.TotalsQuery{CustomerID: "nia", Meter: testMeter})
	if err != nil || !tot.Meters[0].LiveFromNextPeriod {
		t.Fatalf("before the decision: %+v (%v), want live_from next_period", tot.Meters, err)
	}
	opts := e.workerOptions(t, fastConfig())
	opts.Catalog = cat
	startWorker(t, metering.NewWorker(opts))
	waitFor(t, "np-after delivered", 20*time.Second, func() bool { return e.status(t, "np-after") == metering.StatusDelivered })
	// Without a subscription no Stripe period could bill noa's usage so
	// far: the legacy system keeps it, tally takes over from the decision.
	waitFor(t, "np-noa decided", 20*time.Second, func() bool { return e.status(t, "np-noa") == metering.StatusLegacyPeriod })
	if got := e.status(t, "np-before"); got != metering.StatusLegacyPeriod {
		t.Errorf("np-before is %s, want legacy_period", got)
	}
	// Decided: a late event before the boundary is legacy at once.
	late := ev("nia", "np-late", 7)
	late.Timestamp = at(-35 * time.Minute)
	ingest(t, svc, late)
	if got := e.status(t, "np-late"); got != metering.StatusLegacyPeriod {
		t.Errorf("np-late is %s, want legacy_period", got)
	}
	tot, err = svc.Totals(context.Background(), metering.TotalsQuery{CustomerID: "nia", Meter: testMeter})
	if err != nil || tot.Meters[0].LiveFrom == nil || !tot.Meters[0].LiveFrom.Equal(periodEnd.UTC()) {
		t.Errorf("after the decision: %+v (%v), want live_from %s", tot.Meters, err, periodEnd)
	}
	if e.fake.Count("np-before")+e.fake.Count("np-late") != 0 {
		t.Errorf("an event of the legacy period reached Stripe")
	}
}

// The scheduled reconciliation stores its run once per window, names the
// drifting customer, and the list pages through runs newest first.
func TestScheduledReconciliationStoresRuns(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	link(t, e.db, "rex")
	link(t, e.db, "roy")
	// The reconciler's clock stands still: with the wall clock, a minute
	// boundary passed between the two runs (the delivery below took a few
	// seconds on a loaded machine) made them two windows, two runs.
	start := time.Now()
	svc := metering.New(metering.Options{DB: e.db, Stripe: newClient(t, e.fake, 0), Catalog: testCatalog(), Now: func() time.Time { return start }})
	r := metering.NewReconciler(svc, time.Minute, nil, nil)
	from, to := r.Window(start)
	ts := from.Add(10 * time.Second)
	a, b := ev("rex", "sr-1", 5), ev("roy", "sr-2", 6)
	a.Timestamp, b.Timestamp = &ts, &ts
	ingest(t, e.svc, a, b)
	stop := startWorker(t, metering.NewWorker(e.workerOptions(t, fastConfig())))
	waitFor(t, "delivery", 20*time.Second, func() bool { return countRows(t, e.db, `status = 'delivered'`) == 2 })
	stop()
	e.fake.SetSummaryOverride("cus_roy", 9)
	if err := r.RunOnce(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := r.RunOnce(context.Background()); err != nil {
		t.Fatal(err)
	}
	page, err := e.svc.ListRuns(context.Background(), testMeter, "", 10)
	if err != nil {
		t.Fatal(err)
	}
	if len(page.Runs) != 1 {
		t.Fatalf("%d runs of %s, want one per window", len(page.Runs), testMeter)
	}
	run := page.Runs[0]
	if run.Kind != "scheduled" || !run.From.Equal(from) || !run.To.Equal(to) || run.Checked != 2 || len(run.Mismatches) != 1 ||
		run.Mismatches[0].CustomerID != "roy" || run.Mismatches[0].Difference != 3 || run.Drift != 3 {
		t.Errorf("run %+v, want roy drifting by 3 over [%s, %s)", run, from, to)
	}
	all, err := e.svc.ListRuns(context.Background(), "", "", 1)
	if err != nil || len(all.Runs) != 1 || all.Next == "" {
		t.Fatalf("first page of all runs: %+v (%v), want one and a cursor", all, err)
	}
	next, err := e.svc.ListRuns(context.Background(), "", all.Next, 10)
	if err != nil || len(next.Runs) != 1 || next.Runs[0].ID == all.Runs[0].ID {
		t.Errorf("second page: %+v (%v), want the other meter's run", next, err)
	}
}

// The comparison with a legacy system names the customers who differ,
// including ones only one side knows.
func TestCompareWithLegacy(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ingest(t, e.svc, ev("lea", "cmp-1", 10), ev("lou", "cmp-2", 20))
	now := time.Now()
	cmp, err := e.svc.Compare(context.Background(), testMeter, now.Add(-time.Hour), now.Add(time.Hour),
		[]metering.LegacyTotal{{CustomerID: "lea", Total: 10}, {CustomerID: "lou", Total: 21}, {CustomerID: "liv", Total: 4}})
	if err != nil {
		t.Fatal(err)
	}
	if cmp.Compared != 3 || len(cmp.Mismatches) != 2 || cmp.Mismatches[0].CustomerID != "lou" || cmp.Mismatches[0].Difference != -1 ||
		cmp.Mismatches[1].CustomerID != "liv" || cmp.Mismatches[1].TallyTotal != 0 {
		t.Errorf("comparison %+v, want lou (-1) and liv (only in the legacy system)", cmp)
	}
	if _, err := e.svc.Compare(context.Background(), testMeter, now, now.Add(time.Hour),
		[]metering.LegacyTotal{{CustomerID: "lea", Total: 1}, {CustomerID: "lea", Total: 2}}); !errs.Is(err, errs.Invalid) {
		t.Errorf("a customer twice: %v, want invalid_request", err)
	}
}

// Totals past the int64 range are refused clearly, not wrapped or a 500.
func TestTotalsPastInt64AreRefused(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	var evs []metering.EventInput
	for i := range 1100 {
		evs = append(evs, ev("big", fmt.Sprintf("big-%04d", i), metering.MaxValue))
	}
	ingest(t, e.svc, evs[:1000]...)
	ingest(t, e.svc, evs[1000:]...)
	_, err := e.svc.Totals(context.Background(), metering.TotalsQuery{CustomerID: "big", Meter: testMeter})
	if !errs.Is(err, errs.Invalid) {
		t.Errorf("a total of 1100 × 2^53: %v, want invalid_request saying it is past the range", err)
	}
}

// One customer's billing period reconciled whole: the current one finds
// Stripe's extra usage, the previous one (no usage on either side) is
// compared too, and both runs are stored.
func TestReconcilePeriod(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	link(t, e.db, "pia")
	// A monthly period as Stripe counts one: in UTC, and on the last day of
	// a shorter month (a start on the 31st, a host zone with a daylight
	// saving change within the month, made another period on some days).
	start := time.Now().UTC().Add(-2 * time.Hour).Truncate(time.Minute)
	e.fake.StartSubscription("cus_pia", "price_api", start, monthsOnAnchor(start, 1))
	ts := time.Now().Add(-30 * time.Minute)
	a := ev("pia", "pp-1", 4)
	a.Timestamp = &ts
	ingest(t, e.svc, a)
	stop := startWorker(t, metering.NewWorker(e.workerOptions(t, fastConfig())))
	waitFor(t, "delivery", 20*time.Second, func() bool { return e.status(t, "pp-1") == metering.StatusDelivered })
	stop()
	e.fake.SetSummaryOverride("cus_pia", 6)
	cur, err := e.svc.ReconcilePeriod(context.Background(), testMeter, "pia", metering.PeriodCurrent)
	if err != nil {
		t.Fatal(err)
	}
	if !cur.From.Equal(start) || cur.Checked != 1 || len(cur.Mismatches) != 1 || cur.Mismatches[0].Difference != 2 || cur.ID == "" {
		t.Errorf("current period %+v, want from %s, pia off by 2, stored", cur, start)
	}
	prev, err := e.svc.ReconcilePeriod(context.Background(), testMeter, "pia", metering.PeriodPrevious)
	if err != nil {
		t.Fatal(err)
	}
	if !prev.To.Equal(start) || !prev.From.Equal(monthsOnAnchor(start, -1)) || prev.Checked != 1 {
		t.Errorf("previous period %+v, want [%s, %s) with pia compared", prev, monthsOnAnchor(start, -1), start)
	}
	if _, err := e.svc.ReconcilePeriod(context.Background(), testMeter, "nobody", metering.PeriodCurrent); !errs.Is(err, errs.NotFound) {
		t.Errorf("an unknown customer: %v, want not_found", err)
	}
	link(t, e.db, "nosub")
	if _, err := e.svc.ReconcilePeriod(context.Background(), testMeter, "nosub", metering.PeriodCurrent); !errs.Is(err, errs.Conflict) {
		t.Errorf("a customer without a subscription: %v, want conflict", err)
	}
}
