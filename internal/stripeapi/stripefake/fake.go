// Package stripefake is a stateful, fault-injecting fake of the few Stripe
// endpoints tally uses, served by httptest. The real stripeapi client talks
// to it (stripeapi.Config.APIURL = fake.URL()), so tests exercise the real
// request encoding, headers and error handling. stripe-mock, being stateless,
// cannot show what this fake shows: idempotent replays, duplicate meter
// event identifiers, expiring v2 sessions, summaries computed from what was
// sent, 429 with Retry-After, 5xx and hangs.
//
// Endpoints:
//
//	POST /v1/customers                          (Idempotency-Key honoured)
//	POST /v1/checkout/sessions                  (Idempotency-Key honoured)
//	GET  /v1/checkout/sessions/{id}             (the session as created, paid or updated)
//	POST /v1/billing/meter_events               (duplicate identifier: 400)
//	GET  /v1/billing/meters/{id}/event_summaries
//	POST /v2/billing/meter_event_session
//	POST /v2/billing/meter_event_stream         (Bearer session token)
//
// Faults (FailNext, SetFault, SetHang, HangUntilReleased) apply to every
// endpoint, before it runs. A hung request is still processed once the hang
// ends, even if its client gave up, as Stripe may act on a request whose
// answer never arrives. DropAnswers shows that case at once: the request is
// processed and its answer lost.
package stripefake

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"reflect"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// DefaultSessionLifetime is how long a v2 meter event session lives, as at Stripe.
const DefaultSessionLifetime = 15 * time.Minute

// RecordedRequest is one request the fake received.
type RecordedRequest struct {
	Method         string
	Path           string
	Query          string
	IdempotencyKey string
	Body           string
	Status         int // the status the fake answered
	// Dropped marks a request whose answer DropAnswers kept from the client.
	Dropped bool
	Time    time.Time
}

// RecordedMeterEvent is one meter event the fake accepted.
type RecordedMeterEvent struct {
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

type idempotentResult struct {
	method, path string
	form         url.Values
	status       int
	body         []byte
}

type injectedFault struct {
	status     int
	retryAfter string
}

// Fake is the fake Stripe. All methods are safe for concurrent use.
type Fake struct {
	srv       *httptest.Server
	done      chan struct{}
	closeOnce sync.Once

	mu              sync.Mutex
	seq             int
	idempotent      map[string]idempotentResult
	customers       []url.Values
	checkouts       []url.Values
	sessionObjects  map[string]map[string]any
	events          []RecordedMeterEvent
	accepted        map[string]int
	sessions        map[string]time.Time
	sessionLifetime time.Duration
	meters          map[string]string
	overrides       map[string]float64
	failNext        []injectedFault
	fault           func(r *http.Request) (status int, body string, ok bool)
	drop            func(r *http.Request) bool
	hang            time.Duration
	gate            chan struct{}
	requests        []RecordedRequest
}

// New starts a fake Stripe that is closed when the test ends.
func New(t testing.TB) *Fake {
	t.Helper()
	f := &Fake{
		done:            make(chan struct{}),
		idempotent:      map[string]idempotentResult{},
		sessionObjects:  map[string]map[string]any{},
		accepted:        map[string]int{},
		sessions:        map[string]time.Time{},
		sessionLifetime: DefaultSessionLifetime,
		meters:          map[string]string{},
		overrides:       map[string]float64{},
	}
	f.srv = httptest.NewServer(http.HandlerFunc(f.serve))
	t.Cleanup(f.Close)
	return f
}

// URL is the fake's base URL, for stripeapi.Config.APIURL (and MeterEventsURL).
func (f *Fake) URL() string { return f.srv.URL }

// Close releases hung requests and stops the server. New registers it with
// the test's Cleanup; calling it again is harmless.
func (f *Fake) Close() {
	f.closeOnce.Do(func() {
		close(f.done)
		f.srv.Close()
	})
}

// FailNext answers the next n requests, whatever their endpoint, with status
// and a Stripe-shaped error body, plus a Retry-After header when retryAfter
// is not empty. 429 carries code rate_limit, as at Stripe.
func (f *Fake) FailNext(n int, status int, retryAfter string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for range n {
		f.failNext = append(f.failNext, injectedFault{status: status, retryAfter: retryAfter})
	}
}

// SetFault installs fn, consulted for every request after FailNext's queue:
// when it returns ok, the fake answers status and body (JSON) instead of
// running the endpoint. fn may read r.Body; the endpoint still sees it.
// nil removes it.
func (f *Fake) SetFault(fn func(r *http.Request) (status int, body string, ok bool)) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.fault = fn
}

