package sandbox

import (
	"context"

	"net/http"
	"net/url"
	"time"
)

// What moving usage onto Stripe's meters needs of the sandbox: meter event
// adjustments that cancel an event (POST /v1/billing/meter_event_adjustments,
// within 24 hours of receiving it, as at Stripe), and the billing periods
// of subscriptions (GET /v1/subscriptions?customer=&price=, the period on
// each item as in API versions since 2025-03-31).

// CancelWindow is how long after receiving a meter event Stripe lets an
// adjustment cancel it.
const CancelWindow = 24 * time.Hour

// createMeterEventAdjustment is POST /v1/billing/meter_event_adjustments
// (a.mu held). Stripe processes adjustments asynchronously; the sandbox
// applies one at once: the event stops counting in summaries. One naming an
// identifier the sandbox never received is recorded and changes nothing, as
// Stripe's asynchronous processing would report it only later.
func (a *Account) createMeterEventAdjustment(form url.Values) (map[string]any, error) {
	name, typ, identifier := form.Get("event_name"), form.Get("type"), form.Get("cancel[identifier]")
	switch {
	case name == "":
		return nil, invalid("event_name", "Missing required param: event_name.")
	case typ != "cancel":
		return nil, invalid("type", "Invalid type: %q (only cancel is supported).", typ)
	case identifier == "":
		return nil, invalid("cancel[identifier]", "Missing required param: cancel[identifier].")
	}
	now := a.now()
	for _, ev := range a.meterEvents {
		if ev.Identifier == identifier && !ev.Duplicate && ev.EventName == name && now.Sub(ev.ReceivedAt) > CancelWindow {
			return nil, invalid("cancel[identifier]", "The meter event %s was received more than 24 hours ago and can no longer be cancelled.", identifier)
		}
	}
	o := a.create("billing.meter_event_adjustment", newID("mtr_adj"), map[string]any{
		"event_name": name, "type": "cancel", "status": "complete", "cancel": map[string]any{"identifier": identifier},
	})
	return clone(o.data), nil
}

// cancelledMeterEvents are the identifiers adjustments cancelled (a.mu held).
func (a *Account) cancelledMeterEvents() map[string]bool {
	out := map[string]bool{}
	for _, o := range a.list("billing.meter_event_adjustment") {
		if c := sub(o.data, "cancel"); c != nil {
			out[str(c, "identifier")] = true
		}
	}
	return out
}

// MeterEventAdjustments returns how many adjustments named identifier.
func (a *Account) MeterEventAdjustments(identifier string) int {
	if a.lockRead(context.Background()) != nil {
		return 0
	}
	defer a.mu.Unlock()
	n := 0
	for _, o := range a.list("billing.meter_event_adjustment") {
		if c := sub(o.data, "cancel"); c != nil && str(c, "identifier") == identifier {
			n++
		}
	}
	return n
}

// StartSubscription gives customer an active subscription to price whose
// current billing period is [start, end), as a subscription started at
// start with a monthly price would have.
func (a *Account) StartSubscription(ctx context.Context, customer, price string, start, end time.Time) (string, error) {
	var id string
	err := a.do(ctx, func() error {
		s := a.create("subscription", newID("sub"), map[string]any{
			"customer": customer, "status": "active", "metadata": map[string]any{},
			"items": map[string]any{"object": "list", "data": []any{map[string]any{
				"object": "subscription_item", "price": map[string]any{"id": price, "object": "price"}, "quantity": nil,
				"current_period_start": start.Unix(), "current_period_end": end.Unix(),
			}}},
			"current_period_start": start.Unix(), "cancel_at_period_end": false, "collection_method": "charge_automatically",
		})
		id = s.id
		a.emit("customer.subscription.created", s, requestRef{})
		return nil
	})
	return id, err
}

// listSubscriptions is GET /v1/subscriptions, filtered by customer, price
// and status (default: every status but canceled, as at Stripe). An item
// without its own period (a subscription a checkout started) is given one
// calendar month from the subscription's current_period_start.
func (a *Account) listSubscriptions(q url.Values) map[string]any {
	status := q.Get("status")
	data := []any{}
	for _, o := range a.list("subscription") {
		if c := q.Get("customer"); c != "" && str(o.data, "customer") != c {
			continue
		}
		if s := str(o.data, "status"); (status == "" && s == "canceled") || (status != "" && status != "all" && s != status) {
			continue
		}
		d := clone(o.data)
		items := sub(d, "items")
		var list []any
		if items != nil {
			list, _ = items["data"].([]any)
		}
		match := q.Get("price") == ""
		for _, it := range list {
			im, _ := it.(map[string]any)
			if im == nil {
				continue
			}
			if p := sub(im, "price"); p != nil && str(p, "id") == q.Get("price") {
				match = true
			}
			if _, ok := im["current_period_end"]; !ok {
				start := time.Unix(num(d, "current_period_start"), 0).UTC()
				im["current_period_start"] = start.Unix()
				im["current_period_end"] = monthLater(start).Unix()
			}
		}
		if match {
			data = append(data, d)
		}
	}
	return map[string]any{"object": "list", "url": "/v1/subscriptions", "has_more": false, "data": data}
}

// meterMigrationGET serves the GETs of this file; false when path is not one.
func (a *Account) meterMigrationGET(w http.ResponseWriter, path string, q url.Values) bool {
	if path != "/v1/subscriptions" {
		return false
	}
	writeJSON(w, http.StatusOK, a.listSubscriptions(q))
	return true
}

// monthLater is t a calendar month on, on t's day or on the last day of a
// shorter month, as Stripe ends a monthly billing period: a period started
// January 31 ends February 28 (AddDate would give March 3).
func monthLater(t time.Time) time.Time {
	t = t.UTC()
	first := time.Date(t.Year(), t.Month()+1, 1, t.Hour(), t.Minute(), t.Second(), t.Nanosecond(), time.UTC)
	return first.AddDate(0, 0, min(t.Day(), first.AddDate(0, 1, -1).Day())-1)
}
