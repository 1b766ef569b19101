package metering_test

import (
	"context"
	"fmt"
	"net/http"
	"net/url"
	"reflect"
	"sync"
	"testing"
	"time"

	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/metering"
)

// Delivered events past the usage retention are purged into daily totals:
// the rows go, in batches of the size asked, by two instances at once, and
// usage totals and reconciliation answer exactly as before the purge, for
// windows inside the retention, straddling its horizon and wholly before it.
// Pending, waiting and dead events are never purged.
func TestPurgeKeepsTotalsAndReconciliationAnswers(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ctx := context.Background()
	t0 := time.Now().UTC()
	clock := &simClock{t: t0}
	const retention = 40 * 24 * time.Hour
	svc := metering.New(metering.Options{DB: e.db, Stripe: newClient(t, e.fake, 0), Catalog: testCatalog(), Now: clock.Now, UsageRetention: retention})
	e.fake.SetClock(clock.Now)
	link(t, e.db, "rita")
	link(t, e.db, "sol")
	e.fake.SetFault(func(r *http.Request) (int, string, bool) {
		body := make([]byte, 4096)
		n, _ := r.Body.Read(body)
		if form, _ := url.ParseQuery(string(body[:n])); form.Get("identifier") == "refused" {
			return http.StatusBadRequest, `{"error":{"type":"invalid_request_error","message":"No such meter."}}`, true
		}
		return 0, "", false
	})
	opts := e.workerOptions(t, fastConfig())
	opts.Now = clock.Now
	w := metering.NewWorker(opts)
	deliver := func() {
		t.Helper()
		for range 5 {
			if _, err := w.RunOnce(ctx); err != nil {
				t.Fatal(err)
			}
		}
	}
	// Reported at t0: usage of the last 34 days, every 7 hours, two
	// customers, two meters.
	var evs []metering.EventInput
	var purgeable int64
	for i := range 34 * 24 / 7 {
		at := t0.Add(-time.Duration(i*7+1) * time.Hour)
		meter := []string{testMeter, otherMeter}[i%2]
		evs = append(evs, metering.EventInput{CustomerID: []string{"rita", "sol"}[i%3%2], Meter: meter, Value: float64(i%9 + 1),
			Identifier: fmt.Sprintf("old-%03d", i), Timestamp: new(at)})
		purgeable++
	}
	evs = append(evs,
		metering.EventInput{CustomerID: "rita", Meter: testMeter, Value: 500, Identifier: "refused", Timestamp: new(t0.Add(-3 * 24 * time.Hour))},
		metering.EventInput{CustomerID: "tom", Meter: testMeter, Value: 70, Identifier: "waiting", Timestamp: new(t0.Add(-2 * 24 * time.Hour))},
	)
	ingest(t, svc, evs...)
	deliver()
	// Reported 30 days later: the last day's usage.
	clock.Add(30 * 24 * time.Hour)
	var recent []metering.EventInput
	for i := range 8 {
		recent = append(recent, metering.EventInput{CustomerID: "sol", Meter: testMeter, Value: 3,
			Identifier: fmt.Sprintf("new-%d", i), Timestamp: new(clock.Now().Add(-time.Duration(i*3) * time.Hour))})
	}
	ingest(t, svc, recent...)
	deliver()
	if n := countRows(t, e.db, `status = 'delivered'`); n != purgeable+8 {
		t.Fatalf("%d delivered, want %d", n, purgeable+8)
	}

	// 62 days after t0 the first batch is past the retention, the second
	// is not.
	clock.Set(t0.Add(62 * 24 * time.Hour))
	now := clock.Now()
	type answers struct {
		Totals []metering.Totals
		Recs   []metering.Reconciliation
	}
	read := func() answers {
		t.Helper()
		var a answers
		for _, q := range []metering.TotalsQuery{
			{CustomerID: "rita"},
			{CustomerID: "sol"},
			{CustomerID: "sol", Meter: testMeter, From: new(t0.Add(-40 * 24 * time.Hour))},
			{CustomerID: "rita", From: new(t0.Add(-20*24*time.Hour + 5*time.Hour)), To: new(t0.Add(-10*24*time.Hour + 3*time.Hour))},
			{CustomerID: "sol", From: new(t0.Add(-3 * 24 * time.Hour)), To: new(now)},
			{CustomerID: "tom", From: new(t0.Add(-40 * 24 * time.Hour))},
		} {
			got, err := svc.Totals(ctx, q)
			if err != nil {
				t.Fatal(err)
			}
			a.Totals = append(a.Totals, got)
		}
		for _, win := range [][2]time.Time{
			{t0.Add(-40 * 24 * time.Hour), now},
			{t0.Add(-20*24*time.Hour + 5*time.Hour), t0.Add(-10*24*time.Hour + 3*time.Hour)},
			{t0.Add(25 * 24 * time.Hour), now},
		} {
			for _, meter := range []string{testMeter, otherMeter} {
				rec, err := svc.Reconcile(ctx, meter, win[0], win[1])
				if err != nil {
					t.Fatal(err)
				}
				rec.ID = "" // each run is stored under its own id
				a.Recs = append(a.Recs, rec)
			}
		}
		return a
	}
	before := read()
	if all := before.Totals[2]; len(all.Meters) != 1 || all.Meters[0].Total == 0 {
		t.Fatalf("sol's api_calls since t0-40d: %+v, want some usage", all)
	}
	// rita's refused event is dead: Stripe never counted it, nor does the
	// local total, so both customers agree with Stripe.
	if rec := before.Recs[0]; rec.Checked != 2 || len(rec.Mismatches) != 0 || !rec.From.Equal(t0.Add(-40*24*time.Hour).Truncate(24*time.Hour)) {
		t.Errorf("reconciliation before the purge: %+v, want 2 customers agreeing from a whole UTC day", rec)
	}
	if w := before.Totals[3]; !w.From.Equal(t0.Add(-20*24*time.Hour+5*time.Hour).Truncate(24*time.Hour)) ||
		!w.To.Equal(t0.Add(-10*24*time.Hour+3*time.Hour).Truncate(24*time.Hour).Add(24*time.Hour)) {
		t.Errorf("window before the horizon %s..%s, want whole UTC days", w.From, w.To)
	}

	// One batch deletes at most its size; two instances purge the rest at
	// once.
	if n, err := svc.PurgeDelivered(ctx, 5); err != nil || n != 5 {
		t.Fatalf("one batch of 5: %d, %v", n, err)
	}
	var wg sync.WaitGroup
	var purged [2]int64
	for i := range 2 {
		other := metering.New(metering.Options{DB: e.db, Stripe: newClient(t, e.fake, 0), Catalog: testCatalog(), Now: clock.Now, UsageRetention: retention})
		wg.Go(func() {
			n, err := db.PurgeInBatches(ctx, 7, other.PurgeDelivered)
			if err != nil {
				t.Errorf("purge %d: %v", i, err)
			}
			purged[i] = n
		})
	}
	wg.Wait()
	if got := 5 + purged[0] + purged[1]; got != purgeable {
		t.Errorf("purged %d rows (5 + %d + %d), want %d", got, purged[0], purged[1], purgeable)
	}
	if n := countRows(t, e.db, `identifier LIKE 'old-%'`); n != 0 {
		t.Errorf("%d old delivered rows left", n)
	}
	if n := countRows(t, e.db, `identifier LIKE 'new-%' OR identifier IN ('refused', 'waiting')`); n != 10 {
		t.Errorf("%d recent, dead and waiting rows left, want 10", n)
	}
	var rolled struct{ Events, Total int64 }
	e.db.Raw(`SELECT COALESCE(sum(events), 0) AS events, COALESCE(sum(total), 0) AS total FROM usage_daily_totals`).Scan(&rolled)
	if rolled.Events != purgeable {
		t.Errorf("daily totals count %d events, want %d", rolled.Events, purgeable)
	}

	after := read()
	if !reflect.DeepEqual(before, after) {
		t.Errorf("answers changed by the purge:\nbefore %+v\nafter  %+v", before, after)
	}
	if n, err := metering.New(metering.Options{DB: e.db, Catalog: testCatalog(), Now: clock.Now}).PurgeDelivered(ctx, 100); err != nil || n != 0 {
		t.Errorf("purge without a retention: %d, %v; want nothing", n, err)
	}
}
