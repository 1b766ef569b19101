package main

import (
	"context"
	"fmt"
	"maps"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tallybilling/tally/internal/stripeapi/stripefake"
	"github.com/tallybilling/tally/pkg/client"
)

// refusedTotal sums tally_usage_refused_total{code} over servers.
func refusedTotal(t *testing.T, code string, servers ...*server) int {
	t.Helper()
	re := regexp.MustCompile(`(?m)^tally_usage_refused_total\{code="` + regexp.QuoteMeta(code) + `"\} (\d+)$`)
	total := 0
	for _, s := range servers {
		if m := re.FindStringSubmatch(metrics(t, s)); m != nil {
			n, _ := strconv.Atoi(m[1])
			total += n
		}
	}
	return total
}

// refusedSetup starts n replicas on one database streaming (v2) to a fake
// Stripe whose clock is ten minutes behind, links customer and ingests
// count events it refuses after taking them. It returns the replicas, the
// fake, the identifiers and the report Stripe emitted (its id and the
// body Stripe delivers).
func refusedSetup(t *testing.T, n int, customer string, count int) ([]*server, *stripefake.Fake, []string, string, []byte) {
	t.Helper()
	fake := stripefake.New(t)
	fake.SetMeter("mtr_api_calls", "api_calls")
	fake.SetClock(func() time.Time { return time.Now().Add(-10 * time.Minute) })
	env := meteringEnv(t, fake.URL())
	env["TALLY_METER_TRANSPORT"] = "v2"
	env["TALLY_STRIPE_EVENT_RETRY_INTERVAL"] = "100ms"
	servers := []*server{startServer(t, env)}
	for len(servers) < n {
		servers = append(servers, startServer(t, maps.Clone(env)))
	}
	ctx := context.Background()
	svc := servers[0].service(t)
	linkStripeCustomer(t, servers[0], customer)
	var batch client.UsageBatch
	var ids []string
	// A few minutes ago (a reconciliation covers whole minutes gone by):
	// still seven minutes ahead of Stripe's clock.
	at := time.Now().Add(-3 * time.Minute)
	for i := range count {
		id := fmt.Sprintf("%s-%d", customer, i)
		ids = append(ids, id)
		ev := usageEvent(customer, id, 1)
		ev.Timestamp = &at
		batch.Events = append(batch.Events, ev)
	}
	key := customer + "-batch"
	res, err := svc.IngestUsageEventsWithResponse(ctx, &client.IngestUsageEventsParams{IdempotencyKey: &key}, batch)
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "ingest", res.StatusCode(), res.Body, http.StatusAccepted)
	for _, id := range ids {
		waitUsageStatus(t, svc, id, client.UsageStatusDelivered)
	}
	reportID, report := waitMeterErrorReport(t, fake)
	return servers, fake, ids, reportID, report
}

