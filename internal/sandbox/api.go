package sandbox

import (
	"bytes"
	"encoding/json"
	"errors"
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
	"time"
)

// API serves Stripe's HTTP API for an Account, at the root of its handler
// (mount it under a prefix with http.StripPrefix):
//
//	POST /v1/customers, GET and POST /v1/customers/{id}
//	POST /v1/checkout/sessions, GET /v1/checkout/sessions/{id} (expand[]),
//	GET /v1/checkout/sessions/{id}/line_items, POST .../{id}/expire
//	GET /v1/payment_intents/{id}, /v1/charges/{id}, /v1/refunds/{id},
//	/v1/disputes/{id}, /v1/invoices/{id}, /v1/invoiceitems/{id},
//	/v1/subscriptions/{id}, /v1/events/{id}; GET /v1/events (newest first)
//	GET /v1/invoice_payments?payment[type]=payment_intent&payment[payment_intent]=
//	POST /v1/refunds, POST /v1/disputes/{id}/close
//	POST /v1/invoices, POST /v1/invoiceitems,
//	POST /v1/invoices/{id}/finalize | send | pay | void | mark_uncollectible
//	POST /v1/billing/meter_events (duplicate identifier: 400),
//	POST /v1/billing/meter_event_adjustments (cancel), GET /v1/subscriptions
//	GET and POST /v1/billing/meters, GET /v1/billing/meters/{id}/event_summaries
//	POST /v2/billing/meter_event_session, POST /v2/billing/meter_event_stream
//	GET /v2/core/events/{id} (a meter error report, delivered thin),
//	GET /v2/core/events?object_id= (newest first, paged by page=)
//
// Every POST honours Idempotency-Key as Stripe does: the same key with the
// same parameters replays the first answer (Idempotent-Replayed: true);
// with other parameters it is refused with an idempotency_error.
//
// Faults (FailNext, SetFault, DropAnswers, SetHang, HangUntilReleased)
// apply to every endpoint, before it runs. A hung request is still
// processed once the hang ends, even if its client gave up, as Stripe may
// act on a request whose answer never arrives.
type API struct {
	acct      *Account
	done      chan struct{}
	closeOnce sync.Once

	mu       sync.Mutex
	failNext []injectedFault
	fault    func(r *http.Request) (status int, body string, ok bool)
	drop     func(r *http.Request) bool
	hang     time.Duration
	gate     chan struct{}
	requests []RecordedRequest
}

// RecordedRequest is one request the API received.
type RecordedRequest struct {
	Method         string
	Path           string
	Query          string
	IdempotencyKey string
	Body           string
	Status         int // the status answered
	// Dropped marks a request whose answer DropAnswers kept from the client.
	Dropped bool
	Time    time.Time
}

type injectedFault struct {
	status     int
	retryAfter string
}

type idempotentResult struct {
	method, path string
	form         url.Values
	status       int
	body         []byte
	at           time.Time
}

// NewAPI serves acct's API.
func NewAPI(acct *Account) *API {
	return &API{acct: acct, done: make(chan struct{})}
}

// Close releases hung requests; calling it again is harmless.
func (h *API) Close() {
	h.closeOnce.Do(func() { close(h.done) })
}

// FailNext answers the next n requests, whatever their endpoint, with status
// and a Stripe-shaped error body, plus a Retry-After header when retryAfter
// is not empty. 429 carries code rate_limit, as at Stripe.
func (h *API) FailNext(n int, status int, retryAfter string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for range n {
		h.failNext = append(h.failNext, injectedFault{status: status, retryAfter: retryAfter})
	}
}

// SetFault installs fn, consulted for every request after FailNext's queue:
// when it returns ok, the API answers status and body (JSON) instead of
// running the endpoint. fn may read r.Body; the endpoint still sees it.
// nil removes it.
func (h *API) SetFault(fn func(r *http.Request) (status int, body string, ok bool)) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.fault = fn
}

// DropAnswers installs fn, consulted for every request: when it returns
// true, the request is handled as usual (faults included, so what it
// creates is kept) but its answer is never sent: the connection is closed,
// as when a timeout or a broken connection loses Stripe's answer. nil
// removes it.
func (h *API) DropAnswers(fn func(r *http.Request) bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.drop = fn
}

// SetHang delays every request by d before it is handled (0 stops it).
func (h *API) SetHang(d time.Duration) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.hang = d
}

