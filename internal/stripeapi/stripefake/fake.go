// Package stripefake is the Stripe of tests: an in-memory sandbox.Account
// (the same emulator `TALLY_STRIPE_SANDBOX=true` runs inside tally) served
// by httptest. The real stripeapi client talks to it
// (stripeapi.Config.APIURL = fake.URL()), so tests exercise the real
// request encoding, headers and error handling. stripe-mock, being
// stateless, cannot show what this fake shows: idempotent replays,
// duplicate meter event identifiers, expiring v2 sessions, summaries
// computed from what was sent, 429 with Retry-After, 5xx and hangs.
//
// The endpoints are sandbox.API's; the hosted checkout page is served too,
// at URL()/sandbox/checkout/{id}. Events the fake emits are recorded, not
// delivered: tests deliver the events they mean to, signed, themselves
// (or call Sandbox().Pay and read Sandbox().Events()).
//
// Faults (FailNext, SetFault, SetHang, HangUntilReleased) apply to every
// endpoint, before it runs. A hung request is still processed once the hang
// ends, even if its client gave up, as Stripe may act on a request whose
// answer never arrives. DropAnswers shows that case at once: the request is
// processed and its answer lost.
package stripefake

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"net/url"
	"sort"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tallybilling/tally/internal/sandbox"
)

// DefaultSessionLifetime is how long a v2 meter event session lives, as at Stripe.
const DefaultSessionLifetime = 15 * time.Minute

// RecordedRequest is one request the fake received.
type RecordedRequest = sandbox.RecordedRequest

// RecordedMeterEvent is one meter event the fake accepted.
type RecordedMeterEvent = sandbox.MeterEvent

// Fake is the fake Stripe. All methods are safe for concurrent use.
type Fake struct {
	srv  *httptest.Server
	acct *sandbox.Account
	api  *sandbox.API
	// clock is the fake Stripe's clock (nil: the wall clock).
	clock atomic.Pointer[func() time.Time]
}

// New starts a fake Stripe that is closed when the test ends.
func New(t testing.TB) *Fake {
	t.Helper()
	f := &Fake{}
	mux := http.NewServeMux()
	f.srv = httptest.NewUnstartedServer(mux)
	acct, err := sandbox.New(context.Background(), sandbox.Options{PublicURL: "http://" + f.srv.Listener.Addr().String(), Now: f.now})
	if err != nil {
		t.Fatalf("stripefake: %v", err)
	}
	f.acct, f.api = acct, sandbox.NewAPI(acct)
	mux.Handle("/sandbox/", sandbox.NewWeb(sandbox.WebOptions{Account: acct}))
	mux.Handle("/", f.api)
	f.srv.Start()
	t.Cleanup(f.Close)
	return f
}

// SetClock makes now the fake Stripe's clock from here on, for a test that
// moves tally's clock: Stripe judges a meter event's timestamp by its own.
func (f *Fake) SetClock(now func() time.Time) { f.clock.Store(&now) }

func (f *Fake) now() time.Time {
	if c := f.clock.Load(); c != nil {
		return (*c)()
	}
	return time.Now()
}

// URL is the fake's base URL, for stripeapi.Config.APIURL (and MeterEventsURL).
func (f *Fake) URL() string { return f.srv.URL }

// Sandbox is the account behind the fake, for what the methods below do
// not cover (paying on the hosted page, refunds, disputes, its events).
func (f *Fake) Sandbox() *sandbox.Account { return f.acct }

// Close releases hung requests and stops the server. New registers it with
// the test's Cleanup; calling it again is harmless.
func (f *Fake) Close() {
	f.api.Close()
	f.srv.Close()
}

// FailNext answers the next n requests, whatever their endpoint, with status
// and a Stripe-shaped error body, plus a Retry-After header when retryAfter
// is not empty. 429 carries code rate_limit, as at Stripe.
func (f *Fake) FailNext(n int, status int, retryAfter string) { f.api.FailNext(n, status, retryAfter) }

// SetFault installs fn, consulted for every request after FailNext's queue:
// when it returns ok, the fake answers status and body (JSON) instead of
// running the endpoint. fn may read r.Body; the endpoint still sees it.
// nil removes it.
func (f *Fake) SetFault(fn func(r *http.Request) (status int, body string, ok bool)) {
	f.api.SetFault(fn)
}

// DropAnswers installs fn, consulted for every request: when it returns
// true, the request is handled as usual (faults included, so what it
// creates is kept) but its answer is never sent: the connection is closed,
// as when a timeout or a broken connection loses Stripe's answer. fn may
// read r.Body; the endpoint still sees it. nil removes it.
func (f *Fake) DropAnswers(fn func(r *http.Request) bool) { f.api.DropAnswers(fn) }

// SetHang delays every request by d before it is handled (0 stops it).
func (f *Fake) SetHang(d time.Duration) { f.api.SetHang(d) }