// One report, delivered at once to three replicas, dead-letters each event
// it names once; an operator's replay of it after one of them was requeued
// and reached Stripe changes nothing: the resent event was counted by
// Stripe and stays delivered, no second usage.dead is written, and the
// refusals are not counted again ("A report processed again changes no
// event twice").
func TestAttackMeterErrorReportReplayedAfterRequeueChangesNothing(t *testing.T) {
	t.Parallel()
	servers, fake, ids, reportID, report := refusedSetup(t, 3, "replayed-report", 3)
	ctx := context.Background()
	svc := servers[0].service(t)
	gdb := openDB(t, servers[0])

	var wg sync.WaitGroup
	for _, s := range servers {
		for range 2 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				if code, body := postWebhook(t, s, report, sign(report, testWebhookSecret, time.Now())); code != http.StatusOK {
					t.Errorf("report delivery: %d %s", code, body)
				}
			}()
		}
	}
	wg.Wait()
	waitFor(t, "the report processed", func() bool {
		st, _ := eventStatus(t, gdb, reportID)
		return st == "processed"
	})
	for _, id := range ids {
		waitUsageStatus(t, svc, id, client.UsageStatusDead)
	}
	deadEvents := func() int64 {
		return countRows(t, gdb, `SELECT count(*) FROM events WHERE type = 'usage.dead' AND customer_id = 'replayed-report'`)
	}
	if n := deadEvents(); n != int64(len(ids)) {
		t.Fatalf("%d usage.dead events after six concurrent deliveries, want %d", n, len(ids))
	}
	if n := refusedTotal(t, "timestamp_in_future", servers...); n != len(ids) {
		t.Fatalf("tally_usage_refused_total over the replicas: %d, want %d", n, len(ids))
	}

	// The clocks agree again; the operator requeues the first, which
	// reaches Stripe, then replays the report (on another replica).
	fake.SetClock(time.Now)
	all := false
	requeued, err := servers[1].admin(t).RequeueUsageEventsWithResponse(ctx, client.RequeueRequest{AllDead: &all, Identifiers: &[]string{ids[0]}})
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "requeue", requeued.StatusCode(), requeued.Body, http.StatusOK)
	waitUsageStatus(t, svc, ids[0], client.UsageStatusDelivered)
	if c := fake.Count(ids[0]); c != 1 {
		t.Fatalf("Stripe counted the requeued event %d times, want 1", c)
	}
	rep, err := servers[2].admin(t).ReplayStripeEventWithResponse(ctx, reportID)
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "replay", rep.StatusCode(), rep.Body, http.StatusOK)

	var st string
	if err := gdb.Raw(`SELECT status FROM usage_events WHERE identifier = ?`, ids[0]).Scan(&st).Error; err != nil || st != "delivered" {
		t.Errorf("%s, counted by Stripe, is %q after the report was replayed (%v), want delivered", ids[0], st, err)
	}
	if n := deadEvents(); n != int64(len(ids)) {
		t.Errorf("%d usage.dead events after the replay, want %d (a replayed report dead-lettered again an event Stripe counted)", n, len(ids))
	}
	if n := refusedTotal(t, "timestamp_in_future", servers...); n != len(ids) {
		t.Errorf("tally_usage_refused_total over the replicas after the replay: %d, want %d (the same refusals counted twice)", n, len(ids))
	}
	if c := fake.Count(ids[0]); c != 1 {
		t.Errorf("Stripe counted the requeued event %d times, want 1", c)
	}
	from := time.Now().Add(-time.Hour).UTC().Format(time.RFC3339)
	to := time.Now().Add(time.Hour).UTC().Format(time.RFC3339)
	if out, err := servers[0].tallyCmd(t, "reconcile", "--meter", "api_calls", "--from", from, "--to", to); err != nil ||
		!strings.Contains(out, "1 customers checked, 0 differ") {
		t.Errorf("reconcile after the refusal and the requeue: %v (%d bytes) %q", err, len(out), out)
	}
	mustVerifyClean(t, servers[0])
}