// DropAnswers installs fn, consulted for every request: when it returns
// true, the request is handled as usual (faults included, so what it
// creates is kept) but its answer is never sent: the connection is closed,
// as when a timeout or a broken connection loses Stripe's answer. fn may
// read r.Body; the endpoint still sees it. nil removes it.
func (f *Fake) DropAnswers(fn func(r *http.Request) bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.drop = fn
}

// SetHang delays every request by d before it is handled (0 stops it).
func (f *Fake) SetHang(d time.Duration) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.hang = d
}

// HangUntilReleased holds every request arriving from now on until release
// is called (or the fake closes); then they are handled as usual.
func (f *Fake) HangUntilReleased() (release func()) {
	gate := make(chan struct{})
	f.mu.Lock()
	f.gate = gate
	f.mu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			f.mu.Lock()
			if f.gate == gate {
				f.gate = nil
			}
			f.mu.Unlock()
			close(gate)
		})
	}
}

// SetSessionLifetime sets the lifetime of v2 meter event sessions opened
// from now on.
func (f *Fake) SetSessionLifetime(d time.Duration) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.sessionLifetime = d
}

// ExpireSessions makes every v2 session token opened so far expired.
func (f *Fake) ExpireSessions() {
	f.mu.Lock()
	defer f.mu.Unlock()
	past := time.Now().Add(-time.Second)
	for tok := range f.sessions {
		f.sessions[tok] = past
	}
}

// SetMeter maps a meter id to the event name it aggregates. A meter id
// without a mapping aggregates the events whose event name equals the id.
func (f *Fake) SetMeter(meterID, eventName string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.meters[meterID] = eventName
}

// SetSummaryOverride makes every summary of a Stripe customer report value,
// whatever was sent, so reconciliation can be shown a drift.
func (f *Fake) SetSummaryOverride(customer string, value float64) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.overrides[customer] = value
}

// Customers returns the form parameters of every customer created (not of
// idempotent replays), in order.
func (f *Fake) Customers() []url.Values {
	f.mu.Lock()
	defer f.mu.Unlock()
	return cloneForms(f.customers)
}

// CheckoutSessions returns the form parameters of every Checkout Session
// created (not of idempotent replays), in order.
func (f *Fake) CheckoutSessions() []url.Values {
	f.mu.Lock()
	defer f.mu.Unlock()
	return cloneForms(f.checkouts)
}

// CheckoutSession returns the Checkout Session object with id as
// GET /v1/checkout/sessions/{id} answers it, nil when the fake never created it.
func (f *Fake) CheckoutSession(id string) map[string]any {
	f.mu.Lock()
	defer f.mu.Unlock()
	return cloneObject(f.sessionObjects[id])
}

// PayCheckoutSession is the buyer paying Checkout Session id with
// PaymentIntent paymentIntentID: the session becomes complete and paid and
// names the PaymentIntent, as Stripe shows it afterwards. It returns the
// session object (for a checkout.session.completed event), nil when the
// fake never created the session.
func (f *Fake) PayCheckoutSession(id, paymentIntentID string) map[string]any {
	return f.UpdateCheckoutSession(id, map[string]any{"status": "complete", "payment_status": "paid", "payment_intent": paymentIntentID})
}

// UpdateCheckoutSession sets top-level fields of Checkout Session id, as
// Stripe would have filled them (amount_total and total_details for Stripe
// Tax, currency and currency_conversion for Adaptive Pricing), and returns
// the session object, nil when the fake never created the session.
func (f *Fake) UpdateCheckoutSession(id string, fields map[string]any) map[string]any {
	f.mu.Lock()
	defer f.mu.Unlock()
	obj, ok := f.sessionObjects[id]
	if !ok {
		return nil
	}
	for k, v := range cloneObject(fields) {
		obj[k] = v
	}
	return cloneObject(obj)
}

// MeterEvents returns every accepted meter event, in order of arrival.
func (f *Fake) MeterEvents() []RecordedMeterEvent {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := make([]RecordedMeterEvent, len(f.events))
	for i, ev := range f.events {
		ev.Payload = cloneMap(ev.Payload)
		out[i] = ev
	}
	return out
}

