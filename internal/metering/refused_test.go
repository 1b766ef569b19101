package metering_test

import (
	"context"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/tallybilling/tally/internal/metering"
	"github.com/tallybilling/tally/internal/stripeapi"
)

// A meter error report changes only the delivered events it names: each
// becomes dead stripe_refused with one usage.dead event, however often the
// report is settled; a pending, cancelled or unknown event it names is left
// as it is. Every refusal it counts goes to tally_usage_refused_total, once,
// and a count Stripe could not mean (below zero) is left out instead of
// failing.
func TestARefusalChangesOnlyTheDeliveredEventsItNames(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ctx := context.Background()
	reg := prometheus.NewRegistry()
	svc := metering.New(metering.Options{DB: e.db, Catalog: testCatalog(), Registry: reg})
	link(t, e.db, "rhea")
	ingest(t, svc, ev("rhea", "named-delivered", 1), ev("rhea", "named-pending", 1), ev("rhea", "named-cancelled", 1), ev("rhea", "unnamed", 1))
	if err := e.db.Exec(`UPDATE usage_events SET status = 'delivered', delivered_at = now(), attempts = 1
		WHERE identifier IN ('named-delivered', 'unnamed')`).Error; err != nil {
		t.Fatal(err)
	}
	if err := e.db.Exec(`UPDATE usage_events SET status = 'cancelled', cancelled_at = now() WHERE identifier = 'named-cancelled'`).Error; err != nil {
		t.Fatal(err)
	}
	report := stripeapi.MeterErrorReport{EventID: "evt_report", Meter: testMeterID, ErrorCount: 7, Types: []stripeapi.MeterErrorType{
		{Code: "meter_event_customer_not_found", Count: 7, Samples: []stripeapi.MeterErrorSample{
			{Identifier: "named-delivered", Message: "no such customer"}, {Identifier: "named-pending", Message: "no such customer"},
			{Identifier: "named-cancelled", Message: "no such customer"}, {Identifier: "never-stored", Message: "no such customer"},
		}},
		{Code: "odd", Count: -3},
	}}
	for range 2 {
		if err := svc.Refused(ctx, report); err != nil {
			t.Fatal(err)
		}
	}

	got, err := svc.Get(ctx, "named-delivered")
	if err != nil {
		t.Fatal(err)
	}
	if got.Status != metering.StatusDead || got.DeadCode != metering.DeadStripeRefused ||
		!strings.Contains(got.LastError, "evt_report") || !strings.Contains(got.LastError, "meter_event_customer_not_found") || !strings.Contains(got.LastError, "no such customer") {
		t.Errorf("the delivered event named: %+v, want dead stripe_refused with the report and Stripe's message", got)
	}
	for id, want := range map[string]metering.Status{"named-pending": metering.StatusPending, "named-cancelled": metering.StatusCancelled, "unnamed": metering.StatusDelivered} {
		if got, err := svc.Get(ctx, id); err != nil || got.Status != want {
			t.Errorf("%s: %+v (%v), want %s", id, got, err, want)
		}
	}
	var n int64
	if err := e.db.Raw(`SELECT count(*) FROM events WHERE type = 'usage.dead'`).Scan(&n).Error; err != nil {
		t.Fatal(err)
	}
	if n != 1 {
		t.Errorf("%d usage.dead events after the report was settled twice, want 1", n)
	}
	counted := map[string]float64{}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == "tally_usage_refused_total" {
			for _, m := range mf.GetMetric() {
				counted[m.GetLabel()[0].GetValue()] = m.GetCounter().GetValue()
			}
		}
	}
	// A report is applied once: settled again, it counts nothing more.
	if got := counted["meter_event_customer_not_found"]; got != 7 {
		t.Errorf("tally_usage_refused_total{code=meter_event_customer_not_found} = %v after the report of 7 settled twice, want 7", got)
	}
	if _, ok := counted["odd"]; ok {
		t.Errorf("a negative count was counted: %v", counted["odd"])
	}
	if got, ok := counted["timestamp_in_future"]; !ok || got != 0 {
		t.Errorf("tally_usage_refused_total{code=timestamp_in_future} = %v (present %v), want 0 from the start", got, ok)
	}
}