// A report that comes while tally is still recording the send it is about
// (Stripe answered, the delivered row not written yet): the event it names
// is pending then, and the report was processed without touching it; the
// send was then recorded delivered, and the event Stripe refused and named
// stayed delivered for good, billed by no one. It must end dead.
func TestAttackMeterErrorReportDuringTheSendsRecordIsNotLost(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	fake.SetClock(func() time.Time { return time.Now().Add(-10 * time.Minute) })
	arrived, proceed := make(chan struct{}), make(chan struct{})
	var once sync.Once
	fake.SetFault(func(r *http.Request) (int, string, bool) {
		if strings.HasSuffix(r.URL.Path, "/meter_event_stream") {
			first := false
			once.Do(func() { first = true })
			if first {
				close(arrived)
				<-proceed
			}
		}
		return 0, "", false
	})
	s := meterErrorsServer(t, fake, "in-flight-refusal", map[string]string{"TALLY_METER_TRANSPORT": "v2"})
	ctx := context.Background()
	svc := s.service(t)
	key := "in-flight-refusal-batch"
	res, err := svc.IngestUsageEventsWithResponse(ctx, &client.IngestUsageEventsParams{IdempotencyKey: &key},
		client.UsageBatch{Events: []client.UsageEventInput{usageEvent("in-flight-refusal", "in-flight-1", 1)}})
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "ingest", res.StatusCode(), res.Body, http.StatusAccepted)
	select {
	case <-arrived:
	case <-time.After(20 * time.Second):
		t.Fatal("the event was never streamed")
	}
	// tally's record of the send is slow (its row is locked a moment).
	gdb := openDB(t, s)
	tx := gdb.Begin()
	if err := tx.Exec(`SELECT 1 FROM usage_events WHERE identifier = 'in-flight-1' FOR UPDATE`).Error; err != nil {
		t.Fatal(err)
	}
	close(proceed)
	reportID, report := waitMeterErrorReport(t, fake)
	deliver(t, s, report)
	time.Sleep(300 * time.Millisecond)
	if err := tx.Rollback().Error; err != nil {
		t.Fatal(err)
	}
	if n := len(fake.MeterEvents()); n != 0 {
		t.Fatalf("Stripe counted %d events, want 0", n)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		var st string
		if err := gdb.Raw(`SELECT status FROM usage_events WHERE identifier = 'in-flight-1'`).Scan(&st).Error; err != nil {
			t.Fatal(err)
		}
		if st == "dead" {
			break
		}
		if time.Now().After(deadline) {
			rst, rerr := eventStatus(t, gdb, reportID)
			t.Fatalf("in-flight-1, refused by Stripe and named in report %s (%s %s), is still %s: lost", reportID, rst, rerr, st)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if n := countRows(t, gdb, `SELECT count(*) FROM events WHERE type = 'usage.dead' AND customer_id = 'in-flight-refusal'`); n != 1 {
		t.Errorf("%d usage.dead events, want 1", n)
	}
}

// A report Stripe answers naming events in every status tally holds: only
// the delivered one changes. Before Stripe's word (a 429, a hang, a 400)
// nothing changes; a 429 and a hang are retried until Stripe answers.
func TestAttackMeterErrorReportTouchesOnlyDeliveredAndWaitsForStripesWord(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	s := meterErrorsServer(t, fake, "every-status", map[string]string{"TALLY_METER_TRANSPORT": "v2"})
	ctx := context.Background()
	svc := s.service(t)
	gdb := openDB(t, s)
	ahead := time.Now().Add(4 * time.Minute)
	pending := usageEvent("every-status", "st-pending", 1)
	pending.Timestamp = &ahead
	cancelled := usageEvent("every-status", "st-cancelled", 1)
	cancelled.Timestamp = &ahead
	key := "every-status-batch"
	res, err := svc.IngestUsageEventsWithResponse(ctx, &client.IngestUsageEventsParams{IdempotencyKey: &key}, client.UsageBatch{Events: []client.UsageEventInput{
		usageEvent("every-status", "st-delivered", 1), pending, cancelled, usageEvent("nobody-linked", "st-waiting", 1),
	}})
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "ingest", res.StatusCode(), res.Body, http.StatusAccepted)
	waitUsageStatus(t, svc, "st-delivered", client.UsageStatusDelivered)
	waitUsageStatus(t, svc, "st-waiting", client.UsageStatusWaitingCustomer)
	c, err := svc.CancelUsageEventWithResponse(ctx, "st-cancelled")
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "cancel", c.StatusCode(), c.Body, http.StatusOK)
	snapshot := func() map[string]string {
		var rows []struct{ Identifier, Status string }
		if err := gdb.Raw(`SELECT identifier, status || coalesce(dead_code, '') AS status FROM usage_events`).Scan(&rows).Error; err != nil {
			t.Fatal(err)
		}
		m := map[string]string{}
		for _, r := range rows {
			m[r.Identifier] = r.Status
		}
		return m
	}
	before := snapshot()
	if before["st-pending"] != "pending" || before["st-cancelled"] != "cancelled" {
		t.Fatalf("set-up: %v", before)
	}

	const id = "evt_crafted_every_status"
	samples := []string{}
	for _, name := range []string{"st-delivered", "st-pending", "st-cancelled", "st-waiting", "st-unknown", "st-delivered"} {
		samples = append(samples, fmt.Sprintf(`{"error_message":"refused","request":{"identifier":%q}}`, name))
	}
	answer := fmt.Sprintf(`{"object":"v2.core.event","id":%q,"type":"v1.billing.meter.error_report_triggered","created":%q,"livemode":false,`+
		`"context":null,"reason":null,"related_object":{"id":"mtr_x","type":"billing.meter","url":"/v1/billing/meters/mtr_x"},`+
		`"data":{"developer_message_summary":"There are 6 invalid events","reason":{"error_count":6,"error_types":[{"code":"meter_event_customer_not_found","error_count":6,"sample_errors":[%s]}]},`+
		`"validation_start":%q,"validation_end":%q}}`, id, time.Now().UTC().Format(time.RFC3339Nano), strings.Join(samples, ","),
		time.Now().UTC().Add(-time.Minute).Format(time.RFC3339), time.Now().UTC().Format(time.RFC3339))
	var mode sync.Mutex
	stripeSays := "429"
	fake.SetFault(func(r *http.Request) (int, string, bool) {
		if r.URL.Path != "/v2/core/events/"+id {
			return 0, "", false
		}
		mode.Lock()
		say := stripeSays
		mode.Unlock()
		switch say {
		case "429":
			return http.StatusTooManyRequests, `{"error":{"type":"rate_limit","code":"rate_limit","message":"slow down"}}`, true
		case "hang":
			time.Sleep(3 * time.Second)
			return http.StatusServiceUnavailable, `{"error":{"type":"api_error","message":"late"}}`, true
		}
		return http.StatusOK, answer, true
	})
	thinBody := []byte(fmt.Sprintf(`{"object":"v2.core.event","id":%q,"type":"v1.billing.meter.error_report_triggered","created":%q,"livemode":false,"context":null,"reason":null,`+
		`"related_object":{"id":"mtr_x","type":"billing.meter","url":"/v1/billing/meters/mtr_x"}}`, id, time.Now().UTC().Format(time.RFC3339Nano)))
	deliver(t, s, thinBody)
	say := func(v string) { mode.Lock(); stripeSays = v; mode.Unlock() }
	time.Sleep(time.Second)
	if st, lastErr := eventStatus(t, gdb, id); st != "failed" {
		t.Fatalf("the report while Stripe answers 429: %s (%s), want failed", st, lastErr)
	}
	if got := snapshot(); !maps.Equal(got, before) {
		t.Fatalf("usage changed before Stripe's word: %v, was %v", got, before)
	}
	say("hang")
	time.Sleep(4 * time.Second)
	if st, lastErr := eventStatus(t, gdb, id); st != "failed" {
		t.Fatalf("the report while Stripe hangs: %s (%s), want failed", st, lastErr)
	}
	if got := snapshot(); !maps.Equal(got, before) {
		t.Fatalf("usage changed before Stripe's word: %v, was %v", got, before)
	}
	say("ok")
	waitFor(t, "the report processed once Stripe answers", func() bool {
		st, _ := eventStatus(t, gdb, id)
		return st == "processed"
	})
	want := maps.Clone(before)
	want["st-delivered"] = "deadstripe_refused"
	if got := snapshot(); !maps.Equal(got, want) {
		t.Errorf("after the report: %v, want %v", got, want)
	}
	if n := countRows(t, gdb, `SELECT count(*) FROM events WHERE type = 'usage.dead'`); n != 1 {
		t.Errorf("%d usage.dead events, want 1", n)
	}
	if m := metrics(t, s); !strings.Contains(m, `tally_usage_refused_total{code="meter_event_customer_not_found"} 6`) {
		t.Errorf("metrics lack the 6 refusals")
	}
	mustVerifyClean(t, s)
}

