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
	stripeID := "cus_" + strings.ReplaceAll(customer, "-", "")
	linked, err := svc.UpsertCustomerWithResponse(ctx, customer, client.CustomerUpsert{StripeCustomerId: &stripeID})
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "link customer", linked.StatusCode(), linked.Body, http.StatusCreated)
	var batch client.UsageBatch
	var ids []string
	for i := range count {
		id := fmt.Sprintf("%s-%d", customer, i)
		ids = append(ids, id)
		batch.Events = append(batch.Events, usageEvent(customer, id, 1))
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
	var report []byte
	var reportID string
	waitFor(t, "Stripe's meter error report", func() bool {
		for _, ev := range fake.Sandbox().Events() {
			if ev.Type == "v1.billing.meter.error_report_triggered" {
				report, reportID = ev.Payload, ev.ID
			}
		}
		return report != nil
	})
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
	env := meteringEnv(t, fake.URL())
	env["TALLY_METER_TRANSPORT"] = "v2"
	env["TALLY_STRIPE_EVENT_RETRY_INTERVAL"] = "100ms"
	s := startServer(t, env)
	ctx := context.Background()
	svc := s.service(t)
	stripeID := "cus_InFlightRefusal"
	linked, err := svc.UpsertCustomerWithResponse(ctx, "in-flight-refusal", client.CustomerUpsert{StripeCustomerId: &stripeID})
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "link customer", linked.StatusCode(), linked.Body, http.StatusCreated)
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
	var report []byte
	var reportID string
	waitFor(t, "Stripe's meter error report", func() bool {
		for _, ev := range fake.Sandbox().Events() {
			if ev.Type == "v1.billing.meter.error_report_triggered" {
				report, reportID = ev.Payload, ev.ID
			}
		}
		return report != nil
	})
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
