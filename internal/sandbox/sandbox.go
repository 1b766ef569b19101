// Package sandbox is an offline Stripe: a stateful emulator of the part of
// Stripe's API that tally uses, speaking Stripe's wire format (form-encoded
// requests, JSON objects, Stripe-shaped errors), with the state transitions
// of a test-mode account, idempotency keys, signed webhook deliveries in
// the order Stripe sends them (retried with backoff while the endpoint
// fails, every attempt recorded), injected faults, and the pages a person
// uses: the hosted checkout page, a dashboard and a demo app.
//
// One Account serves two users. Tests use it through stripefake, in memory,
// behind an httptest server. `TALLY_STRIPE_SANDBOX=true` runs it inside
// tally, persisted in its own PostgreSQL schema (stripe_sandbox), so that
// tally's real Stripe client and webhook intake talk to it over HTTP.
//
// It is named for what it is to its users, Stripe's test mode offline, and
// lives outside internal/stripeapi because it is not a way of talking to
// Stripe but the other end of the wire: it imports neither stripe-go nor
// any of tally's capability packages, and knows tally only as a webhook URL.
//
// Objects are kept as their JSON wire form (map[string]any), so an object
// type is a constructor and a few transitions, and new ones (saved payment
// methods, setup intents, off-session PaymentIntents) fit without a schema
// change. What Stripe keeps but does not show in an object (a session's
// line items, the card behind a pending authentication) is its private part.
package sandbox

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"sort"
	"sync"
	"time"

	"github.com/tallybilling/tally/internal/config"
)

// APIVersion is the API version of the objects and events the sandbox
// writes: stripe-go v82's pinned version, which tally's client sends.
const APIVersion = "2025-08-27.basil"

// Defaults of Options.
const (
	DefaultRetryBase       = time.Second
	DefaultRetryMax        = time.Minute
	DefaultDeliveryTimeout = 10 * time.Second
	// DeliveryGiveUp is how long a failing event keeps being retried, as at Stripe.
	DeliveryGiveUp = 72 * time.Hour
	// idempotencyWindow is how long an Idempotency-Key's answer is replayed.
	idempotencyWindow = 24 * time.Hour
)

// Endpoint is where events are delivered: a URL and its signing secret.
type Endpoint struct {
	URL    string
	Secret string
}

// Options configure New.
type Options struct {
	// SecretKey is the only API key accepted; empty accepts any Bearer key
	// (tests). A live key is refused: the sandbox is test mode only.
	SecretKey string
	// PublicURL is the base URL at which a browser reaches the sandbox's
	// pages (a Checkout Session's url is PublicURL/sandbox/checkout/{id}).
	PublicURL string
	// Webhook is where events are delivered; nil records them undelivered.
	Webhook *Endpoint
	// Store keeps the state; nil keeps it in memory only.
	Store Store
	// Meters maps a meter id to the event name it aggregates (a meter id
	// without one aggregates the events named like it).
	Meters map[string]string
	// HTTPClient sends webhooks; nil means one with DeliveryTimeout.
	HTTPClient *http.Client
	// RetryBase and RetryMax shape the backoff between delivery attempts
	// of a failing event: RetryBase·2^(n-1), at most RetryMax.
	RetryBase, RetryMax time.Duration
	// MaxRecordedRequests bounds the API requests kept for inspection
	// (oldest dropped first); 0 keeps every one (tests).
	MaxRecordedRequests int
	Logger              *slog.Logger
	Now                 func() time.Time
}

// object is one Stripe object: its wire form and what Stripe keeps private.
type object struct {
	id, typ string
	seq     int64
	data    map[string]any
	private map[string]any
}