// Count returns how many deliveries of identifier the fake accepted: at
// most 1 through v1, which refuses duplicates; through v2 every accepted
// copy counts.
func (f *Fake) Count(identifier string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.accepted[identifier]
}

// Requests returns every request received, in order of arrival.
func (f *Fake) Requests() []RecordedRequest {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]RecordedRequest(nil), f.requests...)
}

// MaxRequestsPerSecond returns the largest number of requests that arrived
// within any one-second window. With paths, only requests whose path starts
// with one of them count.
func (f *Fake) MaxRequestsPerSecond(paths ...string) int {
	f.mu.Lock()
	var times []time.Time
	for _, r := range f.requests {
		if len(paths) == 0 || hasAnyPrefix(r.Path, paths) {
			times = append(times, r.Time)
		}
	}
	f.mu.Unlock()
	sort.Slice(times, func(i, j int) bool { return times[i].Before(times[j]) })
	best, lo := 0, 0
	for hi := range times {
		for times[hi].Sub(times[lo]) >= time.Second {
			lo++
		}
		best = max(best, hi-lo+1)
	}
	return best
}

func hasAnyPrefix(s string, prefixes []string) bool {
	for _, p := range prefixes {
		if strings.HasPrefix(s, p) {
			return true
		}
	}
	return false
}

func (f *Fake) serve(w http.ResponseWriter, r *http.Request) {
	arrived := time.Now()
	body, _ := io.ReadAll(io.LimitReader(r.Body, 1<<20))
	r.Body = io.NopCloser(bytes.NewReader(body))
	f.mu.Lock()
	f.requests = append(f.requests, RecordedRequest{
		Method:         r.Method,
		Path:           r.URL.Path,
		Query:          r.URL.RawQuery,
		IdempotencyKey: r.Header.Get("Idempotency-Key"),
		Body:           string(body),
		Time:           arrived,
	})
	index := len(f.requests) - 1
	hang, gate, drop := f.hang, f.gate, f.drop
	f.mu.Unlock()

	if !f.wait(hang, gate) {
		return
	}
	dropped := drop != nil && drop(r)
	r.Body = io.NopCloser(bytes.NewReader(body))
	var rec *statusRecorder
	if dropped {
		rec = &statusRecorder{ResponseWriter: httptest.NewRecorder()}
	} else {
		rec = &statusRecorder{ResponseWriter: w}
	}
	f.handle(rec, r, body)
	f.mu.Lock()
	f.requests[index].Status = rec.status
	f.requests[index].Dropped = dropped
	f.mu.Unlock()
	if dropped {
		if hj, ok := w.(http.Hijacker); ok {
			if conn, _, err := hj.Hijack(); err == nil {
				_ = conn.Close()
			}
		}
	}
}

// wait holds a request for the configured hang; false means the fake is closing.
func (f *Fake) wait(hang time.Duration, gate chan struct{}) bool {
	if hang > 0 {
		timer := time.NewTimer(hang)
		defer timer.Stop()
		select {
		case <-timer.C:
		case <-f.done:
			return false
		}
	}
	if gate != nil {
		select {
		case <-gate:
		case <-f.done:
			return false
		}
	}
	return true
}

type statusRecorder struct {
	http.ResponseWriter
	status int
}

func (s *statusRecorder) WriteHeader(code int) {
	if s.status == 0 {
		s.status = code
	}
	s.ResponseWriter.WriteHeader(code)
}

func (s *statusRecorder) Write(b []byte) (int, error) {
	if s.status == 0 {
		s.status = http.StatusOK
	}
	return s.ResponseWriter.Write(b)
}

