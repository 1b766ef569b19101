package metering_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/tallybilling/tally/internal/config"
	"github.com/tallybilling/tally/internal/metering"
)

// 10,000 events in batches of 1,000, a third of them repeats of earlier
// ones: each identifier is stored once and reaches Stripe exactly once.
func TestTenThousandEventsDeliveredExactlyOnce(t *testing.T) {
	t.Parallel()
	if testing.Short() {
		t.Skip("slow: many rounds or real seconds of pacing (skipped by -short; make test runs it)")
	}
	e := newEnv(t)
	const customers = 50
	for c := range customers {
		link(t, e.db, fmt.Sprintf("cust-%02d", c))
	}
	var all []metering.EventInput
	var distinct []string
	for i := 0; len(all) < 10_000; i++ {
		id := fmt.Sprintf("ten-%05d", i)
		distinct = append(distinct, id)
		all = append(all, ev(fmt.Sprintf("cust-%02d", i%customers), id, float64(i%5)))
		if i%2 == 1 && len(all) < 10_000 {
			// Every second event is followed by a repeat of an earlier one.
			all = append(all, ev(fmt.Sprintf("cust-%02d", (i/2)%customers), fmt.Sprintf("ten-%05d", i/2), float64((i/2)%5)))
		}
	}
	cfg := fastConfig()
	cfg.RateLimit, cfg.BatchSize = 5000, 1000
	opts := e.workerOptions(t, cfg)
	opts.Concurrency = 16
	reg := prometheus.NewRegistry()
	opts.Registry = reg
	startWorker(t, metering.NewWorker(opts))

	var accepted, duplicates int
	for start := 0; start < len(all); start += metering.MaxBatch {
		res := ingest(t, e.svc, all[start:start+metering.MaxBatch]...)
		accepted += res.Accepted
		duplicates += res.Duplicates
	}
	if accepted != len(distinct) || duplicates != len(all)-len(distinct) {
		t.Fatalf("accepted %d and duplicates %d, want %d and %d", accepted, duplicates, len(distinct), len(all)-len(distinct))
	}
	waitFor(t, "every event delivered", 3*time.Minute, func() bool {
		return countRows(t, e.db, `status = 'delivered'`) == int64(len(distinct))
	})
	assertDeliveredOnce(t, e, distinct)
	for id, n := range requestsPerIdentifier(t, e.fake) {
		if n != 1 {
			t.Errorf("%s sent %d times, want once (no fault, no resend)", id, n)
		}
	}
	if got := deliveries(t, reg, "delivered"); got != float64(len(distinct)) {
		t.Errorf("tally_usage_deliveries_total{result=delivered} = %v, want %d", got, len(distinct))
	}
}

// deliveries reads tally_usage_deliveries_total{result}.
func deliveries(t *testing.T, reg *prometheus.Registry, result string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != "tally_usage_deliveries_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "result" && l.GetValue() == result {
					return m.GetCounter().GetValue()
				}
			}
		}
	}
	return 0
}

func gauge(t *testing.T, reg *prometheus.Registry, name string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name && len(mf.GetMetric()) == 1 {
			return mf.GetMetric()[0].GetGauge().GetValue()
		}
	}
	return -1
}