// HangUntilReleased holds every request arriving from now on until release
// is called (or the fake closes); then they are handled as usual.
func (f *Fake) HangUntilReleased() (release func()) { return f.api.HangUntilReleased() }

// SetSessionLifetime sets the lifetime of v2 meter event sessions opened
// from now on.
func (f *Fake) SetSessionLifetime(d time.Duration) { f.acct.SetSessionLifetime(d) }

// ExpireSessions makes every v2 session token opened so far expired.
func (f *Fake) ExpireSessions() { f.acct.ExpireSessions() }

// SetMeter maps a meter id to the event name it aggregates. A meter id
// without a mapping aggregates the events whose event name equals the id.
func (f *Fake) SetMeter(meterID, eventName string) { f.acct.SetMeter(meterID, eventName) }

// SetSummaryOverride makes every summary of a Stripe customer report value,
// whatever was sent, so reconciliation can be shown a drift.
func (f *Fake) SetSummaryOverride(customer string, value float64) {
	f.acct.SetSummaryOverride(customer, value)
}

// Customers returns the form parameters of every customer created (not of
// idempotent replays), in order.
func (f *Fake) Customers() []url.Values { return f.created("/v1/customers") }

// CheckoutSessions returns the form parameters of every Checkout Session
// created (not of idempotent replays), in order.
func (f *Fake) CheckoutSessions() []url.Values { return f.created("/v1/checkout/sessions") }

// created returns the forms of the POSTs to path that created something:
// answered 200 and not replayed. A replay answers with the same id as the
// first, so the first of each id is kept.
func (f *Fake) created(path string) []url.Values {
	var out []url.Values
	seen := map[string]bool{}
	for _, r := range f.api.Requests() {
		if r.Method != http.MethodPost || r.Path != path || r.Status != http.StatusOK {
			continue
		}
		form, err := url.ParseQuery(r.Body)
		if err != nil {
			continue
		}
		key := r.IdempotencyKey
		if key != "" && seen[key] {
			continue
		}
		if key != "" {
			seen[key] = true
		}
		out = append(out, form)
	}
	return out
}

// CheckoutSession returns the Checkout Session object with id as
// GET /v1/checkout/sessions/{id} answers it, nil when the fake never created it.
func (f *Fake) CheckoutSession(id string) map[string]any { return plain(f.acct.Object(id)) }

// PayCheckoutSession is the buyer paying Checkout Session id with
// PaymentIntent paymentIntentID: the session becomes complete and paid and
// names the PaymentIntent, as Stripe shows it afterwards. It returns the
// session object (for a checkout.session.completed event), nil when the
// fake never created the session. No event is sent: the test sends them.
func (f *Fake) PayCheckoutSession(id, paymentIntentID string) map[string]any {
	return f.UpdateCheckoutSession(id, map[string]any{"status": "complete", "payment_status": "paid", "payment_intent": paymentIntentID})
}

// UpdateCheckoutSession sets top-level fields of Checkout Session id, as
// Stripe would have filled them (amount_total and total_details for Stripe
// Tax, currency and currency_conversion for Adaptive Pricing), and returns
// the session object, nil when the fake never created the session.
func (f *Fake) UpdateCheckoutSession(id string, fields map[string]any) map[string]any {
	if f.acct.Object(id) == nil {
		return nil
	}
	obj, err := f.acct.SetFields(context.Background(), id, fields)
	if err != nil {
		panic("stripefake: " + err.Error()) // the memory store never fails
	}
	return plain(obj)
}

// MeterEvents returns every accepted meter event, in order of arrival.
func (f *Fake) MeterEvents() []RecordedMeterEvent { return f.acct.MeterEvents() }

// Count returns how many deliveries of identifier the fake accepted: at
// most 1 through v1, which refuses duplicates; through v2 every accepted
// copy counts.
func (f *Fake) Count(identifier string) int { return f.acct.Count(identifier) }

// Requests returns every request received, in order of arrival.
func (f *Fake) Requests() []RecordedRequest { return f.api.Requests() }

// MaxRequestsPerSecond returns the largest number of requests that arrived
// within any one-second window. With paths, only requests whose path starts
// with one of them count.
func (f *Fake) MaxRequestsPerSecond(paths ...string) int {
	var times []time.Time
	for _, r := range f.api.Requests() {
		if len(paths) == 0 || hasAnyPrefix(r.Path, paths) {
			times = append(times, r.Time)
		}
	}
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

// plain re-decodes an object with encoding/json's defaults (numbers as
// float64), as the fake always returned them.
func plain(m map[string]any) map[string]any {
	if m == nil {
		return nil
	}
	raw, err := json.Marshal(m)
	if err != nil {
		panic("stripefake: " + err.Error())
	}
	var out map[string]any
	if err := json.Unmarshal(raw, &out); err != nil {
		panic("stripefake: " + err.Error())
	}
	return out
}
