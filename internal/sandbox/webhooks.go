package sandbox

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"time"
)

// event is one Stripe event, kept as the exact bytes that are signed and
// delivered.
type event struct {
	id      string
	seq     int64
	typ     string
	created int64
	payload []byte
}

// Delivery is where the delivery of one event to the webhook endpoint
// stands.
type Delivery struct {
	EventID       string
	EventType     string
	Seq           int64
	Status        string // DeliveryPending, DeliverySucceeded, DeliveryFailed
	Attempts      int
	NextAttemptAt *time.Time
	LastStatus    *int
	LastAnswer    *string
	LastError     *string
	DeliveredAt   *time.Time
	CreatedAt     time.Time
}

// Delivery statuses.
const (
	DeliveryPending   = "pending"   // not delivered yet: due now, or retried later
	DeliverySucceeded = "succeeded" // the endpoint answered 2xx
	DeliveryFailed    = "failed"    // still failing after DeliveryGiveUp: Stripe gives up too
)

// Attempt is one attempt at delivering an event, and what the endpoint answered.
type Attempt struct {
	EventID   string
	EventType string
	N         int
	At        time.Time
	// Status is the HTTP status answered, 0 when none came (refused
	// connection, timeout: then Error says what happened).
	Status     int
	Answer     string
	Error      string
	DurationMS int64
}

// requestRef is the API request that caused an event (event.request).
type requestRef struct {
	id, idempotencyKey string
}

// emit records an event of typ about obj (a.mu held) and queues its
// delivery. Events are delivered in the order they are emitted, which
// each operation chooses to be Stripe's.
func (a *Account) emit(typ string, obj *object, req requestRef) {
	now := a.now()
	ev := &event{id: newID("evt"), seq: a.nextSeq(), typ: typ, created: now.Unix()}
	request := map[string]any{"id": nil, "idempotency_key": nil}
	if req.id != "" {
		request["id"] = req.id
	}
	if req.idempotencyKey != "" {
		request["idempotency_key"] = req.idempotencyKey
	}
	pending := 0
	if a.opts.Webhook != nil {
		pending = 1
	}
	body := map[string]any{
		"id":               ev.id,
		"object":           "event",
		"api_version":      APIVersion,
		"created":          ev.created,
		"data":             map[string]any{"object": clone(obj.data)},
		"livemode":         false,
		"pending_webhooks": pending,
		"request":          request,
		"type":             typ,
	}
	ev.payload = mustJSON(body)
	a.keep(ev, now)
}

// keep records the event ev emitted at now (a.mu held) and queues its
// delivery when there is a webhook endpoint.
func (a *Account) keep(ev *event, now time.Time) {
	a.events = append(a.events, ev)
	a.eventIndex[ev.id] = ev
	a.changes.Events = append(a.changes.Events, ev)
	if a.opts.Webhook == nil {
		return
	}
	d := &Delivery{EventID: ev.id, EventType: ev.typ, Seq: ev.seq, Status: DeliveryPending, NextAttemptAt: &now, CreatedAt: now}
	a.deliveries[ev.id] = d
	a.changes.Deliveries = append(a.changes.Deliveries, d)
}

// v2 reports whether ev is a v2 event (object v2.core.event), which is
// delivered thin: its payload is the whole event, as GET /v2/core/events/{id}
// answers it, and its delivery leaves out data, as Stripe's does.
func (ev *event) v2() bool {
	return bytes.HasPrefix(ev.payload, []byte(`{"object":"v2.core.event",`))
}

// v2Event is a v2 event's JSON; object comes first, which v2 looks for.
type v2Event struct {
	Object        string          `json:"object"`
	ID            string          `json:"id"`
	Type          string          `json:"type"`
	Created       string          `json:"created"`
	Livemode      bool            `json:"livemode"`
	Context       *string         `json:"context"`
	Reason        json.RawMessage `json:"reason"`
	RelatedObject json.RawMessage `json:"related_object"`
	Data          json.RawMessage `json:"data,omitempty"`
}

// delivered is the body a delivery of ev sends: a copy of its payload,
// without data for a v2 event.
func (ev *event) delivered() []byte {
	if !ev.v2() {
		return append([]byte(nil), ev.payload...)
	}
	var full v2Event
	if err := json.Unmarshal(ev.payload, &full); err != nil {
		panic(fmt.Sprintf("sandbox: v2 event %s does not decode: %v", ev.id, err))
	}
	full.Data = nil
	return mustJSON(full)
}

