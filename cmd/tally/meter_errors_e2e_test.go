package main

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/tallybilling/tally/internal/stripeapi/stripefake"
	"github.com/tallybilling/tally/internal/stripeapi/stripemock"
	"github.com/tallybilling/tally/pkg/client"
)

// Stripe's v2 meter event stream answers before it validates: an event it
// then refuses (here: stamped ahead of a Stripe clock ten minutes behind
// tally's) is dropped, never billed, and reported in a meter error report,
// a thin event whose details tally fetches from Stripe. The events the
// report names are dead-lettered stripe_refused, with a usage.dead event,
// instead of staying "delivered" while Stripe never counted them; the ones
// it only counts show in tally_usage_refused_total. A redelivered report
// changes nothing more; a report Stripe could not be asked about is
// retried; a named event requeued once its cause is mended reaches Stripe
// once.
func TestAMeterErrorReportDeadLettersTheEventsStripeRefusedAfterTakingThem(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	fake.SetClock(func() time.Time { return time.Now().Add(-10 * time.Minute) })
	s := meterErrorsServer(t, fake, "meter-errors", map[string]string{"TALLY_METER_TRANSPORT": "v2"})
	ctx := context.Background()
	svc := s.service(t)
	feedStart := pollEvents(t, svc, "", 0).NextCursor

	const sent = 8
	var batch client.UsageBatch
	for i := range sent {
		batch.Events = append(batch.Events, usageEvent("meter-errors", fmt.Sprintf("refused-%d", i), 1))
	}
	key := "meter-errors-batch"
	res, err := svc.IngestUsageEventsWithResponse(ctx, &client.IngestUsageEventsParams{IdempotencyKey: &key}, batch)
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "ingest", res.StatusCode(), res.Body, http.StatusAccepted)
	for _, ev := range batch.Events {
		waitUsageStatus(t, svc, ev.Identifier, client.UsageStatusDelivered)
	}
	if n := len(fake.MeterEvents()); n != 0 {
		t.Fatalf("Stripe counted %d of the events it found ten minutes ahead, want 0", n)
	}

	reportID, report := waitMeterErrorReport(t, fake)
	if strings.Contains(string(report), `"data"`) {
		t.Fatalf("the report was delivered with its data, want it thin: %s", report)
	}
	var named []string
	var full struct {
		Data struct {
			Reason struct {
				ErrorTypes []struct {
					SampleErrors []struct {
						Request struct {
							Identifier string `json:"identifier"`
						} `json:"request"`
					} `json:"sample_errors"`
				} `json:"error_types"`
			} `json:"reason"`
		} `json:"data"`
	}
	status, body := getWithToken(t, fake.URL()+"/v2/core/events/"+reportID, "sk_test_tally")
	if status != http.StatusOK || json.Unmarshal([]byte(body), &full) != nil {
		t.Fatalf("the report at Stripe: %d %s", status, body)
	}
	for _, et := range full.Data.Reason.ErrorTypes {
		for _, e := range et.SampleErrors {
			named = append(named, e.Request.Identifier)
		}
	}
	if len(named) == 0 || len(named) >= sent {
		t.Fatalf("the report names %d of %d refused events; the test needs some named and some only counted", len(named), sent)
	}

	// The first delivery meets Stripe down when tally asks what it reports.
	fake.SetFault(func(r *http.Request) (int, string, bool) {
		if strings.HasPrefix(r.URL.Path, "/v2/core/events/") {
			return http.StatusServiceUnavailable, `{"error":{"type":"api_error","message":"down"}}`, true
		}
		return 0, "", false
	})
	deliver(t, s, report)
	gdb := openDB(t, s)
	if st, lastErr := eventStatus(t, gdb, reportID); st != "failed" {
		t.Fatalf("the report while Stripe is down: %s (%s), want failed", st, lastErr)
	}
	for _, id := range named {
		if got := waitUsageStatus(t, svc, id, client.UsageStatusDelivered); got.DeadCode != nil {
			t.Fatalf("%s changed while Stripe could not be asked: %+v", id, got)
		}
	}
	fake.SetFault(nil)
	waitFor(t, "the report retried once Stripe answers", func() bool {
		st, _ := eventStatus(t, gdb, reportID)
		return st == "processed"
	})

	isNamed := map[string]bool{}
	for _, id := range named {
		isNamed[id] = true
		got := waitUsageStatus(t, svc, id, client.UsageStatusDead)
		if got.DeadCode == nil || *got.DeadCode != client.UsageDeadCodeStripeRefused || got.LastError == nil ||
			!strings.Contains(*got.LastError, reportID) || !strings.Contains(*got.LastError, "timestamp_in_future") {
			t.Errorf("%s: %+v, want dead stripe_refused naming the report and its code", id, got)
		}
	}
	for _, ev := range batch.Events {
		if !isNamed[ev.Identifier] {
			waitUsageStatus(t, svc, ev.Identifier, client.UsageStatusDelivered)
		}
	}
	page := pollEvents(t, svc, feedStart, len(named))
	dead := 0
	for _, ev := range page.Data {
		if ev.Type == "usage.dead" {
			dead++
		}
	}
	if dead != len(named) {
		t.Errorf("%d usage.dead events in the feed, want %d", dead, len(named))
	}
	wantMetric := fmt.Sprintf(`tally_usage_refused_total{code="timestamp_in_future"} %d`, sent)
	if m := metrics(t, s); !strings.Contains(m, wantMetric) {
		t.Errorf("metrics lack %q", wantMetric)
	}

	// Stripe redelivers the report: nothing changes twice.
	if code, body := postWebhook(t, s, report, sign(report, testWebhookSecret, time.Now())); code != http.StatusOK {
		t.Fatalf("the report redelivered: %d %s", code, body)
	}
	if m := metrics(t, s); !strings.Contains(m, wantMetric) {
		t.Errorf("after the redelivery, metrics lack %q", wantMetric)
	}
	if n := countRows(t, gdb, `SELECT count(*) FROM usage_events WHERE status = 'dead'`); n != int64(len(named)) {
		t.Errorf("%d dead events after the redelivery, want %d", n, len(named))
	}

	// Once the clocks agree, a named event requeued reaches Stripe, once.
	fake.SetClock(time.Now)
	all := false
	requeued, err := s.admin(t).RequeueUsageEventsWithResponse(ctx, client.RequeueRequest{AllDead: &all, Identifiers: &[]string{named[0]}})
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "requeue", requeued.StatusCode(), requeued.Body, http.StatusOK)
	waitUsageStatus(t, svc, named[0], client.UsageStatusDelivered)
	if c := fake.Count(named[0]); c != 1 {
		t.Errorf("Stripe counted the requeued event %d times, want 1", c)
	}
	mustVerifyClean(t, s)
}