func (f *Fake) handle(w http.ResponseWriter, r *http.Request, body []byte) {
	f.mu.Lock()
	var injected *injectedFault
	if len(f.failNext) > 0 {
		injected = &f.failNext[0]
		f.failNext = f.failNext[1:]
	}
	fault := f.fault
	f.mu.Unlock()

	if injected != nil {
		if injected.retryAfter != "" {
			w.Header().Set("Retry-After", injected.retryAfter)
		}
		writeError(w, injected.status, faultError(injected.status))
		return
	}
	if fault != nil {
		if status, text, ok := fault(r); ok {
			w.Header().Set("Content-Type", "application/json")
			w.Header().Set("Request-Id", "req_fake_fault")
			w.WriteHeader(status)
			_, _ = io.WriteString(w, text)
			return
		}
		r.Body = io.NopCloser(bytes.NewReader(body))
	}

	token, hasBearer := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	if !hasBearer || strings.TrimSpace(token) == "" {
		writeError(w, http.StatusUnauthorized, stripeError{Type: "invalid_request_error", Message: "You did not provide an API key."})
		return
	}

	path := r.URL.Path
	switch {
	case r.Method == http.MethodPost && path == "/v2/billing/meter_event_stream":
		f.meterEventStream(w, token, body)
		return
	case f.isSessionToken(token):
		writeError(w, http.StatusUnauthorized, stripeError{Type: "invalid_request_error", Message: "A meter event session token only authenticates the meter event stream."})
		return
	}

	switch {
	case r.Method == http.MethodPost && path == "/v1/customers":
		f.idempotently(w, r, body, f.createCustomer)
	case r.Method == http.MethodPost && path == "/v1/checkout/sessions":
		f.idempotently(w, r, body, f.createCheckoutSession)
	case r.Method == http.MethodGet && strings.HasPrefix(path, "/v1/checkout/sessions/") && !strings.Contains(strings.TrimPrefix(path, "/v1/checkout/sessions/"), "/"):
		f.retrieveCheckoutSession(w, strings.TrimPrefix(path, "/v1/checkout/sessions/"))
	case r.Method == http.MethodPost && path == "/v1/billing/meter_events":
		f.createMeterEvent(w, body)
	case r.Method == http.MethodPost && path == "/v2/billing/meter_event_session":
		f.openSession(w)
	case r.Method == http.MethodGet && strings.HasPrefix(path, "/v1/billing/meters/") && strings.HasSuffix(path, "/event_summaries"):
		meterID := strings.TrimSuffix(strings.TrimPrefix(path, "/v1/billing/meters/"), "/event_summaries")
		f.summaries(w, r, meterID)
	default:
		writeError(w, http.StatusNotFound, stripeError{Type: "invalid_request_error", Message: fmt.Sprintf("Unrecognized request URL (%s: %s).", r.Method, path)})
	}
}

func (f *Fake) isSessionToken(token string) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	_, ok := f.sessions[token]
	return ok
}

// idempotently replays the stored answer of an Idempotency-Key already used
// with the same parameters, and refuses it with other ones, as Stripe does.
func (f *Fake) idempotently(w http.ResponseWriter, r *http.Request, body []byte, create func(form url.Values) (int, any)) {
	form, err := url.ParseQuery(string(body))
	if err != nil {
		writeError(w, http.StatusBadRequest, stripeError{Type: "invalid_request_error", Message: "Invalid form body."})
		return
	}
	key := r.Header.Get("Idempotency-Key")
	f.mu.Lock()
	if key != "" {
		if prev, ok := f.idempotent[key]; ok {
			f.mu.Unlock()
			if prev.method != r.Method || prev.path != r.URL.Path || !reflect.DeepEqual(prev.form, form) {
				writeError(w, http.StatusBadRequest, stripeError{
					Type:    "idempotency_error",
					Message: fmt.Sprintf("Keys for idempotent requests can only be used with the same parameters they were first used with. Try using a key other than '%s' if you meant to execute a different request.", key),
				})
				return
			}
			w.Header().Set("Idempotent-Replayed", "true")
			writeRaw(w, prev.status, prev.body)
			return
		}
	}
	status, obj := create(form)
	raw, _ := json.Marshal(obj)
	if key != "" && status < 300 {
		f.idempotent[key] = idempotentResult{method: r.Method, path: r.URL.Path, form: form, status: status, body: raw}
	}
	f.mu.Unlock()
	writeRaw(w, status, raw)
}

// createCustomer runs with f.mu held.
func (f *Fake) createCustomer(form url.Values) (int, any) {
	f.seq++
	id := fmt.Sprintf("cus_fake%08d", f.seq)
	f.customers = append(f.customers, form)
	return http.StatusOK, map[string]any{
		"id":       id,
		"object":   "customer",
		"email":    nullable(form.Get("email")),
		"name":     nullable(form.Get("name")),
		"metadata": bracketMap(form, "metadata"),
		"created":  time.Now().Unix(),
		"livemode": false,
	}
}