// Account is one emulated Stripe account in test mode. All its methods are
// safe for concurrent use.
type Account struct {
	opts   Options
	logger *slog.Logger
	now    func() time.Time
	store  Store
	client *http.Client
	wake   chan struct{}

	mu sync.Mutex
	// broken is set when the store refused a commit: memory may be ahead
	// of it, so the next operation reloads from the store first.
	broken      bool
	seq         int64
	objects     map[string]*object
	byType      map[string][]string // ids in creation order
	idempotent  map[string]idempotentResult
	events      []*event
	eventIndex  map[string]*event
	deliveries  map[string]*Delivery
	attempts    []Attempt
	meterEvents []MeterEvent
	accepted    map[string]int
	meters      map[string]string
	overrides   map[string]float64
	sessions    map[string]time.Time // v2 meter event session tokens
	sessionLife time.Duration
	changes     changes
}

// New builds an Account and loads its state from opts.Store.
func New(ctx context.Context, opts Options) (*Account, error) {
	if (config.StripeConfig{SecretKey: opts.SecretKey}).Livemode() {
		return nil, fmt.Errorf("sandbox: refusing a live key: the sandbox emulates test mode only")
	}
	if opts.RetryBase <= 0 {
		opts.RetryBase = DefaultRetryBase
	}
	if opts.RetryMax <= 0 {
		opts.RetryMax = DefaultRetryMax
	}
	a := &Account{opts: opts, logger: opts.Logger, now: opts.Now, store: opts.Store, client: opts.HTTPClient,
		wake: make(chan struct{}, 1), sessionLife: 15 * time.Minute}
	if a.logger == nil {
		a.logger = slog.New(slog.DiscardHandler)
	}
	if a.now == nil {
		a.now = time.Now
	}
	if a.store == nil {
		a.store = memoryStore{}
	}
	if a.client == nil {
		a.client = &http.Client{Timeout: DefaultDeliveryTimeout}
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if err := a.load(ctx); err != nil {
		return nil, err
	}
	return a, nil
}

// load replaces the in-memory state with the store's (a.mu held).
func (a *Account) load(ctx context.Context) error {
	snap, err := a.store.Load(ctx)
	if err != nil {
		return fmt.Errorf("sandbox: load state: %w", err)
	}
	a.seq = 0
	a.objects = map[string]*object{}
	a.byType = map[string][]string{}
	a.idempotent = map[string]idempotentResult{}
	a.eventIndex = map[string]*event{}
	a.events = nil
	a.deliveries = map[string]*Delivery{}
	a.attempts = snap.Attempts
	a.meterEvents = snap.MeterEvents
	a.accepted = map[string]int{}
	a.meters = map[string]string{}
	for k, v := range a.opts.Meters {
		a.meters[k] = v
	}
	if a.overrides == nil {
		a.overrides = map[string]float64{}
	}
	if a.sessions == nil {
		a.sessions = map[string]time.Time{}
	}
	sort.Slice(snap.Objects, func(i, j int) bool { return snap.Objects[i].seq < snap.Objects[j].seq })
	for _, o := range snap.Objects {
		a.objects[o.id] = o
		a.byType[o.typ] = append(a.byType[o.typ], o.id)
		a.seq = max(a.seq, o.seq)
		if o.typ == "billing.meter" {
			a.meters[o.id] = str(o.data, "event_name")
		}
	}
	sort.Slice(snap.Events, func(i, j int) bool { return snap.Events[i].seq < snap.Events[j].seq })
	for _, ev := range snap.Events {
		a.events = append(a.events, ev)
		a.eventIndex[ev.id] = ev
		a.seq = max(a.seq, ev.seq)
	}
	for _, d := range snap.Deliveries {
		a.deliveries[d.EventID] = d
	}
	for k, v := range snap.Idempotency {
		a.idempotent[k] = v
	}
	for _, me := range a.meterEvents {
		if !me.Duplicate {
			a.accepted[me.Identifier]++
		}
		a.seq = max(a.seq, me.Seq)
	}
	a.broken = false
	return nil
}

// begin starts an operation that reads or changes state (a.mu held):
// after a failed commit the in-memory state still holds the changes the
// store refused, so it is reloaded first, and nothing answered, shown or
// delivered ever rests on a write that was lost.
func (a *Account) begin(ctx context.Context) error {
	if !a.broken {
		return nil
	}
	return a.load(ctx)
}

// lockRead takes a.mu for a reader, on the store's state (see begin). When
// the store cannot be read it answers the error with a.mu released.
func (a *Account) lockRead(ctx context.Context) error {
	a.mu.Lock()
	if err := a.begin(ctx); err != nil {
		a.mu.Unlock()
		return err
	}
	return nil
}

// view runs fn under a.mu on the store's state (see lockRead), so that
// what fn reads together is one state; it answers the error, without
// running fn, when the store cannot be read.
func (a *Account) view(ctx context.Context, fn func()) error {
	if err := a.lockRead(ctx); err != nil {
		return err
	}
	defer a.mu.Unlock()
	fn()
	return nil
}

// commit writes what the operation changed to the store (a.mu held). On
// failure the operation's answer is an error and the state is reloaded
// before the next one.
func (a *Account) commit(ctx context.Context) error {
	ch := a.changes
	a.changes = changes{}
	if ch.empty() {
		return nil
	}
	if err := a.store.Commit(ctx, ch); err != nil {
		a.broken = true
		a.logger.ErrorContext(ctx, "sandbox: the store refused a change", "error", err)
		return fmt.Errorf("sandbox: store: %w", err)
	}
	if len(ch.Deliveries) > 0 {
		select {
		case a.wake <- struct{}{}:
		default:
		}
	}
	return nil
}

// do runs fn as one operation: under the lock, on a loaded state, its
// changes committed together.
func (a *Account) do(ctx context.Context, fn func() error) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if err := a.begin(ctx); err != nil {
		return err
	}
	if err := fn(); err != nil {
		// What fn changed before failing is kept only if the store takes it.
		if cerr := a.commit(ctx); cerr != nil {
			return cerr
		}
		return err
	}
	return a.commit(ctx)
}