// A thin event is only a pointer: tally believes what Stripe answers for
// its id, not the envelope. A signed envelope of a type tally does not
// handle is stored and ignored; an unsigned or forged one is refused and
// stores nothing; one naming an event Stripe does not have changes no
// usage event.
func TestThinEventsAreVerifiedAndOnlyStripesWordCounts(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	s := meterErrorsServer(t, fake, "thin-events", map[string]string{"TALLY_STRIPE_EVENT_MAX_ATTEMPTS": "2"})
	ctx := context.Background()
	svc := s.service(t)
	key := "thin-events-batch"
	res, err := svc.IngestUsageEventsWithResponse(ctx, &client.IngestUsageEventsParams{IdempotencyKey: &key},
		client.UsageBatch{Events: []client.UsageEventInput{usageEvent("thin-events", "kept-1", 1)}})
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "ingest", res.StatusCode(), res.Body, http.StatusAccepted)
	waitUsageStatus(t, svc, "kept-1", client.UsageStatusDelivered)

	thin := func(id, typ string) []byte {
		return []byte(fmt.Sprintf(`{"object":"v2.core.event","id":%q,"type":%q,"created":%q,"livemode":false,"context":null,"reason":null,`+
			`"related_object":{"id":"mtr_x","type":"billing.meter","url":"/v1/billing/meters/mtr_x"}}`, id, typ, time.Now().UTC().Format(time.RFC3339Nano)))
	}
	gdb := openDB(t, s)

	forged := thin("evt_thin_forged", "v1.billing.meter.error_report_triggered")
	if code, body := postWebhook(t, s, forged, sign(forged, "whsec_not_ours", time.Now())); code != http.StatusBadRequest {
		t.Fatalf("a thin event signed with another secret: %d %s, want 400", code, body)
	}
	if n := countRows(t, gdb, `SELECT count(*) FROM stripe_events WHERE id = 'evt_thin_forged'`); n != 0 {
		t.Fatalf("the forged thin event was stored")
	}

	ping := thin("evt_thin_ping", "v2.core.event_destination.ping")
	deliver(t, s, ping)
	if st, lastErr := eventStatus(t, gdb, "evt_thin_ping"); st != "ignored" {
		t.Errorf("a thin event of a type tally does not handle: %s (%s), want ignored", st, lastErr)
	}

	// Signed, but Stripe holds no such event: nothing is believed, and the
	// event is parked after its attempts, for an operator.
	unknown := thin("evt_thin_unknown", "v1.billing.meter.error_report_triggered")
	deliver(t, s, unknown)
	waitFor(t, "the report Stripe does not know parked", func() bool {
		st, _ := eventStatus(t, gdb, "evt_thin_unknown")
		return st == "parked"
	})
	waitUsageStatus(t, svc, "kept-1", client.UsageStatusDelivered)

	for _, bad := range []string{
		`{"object":"v2.core.event","type":"v1.billing.meter.error_report_triggered"}`,
		`{"object":"v2.core.event","id":"evt_thin_badtime","type":"v1.billing.meter.error_report_triggered","created":12}`,
	} {
		if code, body := postWebhook(t, s, []byte(bad), sign([]byte(bad), testWebhookSecret, time.Now())); code != http.StatusBadRequest ||
			!strings.Contains(string(body), "detail") {
			t.Errorf("thin event %s: %d %s, want a 400 problem", bad, code, body)
		}
	}
	if n := countRows(t, gdb, `SELECT count(*) FROM stripe_events WHERE id = 'evt_thin_badtime'`); n != 0 {
		t.Errorf("a thin event that does not decode was stored")
	}
}