// Forged, stale, malformed and colliding thin events: each bad one gets a
// 400 problem and stores nothing; a copy of a stored id with another body
// is a duplicate that changes nothing and asks Stripe nothing.
func TestAttackThinEventsForgedStaleMalformedOrColliding(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	env := meteringEnv(t, fake.URL())
	env["TALLY_METER_TRANSPORT"] = "v2"
	s := startServer(t, env)
	gdb := openDB(t, s)
	thin := func(id, typ, created string) []byte {
		return []byte(fmt.Sprintf(`{"object":"v2.core.event","id":%q,"type":%q,"created":%s,"livemode":false,"context":null,"reason":null,`+
			`"related_object":{"id":"mtr_x","type":"billing.meter","url":"/v1/billing/meters/mtr_x"}}`, id, typ, created))
	}
	now := strconv.Quote(time.Now().UTC().Format(time.RFC3339Nano))
	const report = "v1.billing.meter.error_report_triggered"
	bad := []struct {
		name string
		body []byte
		sig  string
	}{
		{"wrong secret", thin("evt_f1", report, now), sign(thin("evt_f1", report, now), "whsec_other", time.Now())},
		{"stale signature", thin("evt_f2", report, now), sign(thin("evt_f2", report, now), testWebhookSecret, time.Now().Add(-10*time.Minute))},
		{"unsigned", thin("evt_f3", report, now), ""},
		{"created not RFC 3339", thin("evt_f4", report, `"2026-12-02 12:00:00"`), ""},
		{"created an object", thin("evt_f5", report, `{}`), ""},
		{"created empty", thin("evt_f6", report, `""`), ""},
		{"id too long", thin("evt_"+strings.Repeat("x", 300), report, now), ""},
		{"id not a string", []byte(`{"object":"v2.core.event","id":12,"type":"` + report + `"}`), ""},
		{"not an object", []byte(`["v2.core.event"]`), ""},
		{"id with NUL", []byte(`{"object":"v2.core.event","id":"evt_f7\u0000","type":"` + report + `"}`), ""},
		{"over the body limit", []byte(`{"object":"v2.core.event","id":"evt_f8","type":"` + report + `","pad":"` + strings.Repeat("x", 600<<10) + `"}`), ""},
	}
	for _, b := range bad {
		sig := b.sig
		if sig == "" && b.name != "unsigned" {
			sig = sign(b.body, testWebhookSecret, time.Now())
		}
		code, body := postWebhook(t, s, b.body, sig)
		if code < 400 || code >= 500 || !strings.Contains(string(body), `"detail"`) {
			t.Errorf("%s: %d %s, want a 4xx problem", b.name, code, body)
		}
	}
	if n := countRows(t, gdb, `SELECT count(*) FROM stripe_events`); n != 0 {
		t.Errorf("%d stripe events stored after only bad deliveries", n)
	}

	// A stored v1 event's id, and a stored thin event's id, arriving again
	// with other bodies: duplicates.
	v1 := stripeEvent("evt_shared_id", "customer.created", map[string]any{"id": "cus_x", "object": "customer"})
	deliver(t, s, v1)
	deliver(t, s, thin("evt_shared_id", report, now))
	ping := thin("evt_thin_first", "v2.core.event_destination.ping", now)
	deliver(t, s, ping)
	deliver(t, s, thin("evt_thin_first", report, now))
	for _, id := range []string{"evt_shared_id", "evt_thin_first"} {
		if st, lastErr := eventStatus(t, gdb, id); st != "ignored" {
			t.Errorf("%s: %s (%s), want ignored as first stored", id, st, lastErr)
		}
	}
	for _, r := range fake.Requests() {
		if strings.HasPrefix(r.Path, "/v2/core/events/") {
			t.Errorf("tally asked Stripe about %s for a duplicate delivery", r.Path)
		}
	}
}