func (a *Account) nextSeq() int64 {
	a.seq++
	return a.seq
}

// newID is a Stripe-like id: prefix, underscore, 24 random characters.
func newID(prefix string) string {
	const alphabet = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
	b := make([]byte, 24)
	_, _ = rand.Read(b)
	for i := range b {
		b[i] = alphabet[int(b[i])%len(alphabet)]
	}
	return prefix + "_" + string(b)
}

// put stores a new object or the new state of one (a.mu held).
func (a *Account) put(o *object) {
	if o.seq == 0 {
		o.seq = a.nextSeq()
		a.byType[o.typ] = append(a.byType[o.typ], o.id)
	}
	if o.private == nil {
		o.private = map[string]any{}
	}
	a.objects[o.id] = o
	a.changes.Objects = append(a.changes.Objects, o)
}

// create makes a new object of typ with id and its wire fields (a.mu held).
func (a *Account) create(typ, id string, data map[string]any) *object {
	data["id"] = id
	data["object"] = typ
	if _, ok := data["livemode"]; !ok {
		data["livemode"] = false
	}
	if _, ok := data["created"]; !ok {
		data["created"] = a.now().Unix()
	}
	o := &object{id: id, typ: typ, data: data, private: map[string]any{}}
	a.put(o)
	return o
}

// get returns the object id of type typ ("" for any), nil when unknown.
func (a *Account) get(typ, id string) *object {
	o := a.objects[id]
	if o == nil || (typ != "" && o.typ != typ) {
		return nil
	}
	return o
}

// list returns the objects of typ in creation order.
func (a *Account) list(typ string) []*object {
	ids := a.byType[typ]
	out := make([]*object, 0, len(ids))
	for _, id := range ids {
		out = append(out, a.objects[id])
	}
	return out
}

// Object returns a copy of the wire form of object id, nil when unknown.
func (a *Account) Object(id string) map[string]any {
	var out map[string]any
	_ = a.view(context.Background(), func() { out = a.objectCopy(id) })
	return out
}

