package stripehook_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/tallybilling/tally/internal/db/dbtest"
	"github.com/tallybilling/tally/internal/stripeapi"
	"github.com/tallybilling/tally/internal/stripehook"
)

// reportsStripe lists v1 events as listingStripe does, and one meter's
// error reports, which it refuses to list while reportsDown.
type reportsStripe struct {
	*listingStripe
	reportsDown bool
	reports     []stripeapi.RawEvent
}

func (s *reportsStripe) ListMeterErrorReports(_ context.Context, _ string, since time.Time) ([]stripeapi.RawEvent, error) {
	if s.reportsDown {
		return nil, &stripeapi.Error{Kind: stripeapi.KindAuth, Op: "list meter error reports", Message: "the key may not list v2 events"}
	}
	var out []stripeapi.RawEvent
	for _, r := range s.reports {
		if !r.Created.Before(since) {
			out = append(out, r)
		}
	}
	return out, nil
}

func (s *reportsStripe) GetMeterErrorReport(_ context.Context, id string) (stripeapi.MeterErrorReport, error) {
	return stripeapi.MeterErrorReport{EventID: id, Meter: "mtr_1"}, nil
}

type noRefusals struct{}

func (noRefusals) Refused(context.Context, stripeapi.MeterErrorReport) error { return nil }

// While Stripe refuses to list the meter error reports, the v1 catch-up
// goes on and moves its mark; the reports' window stays where the first
// failed listing began, so a report created meanwhile, never delivered,
// is listed once Stripe lists again, however far the v1 mark moved.
func TestAReportWindowAFailedListingLeftIsListedOnceStripeListsAgain(t *testing.T) {
	t.Parallel()
	gdb := dbtest.New(t)
	ctx := context.Background()
	clock := newTestClock()
	now, advance := clock.Now, clock.Advance
	stripe := &reportsStripe{listingStripe: &listingStripe{}, reportsDown: true}
	o := defaultOptions(t, gdb, "whsec_test")
	o.Now, o.Stripe, o.Usage, o.Meters = now, stripe, noRefusals{}, []string{"mtr_1"}
	h := stripehook.New(o)

	for i := range 3 {
		stripe.add(fmt.Sprintf("evt_v1_%d", i), now().Add(-time.Minute))
		if i == 0 {
			at := now().Add(30 * time.Minute)
			stripe.reports = append(stripe.reports, stripeapi.RawEvent{ID: "evt_report_missed", Type: stripeapi.EventMeterErrorReport, Created: at,
				Payload: []byte(fmt.Sprintf(`{"object":"v2.core.event","id":"evt_report_missed","type":%q,"created":%q,"livemode":false,`+
					`"related_object":{"id":"mtr_1","type":"billing.meter","url":"/v1/billing/meters/mtr_1"}}`, stripeapi.EventMeterErrorReport, at.UTC().Format(time.RFC3339Nano)))})
		}
		res, err := h.CatchUp(ctx, time.Time{})
		if err == nil || !eventStored(t, gdb, fmt.Sprintf("evt_v1_%d", i)) {
			t.Fatalf("catch-up %d with the reports unlisted: %+v, %v; want the v1 event stored and the reports' error", i, res, err)
		}
		advance(3 * time.Hour)
	}
	stripe.reportsDown = false
	if _, err := h.CatchUp(ctx, time.Time{}); err != nil {
		t.Fatal(err)
	}
	if !eventStored(t, gdb, "evt_report_missed") {
		t.Fatal("the report created while Stripe would not list reports was never listed")
	}
}