// A meter error report Stripe answers for the other account mode (livemode
// true, tally's key a test key) is not tally's usage: livemode must match
// the key before money moves. It changes nothing and is parked for an
// operator.
func TestAttackMeterErrorReportOfTheOtherModeChangesNothing(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	s := meterErrorsServer(t, fake, "other-mode", map[string]string{"TALLY_METER_TRANSPORT": "v2"})
	ctx := context.Background()
	svc := s.service(t)
	gdb := openDB(t, s)
	key := "other-mode-batch"
	res, err := svc.IngestUsageEventsWithResponse(ctx, &client.IngestUsageEventsParams{IdempotencyKey: &key},
		client.UsageBatch{Events: []client.UsageEventInput{usageEvent("other-mode", "om-1", 1)}})
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "ingest", res.StatusCode(), res.Body, http.StatusAccepted)
	waitUsageStatus(t, svc, "om-1", client.UsageStatusDelivered)

	const id = "evt_live_report"
	created := time.Now().UTC().Format(time.RFC3339Nano)
	answer := fmt.Sprintf(`{"object":"v2.core.event","id":%q,"type":"v1.billing.meter.error_report_triggered","created":%q,"livemode":true,`+
		`"context":null,"reason":null,"related_object":{"id":"mtr_x","type":"billing.meter","url":"/v1/billing/meters/mtr_x"},`+
		`"data":{"developer_message_summary":"There is 1 invalid event","reason":{"error_count":1,"error_types":[{"code":"meter_event_customer_not_found","error_count":1,`+
		`"sample_errors":[{"error_message":"no such customer","request":{"identifier":"om-1"}}]}]},"validation_start":%q,"validation_end":%q}}`,
		id, created, created, created)
	fake.SetFault(func(r *http.Request) (int, string, bool) {
		if r.URL.Path == "/v2/core/events/"+id {
			return http.StatusOK, answer, true
		}
		return 0, "", false
	})
	deliver(t, s, []byte(fmt.Sprintf(`{"object":"v2.core.event","id":%q,"type":"v1.billing.meter.error_report_triggered","created":%q,"livemode":true,`+
		`"context":null,"reason":null,"related_object":{"id":"mtr_x","type":"billing.meter","url":"/v1/billing/meters/mtr_x"}}`, id, created)))
	if st, lastErr := eventStatus(t, gdb, id); st != "parked" || !strings.Contains(lastErr, "livemode") {
		t.Errorf("a live report for a test key: %s (%s), want parked naming livemode", st, lastErr)
	}
	var st string
	if err := gdb.Raw(`SELECT status FROM usage_events WHERE identifier = 'om-1'`).Scan(&st).Error; err != nil || st != "delivered" {
		t.Errorf("om-1 after a live report: %q (%v), want delivered", st, err)
	}
	if n := countRows(t, gdb, `SELECT count(*) FROM events WHERE type = 'usage.dead'`); n != 0 {
		t.Errorf("%d usage.dead events, want 0", n)
	}
}