// HangUntilReleased holds every request arriving from now on until release
// is called (or the API closes); then they are handled as usual.
func (h *API) HangUntilReleased() (release func()) {
	gate := make(chan struct{})
	h.mu.Lock()
	h.gate = gate
	h.mu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			h.mu.Lock()
			if h.gate == gate {
				h.gate = nil
			}
			h.mu.Unlock()
			close(gate)
		})
	}
}

// PendingFaults is how many FailNext answers are still queued.
func (h *API) PendingFaults() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.failNext)
}

// Requests returns every request received (the most recent
// Options.MaxRecordedRequests when that is set), in order of arrival.
func (h *API) Requests() []RecordedRequest {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]RecordedRequest(nil), h.requests...)
}

func (h *API) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	arrived := time.Now()
	body, _ := io.ReadAll(io.LimitReader(r.Body, 1<<20))
	r.Body = io.NopCloser(bytes.NewReader(body))
	rec := &RecordedRequest{Method: r.Method, Path: r.URL.Path, Query: r.URL.RawQuery, IdempotencyKey: r.Header.Get("Idempotency-Key"), Body: string(body), Time: arrived}
	h.mu.Lock()
	h.requests = append(h.requests, RecordedRequest{})
	if limit := h.acct.opts.MaxRecordedRequests; limit > 0 && len(h.requests) > limit {
		h.requests = append(h.requests[:0:0], h.requests[len(h.requests)-limit:]...)
	}
	index := len(h.requests) - 1
	h.requests[index] = *rec
	hang, gate, drop := h.hang, h.gate, h.drop
	h.mu.Unlock()

	if !h.wait(hang, gate) {
		return
	}
	dropped := drop != nil && drop(r)
	r.Body = io.NopCloser(bytes.NewReader(body))
	var sr *statusRecorder
	if dropped {
		sr = &statusRecorder{ResponseWriter: httptest.NewRecorder()}
	} else {
		sr = &statusRecorder{ResponseWriter: w}
	}
	h.handle(sr, r, body)
	h.mu.Lock()
	// The slice may have been trimmed meanwhile: find the request again.
	for i := len(h.requests) - 1; i >= 0; i-- {
		if h.requests[i].Time.Equal(arrived) && h.requests[i].Path == rec.Path && h.requests[i].Body == rec.Body && h.requests[i].Status == 0 {
			h.requests[i].Status, h.requests[i].Dropped = sr.status, dropped
			break
		}
	}
	h.mu.Unlock()
	if dropped {
		if hj, ok := w.(http.Hijacker); ok {
			if conn, _, err := hj.Hijack(); err == nil {
				_ = conn.Close()
			}
		}
	}
}