// Stripe answering 500, then 429 with Retry-After, then hanging past the
// client's timeout: nothing is lost, nothing is accepted twice, the backlog
// drains once Stripe recovers, and the rate limit holds throughout.
//
// Not parallel: it times the pause after a 429 by the fake's clock, and a
// request sent before the 429 was read can reach the fake late on a loaded
// machine (it failed so beside the package's parallel tests).
func TestDeliverySurvivesStripeOutage(t *testing.T) {
	if testing.Short() {
		t.Skip("slow: many rounds or real seconds of pacing (skipped by -short; make test runs it)")
	}
	e := newEnv(t)
	link(t, e.db, "frank")
	link(t, e.db, "grace")
	const limit = 20
	cfg := fastConfig()
	cfg.RateLimit, cfg.BatchSize = limit, 50
	opts := e.workerOptions(t, cfg)
	opts.Config.SendTimeout = 300 * time.Millisecond

	all := ids("out", 80)
	var evs []metering.EventInput
	for i, id := range all {
		evs = append(evs, ev([]string{"frank", "grace"}[i%2], id, 1))
	}
	ingest(t, e.svc, evs...)

	e.fake.FailNext(8, http.StatusInternalServerError, "")
	e.fake.FailNext(4, http.StatusTooManyRequests, "1")
	opts.Stripe = newClient(t, e.fake, 250*time.Millisecond)
	startWorker(t, metering.NewWorker(opts))

	waitFor(t, "the injected 500s and 429s to be served", 30*time.Second, func() bool { return len(e.fake.Requests()) >= 14 })
	e.fake.SetHang(600 * time.Millisecond) // longer than the client's 250ms timeout
	time.Sleep(1500 * time.Millisecond)
	e.fake.SetHang(0)

	waitFor(t, "the backlog to drain", 60*time.Second, func() bool {
		return countRows(t, e.db, `status = 'delivered'`) == int64(len(all))
	})
	// Hung requests are processed by Stripe after their client gave up.
	time.Sleep(700 * time.Millisecond)
	assertDeliveredOnce(t, e, all)

	reqs := e.fake.Requests()
	var served500, served429, hung int
	var last429 time.Time
	for _, r := range reqs {
		switch r.Status {
		case http.StatusInternalServerError:
			served500++
		case http.StatusTooManyRequests:
			served429++
			last429 = r.Time
		}
		if r.Status == http.StatusOK || r.Status == http.StatusBadRequest {
			// 400 is Stripe's "already exists" for a resend of a hung request.
			if strings.Contains(r.Body, "identifier=") && r.Status == http.StatusBadRequest {
				hung++
			}
		}
	}
	if served500 != 8 || served429 != 4 {
		t.Errorf("served %d 500s and %d 429s, want 8 and 4", served500, served429)
	}
	if hung == 0 {
		t.Errorf("no resend of a hung request was answered as a duplicate; the hang was not exercised")
	}
	for _, r := range reqs {
		if r.Time.After(last429) && r.Time.Sub(last429) < 950*time.Millisecond {
			t.Errorf("a request %s after the last 429 (Retry-After: 1); sending should have paused", r.Time.Sub(last429))
			break
		}
	}
	assertPaced(t, e.fake, 1, limit)
}

// Three instances on one database: every event is sent once.
func TestThreeWorkersSendEachEventOnce(t *testing.T) {
	t.Parallel()
	if testing.Short() {
		t.Skip("slow: many rounds or real seconds of pacing (skipped by -short; make test runs it)")
	}
	e := newEnv(t)
	for c := range 9 {
		link(t, e.db, fmt.Sprintf("multi-%d", c))
	}
	all := ids("multi", 900)
	var evs []metering.EventInput
	for i, id := range all {
		evs = append(evs, ev(fmt.Sprintf("multi-%d", i%9), id, 2))
	}
	ingest(t, e.svc, evs...)
	cfg := fastConfig()
	cfg.BatchSize = 40
	for i := range 3 {
		opts := e.workerOptions(t, cfg)
		opts.Name = fmt.Sprintf("instance-%d", i)
		startWorker(t, metering.NewWorker(opts))
	}
	waitFor(t, "every event delivered", 2*time.Minute, func() bool {
		return countRows(t, e.db, `status = 'delivered'`) == int64(len(all))
	})
	assertDeliveredOnce(t, e, all)
	sent := requestsPerIdentifier(t, e.fake)
	for _, id := range all {
		if sent[id] != 1 {
			t.Errorf("%s sent %d times across the instances, want 1", id, sent[id])
		}
	}
}