// createCheckoutSession runs with f.mu held.
func (f *Fake) createCheckoutSession(form url.Values) (int, any) {
	if form.Get("mode") == "" {
		return http.StatusBadRequest, stripeErrorBody(stripeError{Type: "invalid_request_error", Code: "parameter_missing", Param: "mode", Message: "Missing required param: mode."})
	}
	f.seq++
	id := fmt.Sprintf("cs_test_fake%08d", f.seq)
	expiresAt := time.Now().Add(24 * time.Hour).Unix()
	if v := form.Get("expires_at"); v != "" {
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil {
			return http.StatusBadRequest, stripeErrorBody(stripeError{Type: "invalid_request_error", Code: "parameter_invalid_integer", Param: "expires_at", Message: "Invalid integer: " + v})
		}
		expiresAt = n
	}
	f.checkouts = append(f.checkouts, form)
	// The amounts of an ad-hoc price; a Stripe Price's are unknown here.
	var currency, subtotal any
	if unit, err := strconv.ParseInt(form.Get("line_items[0][price_data][unit_amount]"), 10, 64); err == nil {
		quantity := int64(1)
		if q, err := strconv.ParseInt(form.Get("line_items[0][quantity]"), 10, 64); err == nil {
			quantity = q
		}
		currency, subtotal = form.Get("line_items[0][price_data][currency]"), unit*quantity
	}
	obj := map[string]any{
		"id":                  id,
		"object":              "checkout.session",
		"url":                 f.srv.URL + "/c/pay/" + id,
		"expires_at":          expiresAt,
		"mode":                form.Get("mode"),
		"status":              "open",
		"payment_status":      "unpaid",
		"payment_intent":      nil,
		"customer":            nullable(form.Get("customer")),
		"client_reference_id": nullable(form.Get("client_reference_id")),
		"success_url":         form.Get("success_url"),
		"cancel_url":          nullable(form.Get("cancel_url")),
		"metadata":            bracketMap(form, "metadata"),
		"currency":            currency,
		"amount_subtotal":     subtotal,
		"amount_total":        subtotal,
		"total_details":       map[string]any{"amount_discount": 0, "amount_shipping": 0, "amount_tax": 0},
		"currency_conversion": nil,
		"created":             time.Now().Unix(),
		"livemode":            false,
	}
	f.sessionObjects[id] = obj
	return http.StatusOK, cloneObject(obj)
}

func (f *Fake) retrieveCheckoutSession(w http.ResponseWriter, id string) {
	f.mu.Lock()
	obj := cloneObject(f.sessionObjects[id])
	f.mu.Unlock()
	if obj == nil {
		writeError(w, http.StatusNotFound, stripeError{Type: "invalid_request_error", Code: "resource_missing", Param: "session",
			Message: fmt.Sprintf("No such checkout.session: '%s'", id)})
		return
	}
	writeJSON(w, http.StatusOK, obj)
}

func (f *Fake) createMeterEvent(w http.ResponseWriter, body []byte) {
	form, err := url.ParseQuery(string(body))
	if err != nil {
		writeError(w, http.StatusBadRequest, stripeError{Type: "invalid_request_error", Message: "Invalid form body."})
		return
	}
	name := form.Get("event_name")
	payload := bracketMap(form, "payload")
	if name == "" {
		writeError(w, http.StatusBadRequest, stripeError{Type: "invalid_request_error", Code: "parameter_missing", Param: "event_name", Message: "Missing required param: event_name."})
		return
	}
	if len(payload) == 0 {
		writeError(w, http.StatusBadRequest, stripeError{Type: "invalid_request_error", Code: "parameter_missing", Param: "payload", Message: "Missing required param: payload."})
		return
	}
	now := time.Now()
	ts := now
	if v := form.Get("timestamp"); v != "" {
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil {
			writeError(w, http.StatusBadRequest, stripeError{Type: "invalid_request_error", Code: "parameter_invalid_integer", Param: "timestamp", Message: "Invalid integer: " + v})
			return
		}
		ts = time.Unix(n, 0)
	}
	f.mu.Lock()
	identifier := form.Get("identifier")
	if identifier == "" {
		f.seq++
		identifier = fmt.Sprintf("fake_generated_%08d", f.seq)
	}
	if f.accepted[identifier] > 0 {
		f.mu.Unlock()
		writeError(w, http.StatusBadRequest, stripeError{
			Type:    "invalid_request_error",
			Param:   "identifier",
			Message: fmt.Sprintf("An event already exists with identifier %s.", identifier),
		})
		return
	}
	f.accepted[identifier]++
	f.events = append(f.events, RecordedMeterEvent{
		Identifier: identifier, EventName: name, Payload: payload, Timestamp: ts, Via: "v1", ReceivedAt: now,
	})
	f.mu.Unlock()
	writeJSON(w, http.StatusOK, map[string]any{
		"object":     "billing.meter_event",
		"event_name": name,
		"identifier": identifier,
		"payload":    payload,
		"timestamp":  ts.Unix(),
		"created":    now.Unix(),
		"livemode":   false,
	})
}