// emitV2 records a v2 event of typ about the related object (a.mu held)
// and queues its delivery as emit does. Stripe sends such events thin, to
// an event destination; the sandbox sends them to its one endpoint.
func (a *Account) emitV2(typ string, related map[string]any, data map[string]any) {
	now := a.now()
	ev := &event{id: newID("evt"), seq: a.nextSeq(), typ: typ, created: now.Unix()}
	ev.payload = mustJSON(v2Event{Object: "v2.core.event", ID: ev.id, Type: typ, Created: now.UTC().Format(time.RFC3339Nano),
		Reason: json.RawMessage("null"), RelatedObject: mustJSON(related), Data: mustJSON(data)})
	a.keep(ev, now)
}

// mustJSON encodes v, which the sandbox built itself.
func mustJSON(v any) []byte {
	b, err := json.Marshal(v)
	if err != nil {
		panic(fmt.Sprintf("sandbox: event does not encode: %v", err))
	}
	return b
}

// Sign is the Stripe-Signature header of payload sent at t with secret:
// t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<payload>">.
func Sign(payload []byte, secret string, t time.Time) string {
	ts := strconv.FormatInt(t.Unix(), 10)
	mac := hmac.New(sha256.New, []byte(secret))
	mac.Write([]byte(ts))
	mac.Write([]byte("."))
	mac.Write(payload)
	return "t=" + ts + ",v1=" + hex.EncodeToString(mac.Sum(nil))
}

// expiryCheck is how often Run expires the sessions past their expires_at.
const expiryCheck = 30 * time.Second

// Run delivers events to the webhook endpoint until ctx ends: one at a
// time, the due delivery emitted first going first, so that the endpoint
// sees Stripe's order; a delivery answered with anything but a 2xx (or no
// answer) is retried with backoff and, as at Stripe, later events do not
// wait for it. It also expires Checkout Sessions past their expires_at.
func (a *Account) Run(ctx context.Context) error {
	var nextExpiry time.Time
	for {
		if now := time.Now(); !now.Before(nextExpiry) {
			if _, err := a.ExpireDue(ctx); err != nil && ctx.Err() == nil {
				a.logger.WarnContext(ctx, "sandbox: expire checkout sessions", "error", err)
			}
			nextExpiry = now.Add(expiryCheck)
		}
		id, wait := "", expiryCheck
		if a.opts.Webhook != nil {
			id, wait = a.nextDue(ctx)
		}
		if id != "" {
			a.deliver(ctx, id)
			continue
		}
		wait = min(wait, time.Until(nextExpiry))
		timer := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			timer.Stop()
			return ctx.Err()
		case <-a.wake:
		case <-timer.C:
		}
		timer.Stop()
	}
}

// DeliverDue delivers every delivery due now, in order, and returns how
// many attempts it made (for tests that step the clock).
func (a *Account) DeliverDue(ctx context.Context) int {
	n := 0
	for {
		id, _ := a.nextDue(ctx)
		if id == "" || ctx.Err() != nil {
			return n
		}
		a.deliver(ctx, id)
		n++
	}
}

// nextDue returns the due delivery emitted first, or how long to wait for
// the next one to fall due. While the store cannot be read it asks again
// in a second: the deliveries it holds in memory may be ones the store
// refused.
func (a *Account) nextDue(ctx context.Context) (string, time.Duration) {
	if a.lockRead(ctx) != nil {
		return "", time.Second
	}
	defer a.mu.Unlock()
	now := a.now()
	best, wait := "", time.Minute
	var bestSeq int64
	for id, d := range a.deliveries {
		if d.Status != DeliveryPending || d.NextAttemptAt == nil {
			continue
		}
		if !d.NextAttemptAt.After(now) {
			if best == "" || d.Seq < bestSeq {
				best, bestSeq = id, d.Seq
			}
			continue
		}
		wait = min(wait, d.NextAttemptAt.Sub(now))
	}
	return best, wait
}

