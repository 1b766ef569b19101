package sandbox

import (
	"context"
	"fmt"
	"net/http"
	"net/url"
	"sort"
	"strconv"
	"time"
)

// MeterEvent is one meter event the sandbox accepted.
type MeterEvent struct {
	Seq        int64
	Identifier string
	EventName  string
	Payload    map[string]string
	Timestamp  time.Time
	// Via is "v1" (POST /v1/billing/meter_events) or "v2" (the stream).
	Via string
	// Duplicate marks a v2 event whose identifier was already accepted:
	// Stripe accepts the request and drops the event later, so summaries
	// ignore it. v1 duplicates are refused (400) and never recorded.
	Duplicate  bool
	ReceivedAt time.Time
}

// createMeterEvent is POST /v1/billing/meter_events.
func (a *Account) createMeterEvent(form url.Values) (map[string]any, error) {
	name := form.Get("event_name")
	payload := bracketMap(form, "payload")
	if name == "" {
		return nil, &Error{Status: http.StatusBadRequest, Type: "invalid_request_error", Code: "parameter_missing", Param: "event_name", Message: "Missing required param: event_name."}
	}
	if len(payload) == 0 {
		return nil, &Error{Status: http.StatusBadRequest, Type: "invalid_request_error", Code: "parameter_missing", Param: "payload", Message: "Missing required param: payload."}
	}
	now := a.now()
	ts := now
	if v := form.Get("timestamp"); v != "" {
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil {
			return nil, &Error{Status: http.StatusBadRequest, Type: "invalid_request_error", Code: "parameter_invalid_integer", Param: "timestamp", Message: "Invalid integer: " + v}
		}
		ts = time.Unix(n, 0)
		if err := meterEventTimestampAllowed(ts, now); err != nil {
			return nil, err
		}
	}
	identifier := form.Get("identifier")
	if identifier == "" {
		identifier = newID("sandbox_generated")
	}
	if a.accepted[identifier] > 0 {
		return nil, &Error{Status: http.StatusBadRequest, Type: "invalid_request_error", Param: "identifier",
			Message: fmt.Sprintf("An event already exists with identifier %s.", identifier)}
	}
	a.recordMeterEvent(MeterEvent{Identifier: identifier, EventName: name, Payload: payload, Timestamp: ts, Via: "v1", ReceivedAt: now})
	return map[string]any{
		"object": "billing.meter_event", "event_name": name, "identifier": identifier, "payload": stringMap(payload),
		"timestamp": ts.Unix(), "created": now.Unix(), "livemode": false,
	}, nil
}

// Stripe takes a meter event whose timestamp is within the past 35
// calendar days or up to 5 minutes ahead of its own clock; the meter
// events API refuses any other with a 400 naming the parameter. The v2
// stream validates after it answers: it answers 200 and drops them.
const (
	meterEventMaxAge   = 35 * 24 * time.Hour
	meterEventMaxAhead = 5 * time.Minute
)

// meterEventTimestampAllowed refuses a timestamp outside Stripe's window
// around now. The past refusal's wording is Stripe's; the future one is
// written the same way.
func meterEventTimestampAllowed(ts, now time.Time) error {
	if earliest := now.Add(-meterEventMaxAge); ts.Before(earliest) {
		return &Error{Status: http.StatusBadRequest, Type: "invalid_request_error", Param: "timestamp", Message: fmt.Sprintf(
			"The event timestamp cannot be more than 35 days in past. Expected a timestamp greater than or equal to %d.", earliest.Unix())}
	}
	if latest := now.Add(meterEventMaxAhead); ts.After(latest) {
		return &Error{Status: http.StatusBadRequest, Type: "invalid_request_error", Param: "timestamp", Message: fmt.Sprintf(
			"The event timestamp cannot be more than 5 minutes in the future. Expected a timestamp less than or equal to %d.", latest.Unix())}
	}
	return nil
}

func (a *Account) recordMeterEvent(me MeterEvent) {
	me.Seq = a.nextSeq()
	if a.accepted[me.Identifier] > 0 {
		me.Duplicate = true
	}
	a.accepted[me.Identifier]++
	a.meterEvents = append(a.meterEvents, me)
	a.changes.MeterEvents = append(a.changes.MeterEvents, me)
}

// openMeterSession is POST /v2/billing/meter_event_session. Session
// tokens live in memory only: they last 15 minutes, and tally, which runs
// the sandbox, restarts with it and opens new ones.
func (a *Account) openMeterSession() map[string]any {
	now := a.now()
	id := newID("mes")
	token := newID("mes_tok")
	expires := now.Add(a.sessionLife)
	a.sessions[token] = expires
	return map[string]any{
		"id": id, "object": "v2.billing.meter_event_session", "authentication_token": token,
		"created": now.UTC().Format(time.RFC3339Nano), "expires_at": expires.UTC().Format(time.RFC3339Nano), "livemode": false,
	}
}

type streamEvent struct {
	EventName  string            `json:"event_name"`
	Identifier string            `json:"identifier"`
	Payload    map[string]string `json:"payload"`
	Timestamp  *time.Time        `json:"timestamp"`
}