func (f *Fake) openSession(w http.ResponseWriter) {
	now := time.Now()
	f.mu.Lock()
	f.seq++
	id := fmt.Sprintf("mes_fake%08d", f.seq)
	token := fmt.Sprintf("mes_tok_fake%08d", f.seq)
	expires := now.Add(f.sessionLifetime)
	f.sessions[token] = expires
	f.mu.Unlock()
	writeJSON(w, http.StatusOK, map[string]any{
		"id":                   id,
		"object":               "v2.billing.meter_event_session",
		"authentication_token": token,
		"created":              now.UTC().Format(time.RFC3339Nano),
		"expires_at":           expires.UTC().Format(time.RFC3339Nano),
		"livemode":             false,
	})
}

type streamEvent struct {
	EventName  string            `json:"event_name"`
	Identifier string            `json:"identifier"`
	Payload    map[string]string `json:"payload"`
	Timestamp  *time.Time        `json:"timestamp"`
}

func (f *Fake) meterEventStream(w http.ResponseWriter, token string, body []byte) {
	f.mu.Lock()
	expires, known := f.sessions[token]
	f.mu.Unlock()
	if !known {
		writeError(w, http.StatusUnauthorized, stripeError{Type: "invalid_request_error", Code: "unauthorized", Message: "The meter event stream needs a meter event session token."})
		return
	}
	if !time.Now().Before(expires) {
		writeError(w, http.StatusUnauthorized, stripeError{Type: "temporary_session_expired", Code: "billing_meter_event_session_expired", Message: "The temporary session token has expired."})
		return
	}
	var req struct {
		Events []streamEvent `json:"events"`
	}
	if err := json.Unmarshal(body, &req); err != nil {
		writeError(w, http.StatusBadRequest, stripeError{Type: "invalid_request_error", Code: "invalid_json", Message: "Invalid JSON body: " + err.Error()})
		return
	}
	if len(req.Events) == 0 || len(req.Events) > 100 {
		writeError(w, http.StatusBadRequest, stripeError{Type: "invalid_request_error", Code: "invalid_request", Message: fmt.Sprintf("events must hold 1 to 100 events, got %d.", len(req.Events))})
		return
	}
	for i, ev := range req.Events {
		if ev.EventName == "" || len(ev.Payload) == 0 {
			writeError(w, http.StatusBadRequest, stripeError{Type: "invalid_request_error", Code: "invalid_request", Message: fmt.Sprintf("events[%d] needs an event_name and a payload.", i)})
			return
		}
	}
	now := time.Now()
	f.mu.Lock()
	for _, ev := range req.Events {
		identifier := ev.Identifier
		if identifier == "" {
			f.seq++
			identifier = fmt.Sprintf("fake_generated_%08d", f.seq)
		}
		ts := now
		if ev.Timestamp != nil {
			ts = *ev.Timestamp
		}
		f.events = append(f.events, RecordedMeterEvent{
			Identifier: identifier, EventName: ev.EventName, Payload: ev.Payload, Timestamp: ts,
			Via: "v2", Duplicate: f.accepted[identifier] > 0, ReceivedAt: now,
		})
		f.accepted[identifier]++
	}
	f.mu.Unlock()
	writeRaw(w, http.StatusOK, []byte("{}"))
}