// deliver makes one attempt at delivering event id and records it.
func (a *Account) deliver(ctx context.Context, id string) {
	if a.lockRead(ctx) != nil {
		return
	}
	ev := a.eventIndex[id]
	endpoint := *a.opts.Webhook
	a.mu.Unlock()
	if ev == nil {
		return
	}
	started, clock := a.now(), time.Now()
	status, answer, errText := a.post(ctx, endpoint, ev.delivered(), started)
	elapsed := time.Since(clock)

	_ = a.do(context.WithoutCancel(ctx), func() error {
		d := a.deliveries[id]
		if d == nil {
			return nil
		}
		now := a.now()
		d.Attempts++
		at := Attempt{EventID: id, EventType: ev.typ, N: d.Attempts, At: started, Status: status, Answer: answer, Error: errText, DurationMS: elapsed.Milliseconds()}
		a.attempts = append(a.attempts, at)
		a.changes.Attempts = append(a.changes.Attempts, at)
		d.LastStatus, d.LastAnswer, d.LastError = &status, &answer, &errText
		switch {
		case status >= 200 && status < 300:
			d.Status, d.DeliveredAt, d.NextAttemptAt = DeliverySucceeded, &now, nil
		case now.Sub(d.CreatedAt) >= DeliveryGiveUp:
			d.Status, d.NextAttemptAt = DeliveryFailed, nil
		default:
			next := now.Add(a.backoff(d.Attempts))
			d.NextAttemptAt = &next
		}
		a.changes.Deliveries = append(a.changes.Deliveries, d)
		return nil
	})
}

// post sends one signed delivery; status 0 means no answer came.
func (a *Account) post(ctx context.Context, endpoint Endpoint, payload []byte, at time.Time) (status int, answer, errText string) {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, endpoint.URL, bytes.NewReader(payload))
	if err != nil {
		return 0, "", err.Error()
	}
	req.Header.Set("Content-Type", "application/json; charset=utf-8")
	req.Header.Set("User-Agent", "Stripe/1.0 (+https://stripe.com/docs/webhooks)")
	req.Header.Set("Stripe-Signature", Sign(payload, endpoint.Secret, at))
	resp, err := a.client.Do(req)
	if err != nil {
		return 0, "", err.Error()
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 2000))
	return resp.StatusCode, string(body), ""
}

// backoff is RetryBase·2^(attempt-1), at most RetryMax.
func (a *Account) backoff(attempt int) time.Duration {
	d := a.opts.RetryBase
	for i := 1; i < attempt && d < a.opts.RetryMax; i++ {
		d *= 2
	}
	return min(d, a.opts.RetryMax)
}

// Resend queues event id for delivery now, as the dashboard's resend does
// (also for one delivered already). Errors: unknown event.
func (a *Account) Resend(ctx context.Context, id string) error {
	return a.do(ctx, func() error {
		if a.opts.Webhook == nil {
			return invalid("", "No webhook endpoint is configured to resend %s to.", id)
		}
		ev := a.eventIndex[id]
		if ev == nil {
			return missing("event", id)
		}
		now := a.now()
		d := a.deliveries[id]
		if d == nil {
			d = &Delivery{EventID: id, EventType: ev.typ, Seq: ev.seq, CreatedAt: now}
			a.deliveries[id] = d
		}
		d.Status, d.NextAttemptAt = DeliveryPending, &now
		a.changes.Deliveries = append(a.changes.Deliveries, d)
		return nil
	})
}

// EventRecord is an event as the sandbox sent it.
type EventRecord struct {
	ID      string
	Type    string
	Created time.Time
	// Payload is the exact body delivered (and signed).
	Payload []byte
	// Delivery is nil without a webhook endpoint.
	Delivery *Delivery
}

// Events returns every event, oldest first.
func (a *Account) Events() []EventRecord {
	var out []EventRecord
	_ = a.view(context.Background(), func() { out = a.eventRecords() })
	return out
}

// eventRecords is Events with a.mu held.
func (a *Account) eventRecords() []EventRecord {
	out := make([]EventRecord, 0, len(a.events))
	for _, ev := range a.events {
		r := EventRecord{ID: ev.id, Type: ev.typ, Created: time.Unix(ev.created, 0), Payload: ev.delivered()}
		if d := a.deliveries[ev.id]; d != nil {
			c := *d
			r.Delivery = &c
		}
		out = append(out, r)
	}
	return out
}

// Attempts returns every delivery attempt, oldest first.
func (a *Account) Attempts() []Attempt {
	var out []Attempt
	_ = a.view(context.Background(), func() { out = append([]Attempt(nil), a.attempts...) })
	return out
}