// The v2 stream renews its session before it ends and reopens one Stripe
// expired early. Renewal is decided on the worker's clock, which the test
// moves forward, so no round depends on how fast a loaded machine runs: the
// sessions themselves live an hour.
func TestStreamTransportRenewsSessions(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	link(t, e.db, "hana")
	link(t, e.db, "ivan")
	const lifetime = time.Hour
	e.fake.SetSessionLifetime(lifetime)
	var ahead atomic.Int64 // how far the worker's clock runs ahead of the real one
	cfg := fastConfig()
	cfg.Transport = config.MeterTransportV2
	cfg.BatchSize = 250
	opts := e.workerOptions(t, cfg)
	opts.SessionRenewBefore = time.Minute
	opts.Now = func() time.Time { return time.Now().Add(time.Duration(ahead.Load())) }
	startWorker(t, metering.NewWorker(opts))

	opens := func() int {
		n := 0
		for _, r := range e.fake.Requests() {
			if r.Path == "/v2/billing/meter_event_session" {
				n++
			}
		}
		return n
	}
	var all []string
	var openedBefore int
	for round := range 4 {
		if round == 3 {
			openedBefore = opens()
		}
		batch := ids(fmt.Sprintf("v2-%d", round), 250)
		var evs []metering.EventInput
		for i, id := range batch {
			evs = append(evs, ev([]string{"hana", "ivan"}[i%2], id, 1))
		}
		ingest(t, e.svc, evs...)
		all = append(all, batch...)
		waitFor(t, "round delivered", 30*time.Second, func() bool {
			return countRows(t, e.db, `status = 'delivered'`) == int64(len(all))
		})
		switch round {
		case 0:
			if n := opens(); n != 1 {
				t.Fatalf("%d sessions opened for the first round, want 1 (reused for every request)", n)
			}
		case 1:
			e.fake.ExpireSessions() // the cached token dies early: reopened and resent
		case 2:
			// Within SessionRenewBefore of the session's end by the worker's
			// clock: the next round renews before it sends.
			ahead.Store(int64(lifetime - opts.SessionRenewBefore/2))
		}
	}
	if opens() <= openedBefore {
		t.Errorf("no session opened in the round within SessionRenewBefore of the end, want it renewed first")
	}
	assertDeliveredOnce(t, e, all)
	var opened, expired, streamed int
	for _, r := range e.fake.Requests() {
		switch r.Path {
		case "/v2/billing/meter_event_session":
			opened++
		case "/v2/billing/meter_event_stream":
			if r.Status == http.StatusUnauthorized {
				expired++
				continue
			}
			var body struct {
				Events []json.RawMessage `json:"events"`
			}
			if err := json.Unmarshal([]byte(r.Body), &body); err != nil {
				t.Fatalf("stream body: %v", err)
			}
			if len(body.Events) > 100 {
				t.Errorf("a stream request carried %d events, Stripe allows 100", len(body.Events))
			}
			streamed++
		}
	}
	if expired != 1 {
		t.Errorf("%d stream requests refused as expired, want exactly the one after ExpireSessions", expired)
	}
	if opened < 3 {
		t.Errorf("%d sessions opened, want at least 3 (first, after expiry, renewal)", opened)
	}
	if streamed < 10 {
		t.Errorf("%d accepted stream requests for 1000 events, want at least 10", streamed)
	}
	for _, m := range e.fake.MeterEvents() {
		if m.Via != "v2" {
			t.Fatalf("event %s arrived via %s, want v2", m.Identifier, m.Via)
		}
	}
}

// A session Stripe refused is forgotten at once: when opening its
// replacement fails too, the retry opens a session again rather than
// sending to the dead token a second time.
func TestStreamForgetsASessionStripeRefused(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	link(t, e.db, "kai")
	e.fake.SetSessionLifetime(time.Hour)
	cfg := fastConfig()
	cfg.Transport = config.MeterTransportV2
	startWorker(t, metering.NewWorker(e.workerOptions(t, cfg)))

	first := ids("v2-first", 10)
	var evs []metering.EventInput
	for _, id := range first {
		evs = append(evs, ev("kai", id, 1))
	}
	ingest(t, e.svc, evs...)
	waitFor(t, "the first events delivered", 30*time.Second, func() bool {
		return countRows(t, e.db, `status = 'delivered'`) == int64(len(first))
	})
	// The token dies, and the first attempt to open its replacement fails.
	e.fake.ExpireSessions()
	var failed atomic.Bool
	e.fake.SetFault(func(r *http.Request) (int, string, bool) {
		if r.URL.Path == "/v2/billing/meter_event_session" && failed.CompareAndSwap(false, true) {
			return http.StatusInternalServerError, `{"error":{"type":"api_error","message":"try again"}}`, true
		}
		return 0, "", false
	})
	second := ids("v2-second", 10)
	evs = evs[:0]
	for _, id := range second {
		evs = append(evs, ev("kai", id, 1))
	}
	ingest(t, e.svc, evs...)
	waitFor(t, "the second events delivered", 30*time.Second, func() bool {
		return countRows(t, e.db, `status = 'delivered'`) == int64(len(first)+len(second))
	})
	if !failed.Load() {
		t.Fatal("no session was opened after the expiry")
	}
	assertDeliveredOnce(t, e, append(first, second...))
	expired := 0
	for _, r := range e.fake.Requests() {
		if r.Path == "/v2/billing/meter_event_stream" && r.Status == http.StatusUnauthorized {
			expired++
		}
	}
	if expired != 1 {
		t.Errorf("%d stream requests sent to the expired session, want 1: once refused, it is not used again", expired)
	}
}