// streamMeterEvents is POST /v2/billing/meter_event_stream, authenticated
// by a session token (a.mu held).
func (a *Account) streamMeterEvents(token string, evs []streamEvent) error {
	expires, known := a.sessions[token]
	if !known {
		return &Error{Status: http.StatusUnauthorized, Type: "invalid_request_error", Code: "unauthorized", Message: "The meter event stream needs a meter event session token."}
	}
	if !a.now().Before(expires) {
		return &Error{Status: http.StatusUnauthorized, Type: "temporary_session_expired", Code: "billing_meter_event_session_expired", Message: "The temporary session token has expired."}
	}
	if len(evs) == 0 || len(evs) > 100 {
		return &Error{Status: http.StatusBadRequest, Type: "invalid_request_error", Code: "invalid_request", Message: fmt.Sprintf("events must hold 1 to 100 events, got %d.", len(evs))}
	}
	for i, ev := range evs {
		if ev.EventName == "" || len(ev.Payload) == 0 {
			return &Error{Status: http.StatusBadRequest, Type: "invalid_request_error", Code: "invalid_request", Message: fmt.Sprintf("events[%d] needs an event_name and a payload.", i)}
		}
	}
	now := a.now()
	refused := map[string][]refusal{} // by event name
	for _, ev := range evs {
		identifier := ev.Identifier
		if identifier == "" {
			identifier = newID("sandbox_generated")
		}
		ts := now
		if ev.Timestamp != nil {
			ts = *ev.Timestamp
		}
		if err := meterEventTimestampAllowed(ts, now); err != nil {
			// Stripe validates a stream's events after answering: one
			// outside its window is taken with the others, then dropped,
			// never counted, and reported in a meter error report.
			code := "timestamp_too_far_in_past"
			if ts.After(now) {
				code = "timestamp_in_future"
			}
			refused[ev.EventName] = append(refused[ev.EventName], refusal{identifier: identifier, code: code, message: err.(*Error).Message})
			continue
		}
		a.recordMeterEvent(MeterEvent{Identifier: identifier, EventName: ev.EventName, Payload: ev.Payload, Timestamp: ts, Via: "v2", ReceivedAt: now})
	}
	names := make([]string, 0, len(refused))
	for name := range refused {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		a.reportMeterErrors(name, refused[name], now)
	}
	return nil
}

// refusal is one meter event Stripe dropped after taking it.
type refusal struct {
	identifier, code, message string
}

// maxSampleErrors is how many refused events of one error type a meter
// error report names; the rest it only counts, as Stripe's do.
const maxSampleErrors = 5

// reportMeterErrors emits the v1.billing.meter.error_report_triggered
// event of the events of eventName refused at now (a.mu held). Stripe
// gathers a meter's errors over a window into one report; the sandbox
// reports each stream request's at once.
func (a *Account) reportMeterErrors(eventName string, refused []refusal, now time.Time) {
	meterID := eventName
	for id, name := range a.meters {
		if name == eventName {
			meterID = id
			break
		}
	}
	var codes []string
	byCode := map[string][]refusal{}
	for _, r := range refused {
		if byCode[r.code] == nil {
			codes = append(codes, r.code)
		}
		byCode[r.code] = append(byCode[r.code], r)
	}
	types := make([]map[string]any, 0, len(codes))
	for _, code := range codes {
		rs := byCode[code]
		samples := []map[string]any{}
		for _, r := range rs[:min(len(rs), maxSampleErrors)] {
			samples = append(samples, map[string]any{"error_message": r.message, "request": map[string]any{"identifier": r.identifier}})
		}
		types = append(types, map[string]any{"code": code, "error_count": len(rs), "sample_errors": samples})
	}
	summary := fmt.Sprintf("There are %d invalid events", len(refused))
	if len(refused) == 1 {
		summary = "There is 1 invalid event"
	}
	a.emitV2("v1.billing.meter.error_report_triggered",
		map[string]any{"id": meterID, "type": "billing.meter", "url": "/v1/billing/meters/" + meterID},
		map[string]any{
			"developer_message_summary": summary,
			"reason":                    map[string]any{"error_count": len(refused), "error_types": types},
			"validation_start":          now.UTC().Truncate(time.Second).Format(time.RFC3339Nano),
			"validation_end":            now.UTC().Truncate(time.Second).Add(time.Second).Format(time.RFC3339Nano),
		})
}

func (a *Account) isSessionToken(token string) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	_, ok := a.sessions[token]
	return ok
}

// eventName is what meter id aggregates (a.mu held).
func (a *Account) eventName(meterID string) string {
	if name, ok := a.meters[meterID]; ok {
		return name
	}
	return meterID
}