// meterErrorsServer is a server on fake, with env added, that retries
// stored Stripe events every 100 ms, and customer linked to a Stripe
// customer.
func meterErrorsServer(t *testing.T, fake *stripefake.Fake, customer string, env map[string]string) *server {
	t.Helper()
	e := meteringEnv(t, fake.URL())
	e["TALLY_STRIPE_EVENT_RETRY_INTERVAL"] = "100ms"
	maps.Copy(e, env)
	s := startServer(t, e)
	linkStripeCustomer(t, s, customer)
	return s
}

// linkStripeCustomer creates customer on s with a Stripe customer id
// made from its name.
func linkStripeCustomer(t *testing.T, s *server, customer string) {
	t.Helper()
	stripeID := "cus_" + strings.ReplaceAll(customer, "-", "")
	linked, err := s.service(t).UpsertCustomerWithResponse(context.Background(), customer, client.CustomerUpsert{StripeCustomerId: &stripeID})
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "link customer", linked.StatusCode(), linked.Body, http.StatusCreated)
}

// A meter error report whose delivery never came (tally down for longer
// than Stripe retries, or no event destination set up for thin events)
// is found by the catch-up, which lists each of tally's meters' reports,
// and dead-letters the events it names; a second catch-up finds it stored.
func TestTheCatchUpFindsAMeterErrorReportNeverDelivered(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	fake.SetMeter("mtr_api_calls", "api_calls") // the catalog's meter
	fake.SetClock(func() time.Time { return time.Now().Add(-10 * time.Minute) })
	s := meterErrorsServer(t, fake, "missed-report", map[string]string{"TALLY_METER_TRANSPORT": "v2"})
	ctx := context.Background()
	svc := s.service(t)
	key := "missed-report-batch"
	res, err := svc.IngestUsageEventsWithResponse(ctx, &client.IngestUsageEventsParams{IdempotencyKey: &key},
		client.UsageBatch{Events: []client.UsageEventInput{usageEvent("missed-report", "missed-1", 1), usageEvent("missed-report", "missed-2", 1)}})
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "ingest", res.StatusCode(), res.Body, http.StatusAccepted)
	waitUsageStatus(t, svc, "missed-1", client.UsageStatusDelivered)
	waitUsageStatus(t, svc, "missed-2", client.UsageStatusDelivered)
	waitMeterErrorReport(t, fake)

	since := time.Now().Add(-time.Hour)
	first := stripeSync(t, s, &since)
	if first.EventsNew != 1 {
		t.Errorf("the catch-up stored %d new events, want the 1 report", first.EventsNew)
	}
	for _, id := range []string{"missed-1", "missed-2"} {
		got := waitUsageStatus(t, svc, id, client.UsageStatusDead)
		if got.DeadCode == nil || *got.DeadCode != client.UsageDeadCodeStripeRefused {
			t.Errorf("%s: %+v, want dead stripe_refused", id, got)
		}
	}
	if again := stripeSync(t, s, &since); again.EventsNew != 0 {
		t.Errorf("a second catch-up stored %d new events, want 0", again.EventsNew)
	}
	mustVerifyClean(t, s)
}

// waitMeterErrorReport waits for fake to emit a meter error report and
// returns the newest one's id and the body Stripe delivers.
func waitMeterErrorReport(t *testing.T, fake *stripefake.Fake) (id string, body []byte) {
	t.Helper()
	waitFor(t, "Stripe's meter error report", func() bool {
		for _, ev := range fake.Sandbox().Events() {
			if ev.Type == "v1.billing.meter.error_report_triggered" {
				id, body = ev.ID, ev.Payload
			}
		}
		return body != nil
	})
	return id, body
}

// A Stripe stand-in without the v2 events API (stripe-mock, as `make run
// STRIPE=mock` uses) answers the listing of meter error reports 404: that
// lists nothing, and the catch-up answers as before instead of failing
// every sync.
func TestACatchUpAgainstStripeMockListsNoReportsAndSucceeds(t *testing.T) {
	t.Parallel()
	s := startServer(t, meteringEnv(t, stripemock.Start(t)))
	stripeSync(t, s, nil) // 200, or it fails the test
}