// objectCopy is Object with a.mu held.
func (a *Account) objectCopy(id string) map[string]any {
	o := a.objects[id]
	if o == nil {
		return nil
	}
	return clone(o.data)
}

// Objects returns copies of the wire forms of every object of typ
// ("checkout.session", "payment_intent", ...), oldest first.
func (a *Account) Objects(typ string) []map[string]any {
	var out []map[string]any
	_ = a.view(context.Background(), func() { out = a.objectsCopy(typ) })
	return out
}

// objectsCopy is Objects with a.mu held.
func (a *Account) objectsCopy(typ string) []map[string]any {
	var out []map[string]any
	for _, o := range a.list(typ) {
		out = append(out, clone(o.data))
	}
	return out
}

// SetMeter maps a meter id to the event name it aggregates.
func (a *Account) SetMeter(meterID, eventName string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.meters[meterID] = eventName
}

// SetSummaryOverride makes every summary of a Stripe customer report
// value, whatever was sent, so that a reconciliation can be shown a drift.
func (a *Account) SetSummaryOverride(customer string, value float64) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.overrides[customer] = value
}

// SetSessionLifetime sets the lifetime of v2 meter event sessions opened
// from now on.
func (a *Account) SetSessionLifetime(d time.Duration) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.sessionLife = d
}

// ExpireSessions makes every v2 meter event session token opened so far expired.
func (a *Account) ExpireSessions() {
	a.mu.Lock()
	defer a.mu.Unlock()
	past := a.now().Add(-time.Second)
	for tok := range a.sessions {
		a.sessions[tok] = past
	}
}

// SetFields sets top-level wire fields of object id, as Stripe would have
// filled them (Stripe Tax's amounts, Adaptive Pricing's currency), without
// any event; it returns the object, nil when unknown. For tests.
func (a *Account) SetFields(ctx context.Context, id string, fields map[string]any) (map[string]any, error) {
	var out map[string]any
	err := a.do(ctx, func() error {
		o := a.objects[id]
		if o == nil {
			return nil
		}
		for k, v := range clone(fields) {
			o.data[k] = v
		}
		a.put(o)
		out = clone(o.data)
		return nil
	})
	return out, err
}

// Wire-form helpers. Numbers are int64 when the sandbox wrote them and
// json.Number when they were loaded; num reads both.

func str(m map[string]any, k string) string {
	s, _ := m[k].(string)
	return s
}

func num(m map[string]any, k string) int64 {
	switch v := m[k].(type) {
	case int64:
		return v
	case int:
		return int64(v)
	case float64:
		return int64(v)
	case json.Number:
		if n, err := v.Int64(); err == nil {
			return n
		}
		f, _ := v.Float64()
		return int64(f)
	}
	return 0
}

func flag(m map[string]any, k string) bool {
	b, _ := m[k].(bool)
	return b
}

func sub(m map[string]any, k string) map[string]any {
	v, _ := m[k].(map[string]any)
	return v
}

func nullable(s string) any {
	if s == "" {
		return nil
	}
	return s
}

// clone deep-copies a JSON object (nil stays nil), numbers as json.Number.
func clone(m map[string]any) map[string]any {
	if m == nil {
		return nil
	}
	raw, err := json.Marshal(m)
	if err != nil {
		panic(fmt.Sprintf("sandbox: object does not encode: %v", err))
	}
	return decodeObject(raw)
}

func decodeObject(raw []byte) map[string]any {
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	var out map[string]any
	if err := dec.Decode(&out); err != nil {
		panic(fmt.Sprintf("sandbox: object does not decode: %v", err))
	}
	return out
}

func stringMap(m map[string]string) map[string]any {
	out := make(map[string]any, len(m))
	for k, v := range m {
		out[k] = v
	}
	return out
}

// metadataCopy is a copy of a metadata object, never nil.
func metadataCopy(m map[string]any) map[string]any {
	out := clone(m)
	if out == nil {
		out = map[string]any{}
	}
	return out
}