// An event Stripe refuses is dead-lettered at once (stripe_refused), with a
// usage.dead event; one Stripe answers 502 keeps being retried; once the
// cause is fixed a requeue sends the dead one again.
func TestRefusedEventsAreDeadLetteredAndRequeued(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	link(t, e.db, "jo")
	cfg := fastConfig()
	e.fake.SetFault(func(r *http.Request) (int, string, bool) {
		body := make([]byte, 4096)
		n, _ := r.Body.Read(body)
		form, _ := url.ParseQuery(string(body[:n]))
		switch form.Get("identifier") {
		case "refused", "refused-2":
			return http.StatusBadRequest, `{"error":{"type":"invalid_request_error","message":"No active meter was found for event_name api_calls."}}`, true
		case "flaky":
			return http.StatusBadGateway, `{"error":{"type":"api_error","message":"Bad gateway."}}`, true
		}
		return 0, "", false
	})
	ingest(t, e.svc, ev("jo", "refused", 1), ev("jo", "refused-2", 1), ev("jo", "flaky", 2), ev("jo", "fine", 3))
	opts := e.workerOptions(t, cfg)
	reg := prometheus.NewRegistry()
	opts.Registry = reg
	w := metering.NewWorker(opts)
	stop := startWorker(t, w)
	waitFor(t, "two dead letters", 30*time.Second, func() bool { return countRows(t, e.db, `status = 'dead'`) == 2 })
	waitFor(t, "the dead gauge to count them", 10*time.Second, func() bool { return gauge(t, reg, "tally_usage_events_dead") == 2 })
	waitFor(t, "the flaky event to be tried more than the old ten times", 30*time.Second, func() bool {
		return countRows(t, e.db, `identifier = 'flaky' AND attempts > 12`) == 1
	})
	stop()
	if got := deliveries(t, reg, "dead"); got != 2 {
		t.Errorf("tally_usage_deliveries_total{result=dead} = %v, want 2", got)
	}

	ctx := context.Background()
	refused, _ := e.svc.Get(ctx, "refused")
	if refused.Attempts != 1 || refused.DeadCode != metering.DeadStripeRefused || !strings.Contains(refused.LastError, "No active meter was found") ||
		refused.MaybeSentAt != nil {
		t.Errorf("refused event %+v: want dead stripe_refused after 1 attempt with Stripe's message, never maybe sent", refused)
	}
	flaky, _ := e.svc.Get(ctx, "flaky")
	if flaky.Status != metering.StatusPending || flaky.MaybeSentAt == nil {
		t.Errorf("flaky event %+v: want still pending, marked as maybe sent (a 502 may hide a kept event)", flaky)
	}
	var deadEvents int64
	e.db.Raw(`SELECT count(*) FROM events WHERE type = 'usage.dead' AND customer_id = 'jo' AND data->>'code' = 'stripe_refused'`).Scan(&deadEvents)
	if deadEvents != 2 {
		t.Errorf("%d usage.dead events with code stripe_refused, want one per dead letter (2)", deadEvents)
	}
	page, err := e.svc.List(ctx, metering.ListQuery{Status: metering.StatusDead, Limit: 1})
	if err != nil || len(page.Events) != 1 || page.Next == "" {
		t.Fatalf("first page of dead letters: %+v %v", page, err)
	}
	page2, err := e.svc.List(ctx, metering.ListQuery{Status: metering.StatusDead, Limit: 1, Cursor: page.Next})
	if err != nil || len(page2.Events) != 1 || page2.Next != "" || page2.Events[0].Identifier == page.Events[0].Identifier {
		t.Fatalf("second page of dead letters: %+v %v", page2, err)
	}

	if _, err := e.svc.Requeue(ctx, metering.RequeueInput{Identifiers: []string{"refused"}, AllDead: true}); err == nil {
		t.Errorf("requeue with both identifiers and all_dead: no error")
	}
	if _, err := e.svc.Requeue(ctx, metering.RequeueInput{}); err == nil {
		t.Errorf("requeue with neither: no error")
	}
	e.fake.SetFault(nil) // Stripe fixed: the meter exists now
	res, err := e.svc.Requeue(ctx, metering.RequeueInput{Identifiers: []string{"refused", "fine"}})
	if err != nil || res.Requeued != 1 || res.Skipped != 1 || !res.Results[0].Requeued || res.Results[1].Skip != metering.SkipNotDead {
		t.Fatalf("requeue refused and fine: %+v %v, want refused requeued and fine (delivered) skipped not_dead", res, err)
	}
	if got, _ := e.svc.Get(ctx, "refused"); got.Status != metering.StatusPending || got.Attempts != 0 || got.DeadCode != "" {
		t.Errorf("requeued event %+v, want pending with attempts and dead_code reset", got)
	}
	res, err = e.svc.Requeue(ctx, metering.RequeueInput{AllDead: true})
	if err != nil || res.Requeued != 1 || res.Skipped != 0 || len(res.Results) != 0 {
		t.Fatalf("requeue all dead: %+v %v, want refused-2 requeued, nothing left", res, err)
	}
	startWorker(t, metering.NewWorker(e.workerOptions(t, cfg)))
	waitFor(t, "every event delivered", 30*time.Second, func() bool { return countRows(t, e.db, `status = 'delivered'`) == 4 })
	assertDeliveredOnce(t, e, []string{"refused", "refused-2", "flaky", "fine"})
}

