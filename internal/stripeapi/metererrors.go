package stripeapi

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/stripe/stripe-go/v82"

	"github.com/tallybilling/tally/internal/errs"
)

// Stripe validates meter events after it has taken them (always on the v2
// stream, and for some errors on the v1 API too): an event it then refuses
// is dropped, never billed, and reported in a meter error report, a thin
// v2 event (v1.billing.meter.error_report_triggered, or
// v1.billing.meter.no_meter_found) whose details are fetched from
// GET /v2/core/events/{id}.

// Meter error report event types.
const (
	EventMeterErrorReport = "v1.billing.meter.error_report_triggered"
	EventMeterNoMeter     = "v1.billing.meter.no_meter_found"
)

// MeterErrorReport is one meter error report: how many events Stripe
// refused over [ValidationStart, ValidationEnd), by error code, each code
// with a few of its refused events named (Stripe samples them; the rest it
// only counts).
type MeterErrorReport struct {
	EventID string
	// Meter is the Stripe meter's id, "" for no_meter_found.
	Meter           string
	Summary         string
	ErrorCount      int64
	Types           []MeterErrorType
	ValidationStart time.Time
	ValidationEnd   time.Time
	Livemode        bool
}

// MeterErrorType is one error code of a report.
type MeterErrorType struct {
	Code    string
	Count   int64
	Samples []MeterErrorSample
}

// MeterErrorSample is one refused event a report names.
type MeterErrorSample struct {
	Identifier string
	Message    string
}

// GetMeterErrorReport fetches the meter error report eventID
// (GET /v2/core/events/{id}); stripe-go retries network failures. The
// event is read as stripe-go's pinned types decode it: a v2 event's body is
// unversioned.
// Errors: *Error (payment_provider_error, also for an event that is no
// meter error report; rate_limited; unavailable); invalid_request when
// eventID is empty.
func (c *client) GetMeterErrorReport(ctx context.Context, eventID string) (MeterErrorReport, error) {
	if strings.TrimSpace(eventID) == "" {
		return MeterErrorReport{}, errs.E(errs.Invalid, "stripeapi: an event id is required")
	}
	ctx, capture := withCapture(ctx)
	ev, err := c.api.V2CoreEvents.Retrieve(ctx, eventID, &stripe.V2CoreEventRetrieveParams{})
	if err != nil {
		return MeterErrorReport{}, classify("retrieve meter error report", err, capture, false)
	}
	switch e := ev.(type) {
	case *stripe.V1BillingMeterErrorReportTriggeredEvent:
		return meterErrorReport(e.V2BaseEvent, e.RelatedObject.ID, e.Data), nil
	case *stripe.V1BillingMeterNoMeterFoundEvent:
		// The same data under another type: read through the report's.
		var d stripe.V1BillingMeterErrorReportTriggeredEventData
		b, err := json.Marshal(e.Data)
		if err == nil {
			err = json.Unmarshal(b, &d)
		}
		if err != nil {
			return MeterErrorReport{}, &Error{Kind: KindServer, Op: "retrieve meter error report", Message: err.Error()}
		}
		return meterErrorReport(e.V2BaseEvent, "", d), nil
	}
	return MeterErrorReport{}, &Error{Kind: KindInvalid, Op: "retrieve meter error report", Message: "event " + eventID + " is no meter error report"}
}

func meterErrorReport(base stripe.V2BaseEvent, meter string, d stripe.V1BillingMeterErrorReportTriggeredEventData) MeterErrorReport {
	r := MeterErrorReport{EventID: base.ID, Meter: meter, Summary: d.DeveloperMessageSummary,
		ValidationStart: d.ValidationStart, ValidationEnd: d.ValidationEnd, Livemode: base.Livemode}
	if d.Reason == nil {
		return r
	}
	r.ErrorCount = d.Reason.ErrorCount
	for _, t := range d.Reason.ErrorTypes {
		if t == nil {
			continue
		}
		mt := MeterErrorType{Code: string(t.Code), Count: t.ErrorCount}
		for _, s := range t.SampleErrors {
			if s != nil && s.Request != nil && s.Request.Identifier != "" {
				mt.Samples = append(mt.Samples, MeterErrorSample{Identifier: s.Request.Identifier, Message: s.ErrorMessage})
			}
		}
		r.Types = append(r.Types, mt)
	}
	return r
}

// ListMeterErrorReports lists the meter error reports of one Stripe meter
// created since a time (Stripe keeps 30 days), oldest first, each
// re-encoded as the thin event Stripe delivers (GET /v2/core/events with
// object_id, newest first, read until an event older than since). It is
// not cut at a count: Stripe lists newest first, so a bound would keep the
// newest reports and drop the oldest, and every later catch-up, finding
// the same newest ones stored, would drop those again for good; the window
// is bounded by Stripe's 30 days instead. A 404 lists nothing (see
// below). Errors: *Error; invalid_request when meterID is empty.
func (c *client) ListMeterErrorReports(ctx context.Context, meterID string, since time.Time) ([]RawEvent, error) {
	if strings.TrimSpace(meterID) == "" {
		return nil, errs.E(errs.Invalid, "stripeapi: a meter id is required")
	}
	ctx, capture := withCapture(ctx)
	var out []RawEvent
	seen := 0 // events listed, of any type
	for ev, err := range c.api.V2CoreEvents.List(ctx, &stripe.V2CoreEventListParams{ObjectID: stripe.String(meterID), Limit: stripe.Int64(100)}) {
		if err != nil {
			err = classify("list meter error reports", err, capture, false)
			var se *Error
			if seen == 0 && errors.As(err, &se) && se.StatusCode == http.StatusNotFound {
				// A meter Stripe does not know has no reports, nor has a
				// stand-in without the v2 events API (stripe-mock). A 404
				// after a first page is an error: what was listed would
				// otherwise be dropped, the window moved past it.
				return nil, nil
			}
			return nil, err
		}
		seen++
		e, ok := ev.(*stripe.V1BillingMeterErrorReportTriggeredEvent)
		if !ok {
			continue // another type of event about the meter
		}
		if e.Created.Before(since) {
			break
		}
		thin, err := json.Marshal(map[string]any{
			"object": "v2.core.event", "id": e.ID, "type": EventMeterErrorReport, "created": e.Created.UTC().Format(time.RFC3339Nano),
			"livemode": e.Livemode, "related_object": map[string]any{"id": e.RelatedObject.ID, "type": e.RelatedObject.Type, "url": e.RelatedObject.URL},
		})
		if err != nil {
			return nil, err
		}
		out = append(out, RawEvent{ID: e.ID, Type: EventMeterErrorReport, Created: e.Created, Payload: thin})
	}
	slices.Reverse(out)
	return out, nil
}