func (f *Fake) summaries(w http.ResponseWriter, r *http.Request, meterID string) {
	q := r.URL.Query()
	customer := q.Get("customer")
	start, errStart := strconv.ParseInt(q.Get("start_time"), 10, 64)
	end, errEnd := strconv.ParseInt(q.Get("end_time"), 10, 64)
	switch {
	case customer == "":
		writeError(w, http.StatusBadRequest, stripeError{Type: "invalid_request_error", Code: "parameter_missing", Param: "customer", Message: "Missing required param: customer."})
		return
	case errStart != nil || errEnd != nil:
		writeError(w, http.StatusBadRequest, stripeError{Type: "invalid_request_error", Code: "parameter_missing", Message: "start_time and end_time are required integers."})
		return
	case start%60 != 0 || end%60 != 0:
		writeError(w, http.StatusBadRequest, stripeError{Type: "invalid_request_error", Code: "parameter_invalid", Message: "start_time and end_time must be aligned with minute boundaries."})
		return
	}
	f.mu.Lock()
	eventName := meterID
	if name, ok := f.meters[meterID]; ok {
		eventName = name
	}
	var total float64
	for _, ev := range f.events {
		if ev.Duplicate || ev.EventName != eventName || ev.Payload["stripe_customer_id"] != customer {
			continue
		}
		if ts := ev.Timestamp.Unix(); ts < start || ts >= end {
			continue
		}
		v, err := strconv.ParseFloat(ev.Payload["value"], 64)
		if err == nil {
			total += v
		}
	}
	if v, ok := f.overrides[customer]; ok {
		total = v
	}
	f.seq++
	id := fmt.Sprintf("mtrusg_fake%08d", f.seq)
	f.mu.Unlock()
	writeJSON(w, http.StatusOK, map[string]any{
		"object":   "list",
		"url":      r.URL.Path,
		"has_more": false,
		"data": []map[string]any{{
			"id":               id,
			"object":           "billing.meter_event_summary",
			"aggregated_value": total,
			"start_time":       start,
			"end_time":         end,
			"meter":            meterID,
			"livemode":         false,
		}},
	})
}

type stripeError struct {
	Type    string `json:"type"`
	Code    string `json:"code,omitempty"`
	Param   string `json:"param,omitempty"`
	Message string `json:"message"`
}

func stripeErrorBody(e stripeError) map[string]any { return map[string]any{"error": e} }

func faultError(status int) stripeError {
	switch {
	case status == http.StatusTooManyRequests:
		return stripeError{Type: "invalid_request_error", Code: "rate_limit", Message: "Too many requests hit the API too quickly."}
	case status >= 500:
		return stripeError{Type: "api_error", Message: "An unknown error occurred (injected by stripefake)."}
	case status == http.StatusUnauthorized:
		return stripeError{Type: "invalid_request_error", Message: "Invalid API Key provided (injected by stripefake)."}
	default:
		return stripeError{Type: "invalid_request_error", Message: fmt.Sprintf("Injected failure with status %d.", status)}
	}
}

func writeError(w http.ResponseWriter, status int, e stripeError) {
	writeJSON(w, status, stripeErrorBody(e))
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	raw, err := json.Marshal(v)
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	writeRaw(w, status, raw)
}

func writeRaw(w http.ResponseWriter, status int, raw []byte) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Request-Id", "req_fake")
	w.WriteHeader(status)
	_, _ = w.Write(raw)
}

// bracketMap collects form keys like metadata[k] into a map.
func bracketMap(form url.Values, name string) map[string]string {
	out := map[string]string{}
	prefix := name + "["
	for k, vs := range form {
		if strings.HasPrefix(k, prefix) && strings.HasSuffix(k, "]") && len(vs) > 0 {
			inner := strings.TrimSuffix(strings.TrimPrefix(k, prefix), "]")
			if !strings.Contains(inner, "[") {
				out[inner] = vs[0]
			}
		}
	}
	return out
}

func nullable(s string) any {
	if s == "" {
		return nil
	}
	return s
}

func cloneForms(in []url.Values) []url.Values {
	out := make([]url.Values, len(in))
	for i, v := range in {
		c := url.Values{}
		for k, vs := range v {
			c[k] = append([]string(nil), vs...)
		}
		out[i] = c
	}
	return out
}

// cloneObject deep-copies a JSON object (nil stays nil).
func cloneObject(m map[string]any) map[string]any {
	if m == nil {
		return nil
	}
	raw, err := json.Marshal(m)
	if err != nil {
		panic(fmt.Sprintf("stripefake: object does not encode: %v", err))
	}
	var out map[string]any
	if err := json.Unmarshal(raw, &out); err != nil {
		panic(fmt.Sprintf("stripefake: object does not decode: %v", err))
	}
	return out
}

func cloneMap(m map[string]string) map[string]string {
	out := make(map[string]string, len(m))
	for k, v := range m {
		out[k] = v
	}
	return out
}