func TestWaitingEventsAreDeliveredOnceTheCustomerIsLinked(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ingest(t, e.svc, ev("kim", "wait-1", 1), ev("kim", "wait-2", 2))
	w := metering.NewWorker(e.workerOptions(t, fastConfig()))
	ctx := context.Background()
	for range 3 {
		if _, err := w.RunOnce(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if n := countRows(t, e.db, `status = 'waiting_customer'`); n != 2 {
		t.Fatalf("%d waiting events, want 2 while kim has no Stripe customer", n)
	}
	if len(e.fake.Requests()) != 0 {
		t.Fatalf("Stripe was called for a customer without a Stripe customer")
	}
	stripeID := link(t, e.db, "kim")
	if _, err := w.RunOnce(ctx); err != nil {
		t.Fatal(err)
	}
	assertDeliveredOnce(t, e, []string{"wait-1", "wait-2"})
	for _, m := range e.fake.MeterEvents() {
		if m.Payload["stripe_customer_id"] != stripeID {
			t.Errorf("event %s sent for %q, want %q", m.Identifier, m.Payload["stripe_customer_id"], stripeID)
		}
	}
}

// Shutdown while a request hangs at Stripe: Run waits for it, records the
// outcome and returns; nothing stays claimed.
func TestShutdownFinishesInFlightSend(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	link(t, e.db, "lee")
	ingest(t, e.svc, ev("lee", "inflight-1", 1), ev("lee", "inflight-2", 1))
	release := e.fake.HangUntilReleased()
	w := metering.NewWorker(e.workerOptions(t, fastConfig()))
	stop := startWorker(t, w)
	waitFor(t, "a request to reach Stripe", 10*time.Second, func() bool { return len(e.fake.Requests()) == 1 })
	go func() {
		time.Sleep(300 * time.Millisecond)
		release()
	}()
	stop() // returns only after the hung request finished
	got, err := e.svc.Get(context.Background(), "inflight-1")
	if err != nil || got.Status != metering.StatusDelivered {
		t.Fatalf("in-flight event after shutdown: %+v %v, want delivered", got, err)
	}
	if n := countRows(t, e.db, `claimed_by IS NOT NULL`); n != 0 {
		t.Errorf("%d events still claimed after shutdown, want 0 (released for the next instance)", n)
	}
	if n := countRows(t, e.db, `identifier = 'inflight-2' AND status = 'pending' AND attempts = 0`); n != 1 {
		t.Errorf("the unsent event should be pending with no attempt counted")
	}
}

// A claim whose worker died (its lease ran out) is taken over; a live
// claim is left alone.
func TestExpiredLeaseIsTakenOver(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	link(t, e.db, "max")
	ingest(t, e.svc, ev("max", "crashed", 1), ev("max", "held", 1))
	e.db.Exec(`UPDATE usage_events SET claimed_by = 'gone#1', lease_until = now() - interval '1 second',
		next_attempt_at = now() - interval '1 second' WHERE identifier = 'crashed'`)
	e.db.Exec(`UPDATE usage_events SET claimed_by = 'alive#1', lease_until = now() + interval '1 hour',
		next_attempt_at = now() + interval '1 hour' WHERE identifier = 'held'`)
	w := metering.NewWorker(e.workerOptions(t, fastConfig()))
	if _, err := w.RunOnce(context.Background()); err != nil {
		t.Fatal(err)
	}
	if e.fake.Count("crashed") != 1 || e.fake.Count("held") != 0 {
		t.Errorf("Stripe got crashed=%d held=%d, want the expired claim sent and the live one untouched",
			e.fake.Count("crashed"), e.fake.Count("held"))
	}
	if n := countRows(t, e.db, `identifier = 'held' AND status = 'pending' AND claimed_by = 'alive#1'`); n != 1 {
		t.Errorf("the live claim was disturbed")
	}
}

// Stripe allows one concurrent call per customer and meter: with every
// request taking 30ms, arrivals of one customer's events are never closer
// than that, while different customers do go in parallel.
func TestOneCallAtATimePerCustomerAndMeter(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	customers := []string{"nia", "omar", "pat"}
	var evs []metering.EventInput
	for _, c := range customers {
		link(t, e.db, c)
		for i := range 15 {
			evs = append(evs, ev(c, fmt.Sprintf("%s-%02d", c, i), 1))
		}
	}
	ingest(t, e.svc, evs...)
	const hang = 30 * time.Millisecond
	e.fake.SetHang(hang)
	if _, err := metering.NewWorker(e.workerOptions(t, fastConfig())).RunOnce(context.Background()); err != nil {
		t.Fatal(err)
	}
	last := map[string]time.Time{}
	overlapped := false
	var prev time.Time
	for _, r := range e.fake.Requests() {
		form, _ := url.ParseQuery(r.Body)
		c := form.Get("payload[stripe_customer_id]")
		if at, ok := last[c]; ok && r.Time.Sub(at) < hang {
			t.Errorf("two requests for %s arrived %s apart, less than the %s each takes", c, r.Time.Sub(at), hang)
		}
		if !prev.IsZero() && r.Time.Sub(prev) < hang {
			overlapped = true
		}
		last[c], prev = r.Time, r.Time
	}
	if !overlapped {
		t.Errorf("no two requests overlapped at all; different customers should be sent in parallel")
	}
	if n := countRows(t, e.db, `status = 'delivered'`); n != int64(len(evs)) {
		t.Errorf("%d delivered, want %d", n, len(evs))
	}
}

// A stream request refused as unauthorized (a revoked session token) gets a
// new session and goes through at once, without the pause a refused key
// would cause.
func TestStreamReopensSessionAfterUnauthorizedToken(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	link(t, e.db, "quinn")
	var refused atomic.Bool
	e.fake.SetFault(func(r *http.Request) (int, string, bool) {
		if r.URL.Path == "/v2/billing/meter_event_stream" && refused.CompareAndSwap(false, true) {
			return http.StatusUnauthorized, `{"error":{"type":"invalid_request_error","code":"unauthorized","message":"Invalid session token."}}`, true
		}
		return 0, "", false
	})
	cfg := fastConfig()
	cfg.Transport = config.MeterTransportV2
	ingest(t, e.svc, ev("quinn", "revoked-1", 1), ev("quinn", "revoked-2", 2))
	w := metering.NewWorker(e.workerOptions(t, cfg))
	if _, err := w.RunOnce(context.Background()); err != nil {
		t.Fatal(err)
	}
	if !refused.Load() {
		t.Fatal("the fault was never hit")
	}
	assertDeliveredOnce(t, e, []string{"revoked-1", "revoked-2"})
	opened := 0
	for _, r := range e.fake.Requests() {
		if r.Path == "/v2/billing/meter_event_session" {
			opened++
		}
	}
	if opened != 2 {
		t.Errorf("%d sessions opened, want 2 (the first, and one after the refused token)", opened)
	}
}

// Settings come from config, which holds every default: a zero setting in a
// hand-built MeteringConfig is a programming error that NewWorker refuses,
// naming it, rather than quietly choosing a value of its own.
func TestNewWorkerRefusesUnsetSettings(t *testing.T) {
	t.Parallel()
	cfg := fastConfig()
	cfg.BatchSize = 0
	defer func() {
		if msg := fmt.Sprint(recover()); !strings.Contains(msg, "TALLY_METER_BATCH_SIZE") {
			t.Fatalf("NewWorker panicked with %q, want the unset TALLY_METER_BATCH_SIZE named", msg)
		}
	}()
	metering.NewWorker(metering.WorkerOptions{Config: cfg})
}