// wait holds a request for the configured hang; false means the API is closing.
func (h *API) wait(hang time.Duration, gate chan struct{}) bool {
	if hang > 0 {
		timer := time.NewTimer(hang)
		defer timer.Stop()
		select {
		case <-timer.C:
		case <-h.done:
			return false
		}
	}
	if gate != nil {
		select {
		case <-gate:
		case <-h.done:
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

func (h *API) handle(w http.ResponseWriter, r *http.Request, body []byte) {
	h.mu.Lock()
	var injected *injectedFault
	if len(h.failNext) > 0 {
		injected = &h.failNext[0]
		h.failNext = h.failNext[1:]
	}
	fault := h.fault
	h.mu.Unlock()

	if injected != nil {
		if injected.retryAfter != "" {
			w.Header().Set("Retry-After", injected.retryAfter)
		}
		writeError(w, faultError(injected.status))
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
	token = strings.TrimSpace(token)
	if !hasBearer || token == "" {
		writeError(w, &Error{Status: http.StatusUnauthorized, Type: "invalid_request_error", Message: "You did not provide an API key."})
		return
	}
	path := r.URL.Path
	if r.Method == http.MethodPost && path == "/v2/billing/meter_event_stream" {
		h.meterEventStream(w, r, token, body)
		return
	}
	if h.acct.isSessionToken(token) {
		writeError(w, &Error{Status: http.StatusUnauthorized, Type: "invalid_request_error", Message: "A meter event session token only authenticates the meter event stream."})
		return
	}
	if key := h.acct.opts.SecretKey; key != "" && token != key {
		writeError(w, &Error{Status: http.StatusUnauthorized, Type: "invalid_request_error",
			Message: fmt.Sprintf("Invalid API Key provided: %s (the sandbox takes only the configured TALLY_STRIPE_SECRET_KEY).", redactKey(token))})
		return
	}
	reqID := newID("req")
	w.Header().Set("Request-Id", reqID)
	w.Header().Set("Stripe-Version", APIVersion)
	if r.Method == http.MethodGet {
		h.get(w, r)
		return
	}
	if r.Method != http.MethodPost {
		writeError(w, notFound(r))
		return
	}
	form, err := url.ParseQuery(string(body))
	if err != nil {
		writeError(w, invalid("", "Invalid form body."))
		return
	}
	req := requestRef{id: reqID, idempotencyKey: r.Header.Get("Idempotency-Key")}
	op := h.route(r, path, form, req)
	if op == nil {
		writeError(w, notFound(r))
		return
	}
	h.idempotently(w, r, form, req, op)
}

// listV2Events is GET /v2/core/events: the v2 events whose related
// object is object_id (which Stripe requires), newest first, limit (at
// most 100, default 20) a page; next_page_url carries the rest.
func (a *Account) listV2Events(w http.ResponseWriter, q url.Values) {
	objectID := q.Get("object_id")
	if objectID == "" {
		writeError(w, &Error{Status: http.StatusBadRequest, Type: "invalid_request_error", Code: "parameter_missing", Param: "object_id", Message: "Missing required param: object_id."})
		return
	}
	limit := 20
	if v := q.Get("limit"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > 100 {
			writeError(w, invalid("limit", "limit must be an integer from 1 to 100."))
			return
		}
		limit = n
	}
	skip, _ := strconv.Atoi(q.Get("page"))
	related := []json.RawMessage{}
	for i := len(a.events) - 1; i >= 0; i-- {
		ev := a.events[i]
		if !ev.v2() {
			continue
		}
		var head struct {
			RelatedObject struct {
				ID string `json:"id"`
			} `json:"related_object"`
		}
		if json.Unmarshal(ev.payload, &head) == nil && head.RelatedObject.ID == objectID {
			related = append(related, ev.payload)
		}
	}
	page := related[min(skip, len(related)):]
	var next any
	if len(page) > limit {
		page = page[:limit]
		next = "/v2/core/events?" + url.Values{"object_id": {objectID}, "limit": {strconv.Itoa(limit)}, "page": {strconv.Itoa(skip + limit)}}.Encode()
	}
	writeJSON(w, http.StatusOK, map[string]any{"data": page, "next_page_url": next, "previous_page_url": nil})
}

func redactKey(k string) string {
	if len(k) <= 12 {
		return "sk_***"
	}
	return k[:8] + "***" + k[len(k)-4:]
}

func notFound(r *http.Request) *Error {
	return &Error{Status: http.StatusNotFound, Type: "invalid_request_error", Message: fmt.Sprintf("Unrecognized request URL (%s: %s).", r.Method, r.URL.Path)}
}

// route returns the operation of a POST (run with the account's lock
// held), nil for an unknown path.
func (h *API) route(r *http.Request, path string, form url.Values, req requestRef) func() (any, error) {
	a := h.acct
	obj := func(o *object, err error) (any, error) {
		if err != nil {
			return nil, err
		}
		return clone(o.data), nil
	}
	parts := strings.Split(strings.Trim(path, "/"), "/")
	switch {
	case path == "/v1/customers":
		return func() (any, error) {
			c := a.createCustomer(form)
			a.emit("customer.created", c, req)
			return clone(c.data), nil
		}
	case len(parts) == 3 && parts[1] == "customers":
		return func() (any, error) {
			o, err := a.updateCustomer(parts[2], form)
			if err == nil {
				a.emit("customer.updated", o, req)
			}
			return obj(o, err)
		}
	case path == "/v1/checkout/sessions":
		return func() (any, error) { return obj(a.createCheckoutSession(form)) }
	case len(parts) == 5 && parts[1] == "checkout" && parts[2] == "sessions" && parts[4] == "expire":
		return func() (any, error) { return obj(a.expireSession(parts[3])) }
	case path == "/v1/payment_intents":
		return func() (any, error) { return obj(a.createPaymentIntent(form, req)) }
	case len(parts) == 4 && parts[1] == "payment_intents" && parts[3] == "confirm":
		return func() (any, error) {
			pi := a.get("payment_intent", parts[2])
			if pi == nil {
				return nil, missing("payment_intent", parts[2])
			}
			if pm := form.Get("payment_method"); pm != "" {
				pi.data["payment_method"] = pm
			}
			return obj(a.confirmPaymentIntent(pi, form.Get("off_session") == "true", req))
		}
	case path == "/v1/refunds":
		return func() (any, error) {
			target := form.Get("payment_intent")
			if target == "" {
				target = form.Get("charge")
			}
			if target == "" {
				return nil, &Error{Status: http.StatusBadRequest, Type: "invalid_request_error", Code: "parameter_missing", Param: "payment_intent", Message: "One of payment_intent or charge is required."}
			}
			var amount int64
			if v := form.Get("amount"); v != "" {
				n, err := strconv.ParseInt(v, 10, 64)
				if err != nil || n < 1 {
					return nil, invalid("amount", "Invalid positive integer: %s", v)
				}
				amount = n
			}
			return obj(a.refund(target, amount, form.Get("reason"), req))
		}
	case len(parts) == 4 && parts[1] == "disputes" && parts[3] == "close":
		return func() (any, error) {
			d := a.get("dispute", parts[2])
			if d == nil {
				return nil, missing("dispute", parts[2])
			}
			if s := str(d.data, "status"); s == "won" || s == "lost" {
				return nil, invalid("", "Dispute %s is already closed (%s).", d.id, s)
			}
			d.data["status"] = "lost"
			a.put(d)
			a.emit("charge.dispute.closed", d, req)
			return clone(d.data), nil
		}
	case path == "/v1/invoices":
		return func() (any, error) { return obj(a.createInvoice(form, req)) }
	case path == "/v1/invoiceitems":
		return func() (any, error) { return obj(a.createInvoiceItem(form, req)) }
	case len(parts) == 4 && parts[1] == "invoices":
		return func() (any, error) { return obj(a.invoiceAction(parts[2], parts[3], req)) }
	case path == "/v1/billing/meter_events":
		return func() (any, error) { return a.createMeterEvent(form) }
	case path == "/v1/billing/meter_event_adjustments":
		return func() (any, error) { return a.createMeterEventAdjustment(form) }
	case path == "/v1/billing/meters":
		return func() (any, error) {
			name := form.Get("event_name")
			if name == "" {
				return nil, &Error{Status: http.StatusBadRequest, Type: "invalid_request_error", Code: "parameter_missing", Param: "event_name", Message: "Missing required param: event_name."}
			}
			m := a.create("billing.meter", newID("mtr"), map[string]any{
				"display_name": form.Get("display_name"), "event_name": name, "status": "active",
				"default_aggregation":      map[string]any{"formula": "sum"},
				"customer_mapping":         map[string]any{"event_payload_key": "stripe_customer_id", "type": "by_id"},
				"value_settings":           map[string]any{"event_payload_key": "value"},
				"event_time_window":        nil,
				"status_transitions":       map[string]any{"deactivated_at": nil},
				"updated":                  a.now().Unix(),
				"default_aggregation_note": nil,
			})
			a.meters[m.id] = name
			return clone(m.data), nil
		}
	case path == "/v2/billing/meter_event_session":
		return func() (any, error) { return a.openMeterSession(), nil }
	}
	return nil
}

// idempotently runs op under the account's lock, replaying the stored
// answer of an Idempotency-Key already used with the same parameters and
// refusing it with other ones, as Stripe does. Only answers of requests
// that succeeded are kept, as the fake always did.
func (h *API) idempotently(w http.ResponseWriter, r *http.Request, form url.Values, req requestRef, op func() (any, error)) {
	a := h.acct
	key := req.idempotencyKey
	var status int
	var raw []byte
	var replayed bool
	err := a.do(r.Context(), func() error {
		if key != "" {
			if prev, ok := a.idempotent[key]; ok && a.now().Sub(prev.at) < idempotencyWindow {
				if prev.method != r.Method || prev.path != r.URL.Path || !reflect.DeepEqual(prev.form, form) {
					return &Error{Status: http.StatusBadRequest, Type: "idempotency_error",
						Message: fmt.Sprintf("Keys for idempotent requests can only be used with the same parameters they were first used with. Try using a key other than '%s' if you meant to execute a different request.", key)}
				}
				status, raw, replayed = prev.status, prev.body, true
				return nil
			}
		}
		out, err := op()
		var cardErr *Error
		if errors.As(err, &cardErr) && cardErr.Type == "card_error" && key != "" {
			// A decline is the outcome of a request that ran: Stripe keeps it
			// under the key like a success, so a retry cannot charge.
			res := idempotentResult{method: r.Method, path: r.URL.Path, form: form, status: cardErr.Status, body: errorBody(cardErr), at: a.now()}
			a.idempotent[key] = res
			if a.changes.Idempotency == nil {
				a.changes.Idempotency = map[string]idempotentResult{}
			}
			a.changes.Idempotency[key] = res
		}
		if err != nil {
			return err
		}
		status = http.StatusOK
		raw, err = json.Marshal(out)
		if err != nil {
			return err
		}
		if key != "" {
			res := idempotentResult{method: r.Method, path: r.URL.Path, form: form, status: status, body: raw, at: a.now()}
			a.idempotent[key] = res
			if a.changes.Idempotency == nil {
				a.changes.Idempotency = map[string]idempotentResult{}
			}
			a.changes.Idempotency[key] = res
		}
		return nil
	})
	if err != nil {
		writeError(w, err)
		return
	}
	if replayed {
		w.Header().Set("Idempotent-Replayed", "true")
	}
	writeRaw(w, status, raw)
}

var retrievable = map[string]string{
	"customers": "customer", "payment_intents": "payment_intent", "charges": "charge", "refunds": "refund",
	"disputes": "dispute", "invoices": "invoice", "invoiceitems": "invoiceitem", "subscriptions": "subscription",
	"payment_methods": "payment_method", "setup_intents": "setup_intent",
}

// get answers a GET from the account's state, read under its lock and
// written to the client after it is released. It reads the store's state,
// as every reader does (lockRead): an object a refused commit changed is
// never answered, or tally would act on a payment the sandbox forgets.
func (h *API) get(w http.ResponseWriter, r *http.Request) {
	rec := httptest.NewRecorder()
	if err := h.acct.lockRead(r.Context()); err != nil {
		writeError(w, err)
		return
	}
	h.getLocked(rec, r)
	h.acct.mu.Unlock()
	for k, vs := range rec.Header() {
		if _, set := w.Header()[k]; !set {
			w.Header()[k] = vs
		}
	}
	w.WriteHeader(rec.Code)
	_, _ = w.Write(rec.Body.Bytes())
}

func (h *API) getLocked(w http.ResponseWriter, r *http.Request) {
	a := h.acct
	q := r.URL.Query()
	if a.meterMigrationGET(w, r.URL.Path, q) {
		return
	}
	parts := strings.Split(strings.Trim(r.URL.Path, "/"), "/")
	switch {
	case len(parts) == 3 && parts[0] == "v1" && retrievable[parts[1]] != "":
		o := a.get(retrievable[parts[1]], parts[2])
		if o == nil {
			writeError(w, missing(retrievable[parts[1]], parts[2]))
			return
		}
		writeJSON(w, http.StatusOK, a.expand(clone(o.data), expandPaths(q)))
	case len(parts) == 4 && parts[1] == "customers" && parts[3] == "payment_methods":
		out, err := a.customerPaymentMethods(parts[2])
		if err != nil {
			writeError(w, err)
			return
		}
		writeJSON(w, http.StatusOK, out)
	case len(parts) == 4 && parts[1] == "checkout" && parts[2] == "sessions":
		o := a.get("checkout.session", parts[3])
		if o == nil {
			writeError(w, &Error{Status: http.StatusNotFound, Type: "invalid_request_error", Code: "resource_missing", Param: "session",
				Message: fmt.Sprintf("No such checkout.session: '%s'", parts[3])})
			return
		}
		writeJSON(w, http.StatusOK, a.expand(clone(o.data), expandPaths(q)))
	case len(parts) == 5 && parts[1] == "checkout" && parts[2] == "sessions" && parts[4] == "line_items":
		o := a.get("checkout.session", parts[3])
		if o == nil {
			writeError(w, missing("checkout.session", parts[3]))
			return
		}
		var data []any
		for i, li := range lineItems(o) {
			data = append(data, map[string]any{"id": fmt.Sprintf("li_%s_%d", o.id, i), "object": "item", "description": li.Name,
				"quantity": li.Quantity, "currency": li.Currency, "amount_subtotal": li.UnitAmount * li.Quantity, "amount_total": li.UnitAmount * li.Quantity,
				"price": map[string]any{"id": nullable(li.Price), "object": "price", "unit_amount": li.UnitAmount, "currency": li.Currency}})
		}
		writeJSON(w, http.StatusOK, map[string]any{"object": "list", "data": data, "has_more": false, "url": r.URL.Path})
	case r.URL.Path == "/v2/core/events":
		a.listV2Events(w, q)
	case len(parts) == 4 && parts[0] == "v2" && parts[1] == "core" && parts[2] == "events":
		ev := a.eventIndex[parts[3]]
		if ev == nil || !ev.v2() {
			writeError(w, missing("v2.core.event", parts[3]))
			return
		}
		writeRaw(w, http.StatusOK, ev.payload)
	case len(parts) == 3 && parts[1] == "events":
		ev := a.eventIndex[parts[2]]
		if ev == nil || ev.v2() {
			writeError(w, missing("event", parts[2]))
			return
		}
		writeRaw(w, http.StatusOK, ev.payload)
	case r.URL.Path == "/v1/events":
		a.listEvents(w, r, q)
	case r.URL.Path == "/v1/invoice_payments":
		out, err := a.invoicePayments(q)
		if err != nil {
			writeError(w, err)
			return
		}
		writeJSON(w, http.StatusOK, out)
	case r.URL.Path == "/v1/billing/meters":
		var data []any
		for _, m := range a.list("billing.meter") {
			data = append(data, clone(m.data))
		}
		writeJSON(w, http.StatusOK, map[string]any{"object": "list", "data": data, "has_more": false, "url": r.URL.Path})
	case len(parts) == 5 && parts[1] == "billing" && parts[2] == "meters" && parts[4] == "event_summaries":
		out, err := a.summaries(parts[3], q)
		if err != nil {
			writeError(w, err)
			return
		}
		writeJSON(w, http.StatusOK, out)
	default:
		writeError(w, notFound(r))
	}
}

// expandPaths reads expand[] and expand[N] parameters.
func expandPaths(q url.Values) []string {
	var out []string
	for k, vs := range q {
		if k == "expand[]" || (strings.HasPrefix(k, "expand[") && strings.HasSuffix(k, "]")) {
			out = append(out, vs...)
		}
	}
	return out
}

// expand replaces the ids named by paths ("payment_intent",
// "payment_intent.latest_charge") with their objects (a.mu held).
func (a *Account) expand(data map[string]any, paths []string) map[string]any {
	for _, p := range paths {
		field, rest, _ := strings.Cut(p, ".")
		switch v := data[field].(type) {
		case string:
			if o := a.objects[v]; o != nil {
				inner := clone(o.data)
				if rest != "" {
					inner = a.expand(inner, []string{rest})
				}
				data[field] = inner
			}
		case map[string]any:
			if rest != "" {
				data[field] = a.expand(v, []string{rest})
			}
		}
	}
	return data
}

// listEvents is GET /v1/events: newest first, filtered by type, types[]
// and created[gt|gte|lt|lte], paged with limit, starting_after and
// ending_before (a.mu held).
func (a *Account) listEvents(w http.ResponseWriter, r *http.Request, q url.Values) {
	limit := 10
	if v := q.Get("limit"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > 100 {
			writeError(w, invalid("limit", "limit must be between 1 and 100."))
			return
		}
		limit = n
	}
	types := map[string]bool{}
	if t := q.Get("type"); t != "" {
		types[t] = true
	}
	for k, vs := range q {
		if k == "types[]" || strings.HasPrefix(k, "types[") {
			for _, v := range vs {
				types[v] = true
			}
		}
	}
	bound := func(name string) (int64, bool) {
		v := q.Get("created[" + name + "]")
		if v == "" {
			return 0, false
		}
		n, err := strconv.ParseInt(v, 10, 64)
		return n, err == nil
	}
	match := func(ev *event) bool {
		if ev.v2() {
			return false // thin events are listed by /v2/core/events only
		}
		if len(types) > 0 && !types[ev.typ] && !wildcard(types, ev.typ) {
			return false
		}
		if n, ok := bound("gt"); ok && ev.created <= n {
			return false
		}
		if n, ok := bound("gte"); ok && ev.created < n {
			return false
		}
		if n, ok := bound("lt"); ok && ev.created >= n {
			return false
		}
		if n, ok := bound("lte"); ok && ev.created > n {
			return false
		}
		return true
	}
	newest := make([]*event, 0, len(a.events))
	for i := len(a.events) - 1; i >= 0; i-- {
		if match(a.events[i]) {
			newest = append(newest, a.events[i])
		}
	}
	start, end := 0, len(newest)
	if after := q.Get("starting_after"); after != "" {
		for i, ev := range newest {
			if ev.id == after {
				start = i + 1
			}
		}
	}
	if before := q.Get("ending_before"); before != "" {
		for i, ev := range newest {
			if ev.id == before {
				end = i
				start = max(0, i-limit)
			}
		}
	}
	page := newest[min(start, end):end]
	hasMore := len(page) > limit
	if hasMore {
		page = page[:limit]
	}
	var buf bytes.Buffer
	buf.WriteString(`{"object":"list","url":"/v1/events","has_more":`)
	buf.WriteString(strconv.FormatBool(hasMore))
	buf.WriteString(`,"data":[`)
	for i, ev := range page {
		if i > 0 {
			buf.WriteByte(',')
		}
		buf.Write(ev.payload)
	}
	buf.WriteString("]}")
	writeRaw(w, http.StatusOK, buf.Bytes())
}

// wildcard matches "invoice.*" style types.
func wildcard(types map[string]bool, typ string) bool {
	for t := range types {
		if prefix, ok := strings.CutSuffix(t, ".*"); ok && strings.HasPrefix(typ, prefix+".") {
			return true
		}
	}
	return false
}

func (h *API) meterEventStream(w http.ResponseWriter, r *http.Request, token string, body []byte) {
	var in struct {
		Events []streamEvent `json:"events"`
	}
	if err := json.Unmarshal(body, &in); err != nil {
		// An unknown token is refused before the body is read.
		if !h.acct.isSessionToken(token) {
			writeError(w, &Error{Status: http.StatusUnauthorized, Type: "invalid_request_error", Code: "unauthorized", Message: "The meter event stream needs a meter event session token."})
			return
		}
		writeError(w, &Error{Status: http.StatusBadRequest, Type: "invalid_request_error", Code: "invalid_json", Message: "Invalid JSON body: " + err.Error()})
		return
	}
	err := h.acct.do(r.Context(), func() error { return h.acct.streamMeterEvents(token, in.Events) })
	if err != nil {
		writeError(w, err)
		return
	}
	writeRaw(w, http.StatusOK, []byte("{}"))
}

func faultError(status int) *Error {
	switch {
	case status == http.StatusTooManyRequests:
		return &Error{Status: status, Type: "invalid_request_error", Code: "rate_limit", Message: "Too many requests hit the API too quickly."}
	case status >= 500:
		return &Error{Status: status, Type: "api_error", Message: "An unknown error occurred (injected by the sandbox)."}
	case status == http.StatusUnauthorized:
		return &Error{Status: status, Type: "invalid_request_error", Message: "Invalid API Key provided (injected by the sandbox)."}
	default:
		return &Error{Status: status, Type: "invalid_request_error", Message: fmt.Sprintf("Injected failure with status %d.", status)}
	}
}

// writeError answers err as Stripe does; an error that is not an *Error
// (the store failed) is an api_error 500.
func writeError(w http.ResponseWriter, err error) {
	e, ok := err.(*Error)
	if !ok {
		e = &Error{Status: http.StatusInternalServerError, Type: "api_error", Message: "The sandbox could not complete the request: " + err.Error()}
	}
	writeRaw(w, e.Status, errorBody(e))
}

// errorBody is Stripe's JSON of an error.
func errorBody(e *Error) []byte {
	body := map[string]any{"type": e.Type, "message": e.Message}
	if e.Code != "" {
		body["code"] = e.Code
	}
	if e.DeclineCode != "" {
		body["decline_code"] = e.DeclineCode
	}
	if e.Param != "" {
		body["param"] = e.Param
	}
	if e.PaymentIntent != nil {
		body["payment_intent"] = e.PaymentIntent
	}
	raw, _ := json.Marshal(map[string]any{"error": body})
	return raw
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
	if w.Header().Get("Request-Id") == "" {
		w.Header().Set("Request-Id", "req_sandbox")
	}
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

// sortedKeys is for stable output of maps.
func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}