// summary is Stripe's aggregated value of customer on meterID over
// [start, end) (a.mu held): the sum of the values of the events accepted.
func (a *Account) summary(meterID, customer string, start, end int64) float64 {
	name := a.eventName(meterID)
	cancelled := a.cancelledMeterEvents()
	var total float64
	for _, ev := range a.meterEvents {
		if ev.Duplicate || cancelled[ev.Identifier] || ev.EventName != name || ev.Payload["stripe_customer_id"] != customer {
			continue
		}
		if ts := ev.Timestamp.Unix(); ts < start || ts >= end {
			continue
		}
		if v, err := strconv.ParseFloat(ev.Payload["value"], 64); err == nil {
			total += v
		}
	}
	if v, ok := a.overrides[customer]; ok {
		total = v
	}
	return total
}

// summaries is GET /v1/billing/meters/{id}/event_summaries.
func (a *Account) summaries(meterID string, q url.Values) (map[string]any, error) {
	customer := q.Get("customer")
	start, errStart := strconv.ParseInt(q.Get("start_time"), 10, 64)
	end, errEnd := strconv.ParseInt(q.Get("end_time"), 10, 64)
	switch {
	case customer == "":
		return nil, &Error{Status: http.StatusBadRequest, Type: "invalid_request_error", Code: "parameter_missing", Param: "customer", Message: "Missing required param: customer."}
	case errStart != nil || errEnd != nil:
		return nil, &Error{Status: http.StatusBadRequest, Type: "invalid_request_error", Code: "parameter_missing", Message: "start_time and end_time are required integers."}
	case start%60 != 0 || end%60 != 0:
		return nil, &Error{Status: http.StatusBadRequest, Type: "invalid_request_error", Code: "parameter_invalid", Message: "start_time and end_time must be aligned with minute boundaries."}
	}
	return map[string]any{
		"object": "list", "url": "/v1/billing/meters/" + meterID + "/event_summaries", "has_more": false,
		"data": []map[string]any{{
			"id": newID("mtrusg"), "object": "billing.meter_event_summary", "aggregated_value": a.summary(meterID, customer, start, end),
			"start_time": start, "end_time": end, "meter": meterID, "livemode": false,
		}},
	}, nil
}

// MeterEvents returns every accepted meter event, in order of arrival.
func (a *Account) MeterEvents() []MeterEvent {
	if a.lockRead(context.Background()) != nil {
		return nil
	}
	defer a.mu.Unlock()
	out := make([]MeterEvent, len(a.meterEvents))
	for i, ev := range a.meterEvents {
		p := make(map[string]string, len(ev.Payload))
		for k, v := range ev.Payload {
			p[k] = v
		}
		ev.Payload = p
		out[i] = ev
	}
	return out
}

// Count returns how many deliveries of identifier were accepted: at most 1
// through v1, which refuses duplicates; through v2 every accepted copy.
func (a *Account) Count(identifier string) int {
	if a.lockRead(context.Background()) != nil {
		return 0
	}
	defer a.mu.Unlock()
	return a.accepted[identifier]
}

// MeterView is what the dashboard shows of one meter.
type MeterView struct {
	ID, EventName string
	Events        int
	Duplicates    int
	// Customers are the Stripe customers with events, each with the
	// total of its values (Stripe's summary over all time).
	Customers []MeterCustomer
}

// MeterCustomer is one customer's usage on a meter.
type MeterCustomer struct {
	Customer string
	Events   int
	Total    float64
}

// Meters returns every meter the sandbox knows or has events for.
func (a *Account) Meters(ctx context.Context) []MeterView {
	var out []MeterView
	_ = a.view(ctx, func() { out = a.meterViews() })
	return out
}

// meterViews is Meters with a.mu held.
func (a *Account) meterViews() []MeterView {
	byName := map[string]*MeterView{}
	var out []*MeterView
	for id, name := range a.meters {
		v := &MeterView{ID: id, EventName: name}
		byName[name] = v
		out = append(out, v)
	}
	perCustomer := map[string]map[string]*MeterCustomer{}
	for _, ev := range a.meterEvents {
		v := byName[ev.EventName]
		if v == nil {
			v = &MeterView{ID: "(no meter)", EventName: ev.EventName}
			byName[ev.EventName] = v
			out = append(out, v)
		}
		if ev.Duplicate {
			v.Duplicates++
			continue
		}
		v.Events++
		if perCustomer[ev.EventName] == nil {
			perCustomer[ev.EventName] = map[string]*MeterCustomer{}
		}
		c := perCustomer[ev.EventName][ev.Payload["stripe_customer_id"]]
		if c == nil {
			c = &MeterCustomer{Customer: ev.Payload["stripe_customer_id"]}
			perCustomer[ev.EventName][c.Customer] = c
		}
		c.Events++
		if f, err := strconv.ParseFloat(ev.Payload["value"], 64); err == nil {
			c.Total += f
		}
	}
	res := make([]MeterView, 0, len(out))
	for _, v := range out {
		for _, c := range perCustomer[v.EventName] {
			v.Customers = append(v.Customers, *c)
		}
		sort.Slice(v.Customers, func(i, j int) bool { return v.Customers[i].Customer < v.Customers[j].Customer })
		res = append(res, *v)
	}
	sort.Slice(res, func(i, j int) bool { return res[i].ID < res[j].ID })
	return res
}
