package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tallybilling/tally/internal/stripeapi/stripefake"
	"github.com/tallybilling/tally/pkg/client"
)

// streamRefused sends n requests to the fake's v2 meter event stream, each
// with one event stamped an hour ahead of Stripe's clock: Stripe takes
// each and then refuses it, one meter error report per request, about
// identifiers tally never held.
func streamRefused(t *testing.T, fake *stripefake.Fake, prefix string, n int) {
	t.Helper()
	post := func(path, token string, body []byte) []byte {
		req, err := http.NewRequest(http.MethodPost, fake.URL()+path, bytes.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set("Authorization", "Bearer "+token)
		req.Header.Set("Content-Type", "application/json")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		out, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("POST %s: %d %s", path, resp.StatusCode, out)
		}
		return out
	}
	var session struct {
		Token string `json:"authentication_token"`
	}
	if err := json.Unmarshal(post("/v2/billing/meter_event_session", "sk_test_tally", nil), &session); err != nil {
		t.Fatal(err)
	}
	ahead := time.Now().Add(time.Hour).UTC().Format(time.RFC3339)
	for i := range n {
		body := fmt.Sprintf(`{"events":[{"event_name":"api_calls","identifier":"%s-%d","timestamp":%q,`+
			`"payload":{"stripe_customer_id":"cus_noise","value":"1"}}]}`, prefix, i, ahead)
		post("/v2/billing/meter_event_stream", session.Token, []byte(body))
	}
}

// A meter's error reports outnumber one listing's bound (1000) within the
// catch-up's window, and the oldest was never delivered: a catch-up must
// still reach it, or the event it names stays delivered, unbilled by
// Stripe, however many catch-ups run, since each lists the same newest
// reports again.
func TestTheCatchUpReachesAReportOlderThanTheNewestThousand(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	fake.SetMeter("mtr_api_calls", "api_calls")
	fake.SetClock(func() time.Time { return time.Now().Add(-10 * time.Minute) })
	s := meterErrorsServer(t, fake, "many-reports", map[string]string{"TALLY_METER_TRANSPORT": "v2"})
	ctx := context.Background()
	svc := s.service(t)
	key := "many-reports-batch"
	res, err := svc.IngestUsageEventsWithResponse(ctx, &client.IngestUsageEventsParams{IdempotencyKey: &key},
		client.UsageBatch{Events: []client.UsageEventInput{usageEvent("many-reports", "oldest-refused", 1)}})
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "ingest", res.StatusCode(), res.Body, http.StatusAccepted)
	waitUsageStatus(t, svc, "oldest-refused", client.UsageStatusDelivered)
	waitFor(t, "Stripe's report of the refused event", func() bool {
		for _, ev := range fake.Sandbox().Events() {
			if ev.Type == "v1.billing.meter.error_report_triggered" {
				return true
			}
		}
		return false
	})
	streamRefused(t, fake, "noise", 1000)

	since := time.Now().Add(-time.Hour)
	stripeSyncToTheEnd(t, s, &since)
	stripeSyncToTheEnd(t, s, &since)
	// Each catch-up processes what it stores before it answers.
	got, err := svc.GetUsageEventWithResponse(ctx, "oldest-refused")
	if err != nil {
		t.Fatal(err)
	}
	if got.JSON200 == nil || got.JSON200.Status != client.UsageStatusDead || got.JSON200.DeadCode == nil ||
		*got.JSON200.DeadCode != client.UsageDeadCodeStripeRefused {
		t.Errorf("oldest-refused after two catch-ups: %s, want dead stripe_refused", got.Body)
	}
	mustVerifyClean(t, s)
}

// A catch-up processes the report it found under the lease it stored it
// with, as a delivery does: should Stripe be slow to answer for the report,
// the attempt ends with its lease rather than run on while the retry
// worker, seeing the lease out, claims and processes the same report too,
// which counted its refusals twice in tally_usage_refused_total.
func TestACatchUpsAttemptEndsWithItsLease(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	fake.SetMeter("mtr_api_calls", "api_calls")
	fake.SetClock(func() time.Time { return time.Now().Add(-10 * time.Minute) })
	s := meterErrorsServer(t, fake, "slow-report", map[string]string{"TALLY_METER_TRANSPORT": "v2", "TALLY_STRIPE_EVENT_LEASE": "1s"})
	ctx := context.Background()
	svc := s.service(t)
	key := "slow-report-batch"
	res, err := svc.IngestUsageEventsWithResponse(ctx, &client.IngestUsageEventsParams{IdempotencyKey: &key},
		client.UsageBatch{Events: []client.UsageEventInput{usageEvent("slow-report", "slow-1", 1), usageEvent("slow-report", "slow-2", 1)}})
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "ingest", res.StatusCode(), res.Body, http.StatusAccepted)
	waitUsageStatus(t, svc, "slow-1", client.UsageStatusDelivered)
	waitUsageStatus(t, svc, "slow-2", client.UsageStatusDelivered)
	waitFor(t, "Stripe's meter error report", func() bool {
		for _, ev := range fake.Sandbox().Events() {
			if ev.Type == "v1.billing.meter.error_report_triggered" {
				return true
			}
		}
		return false
	})
	// The first time tally asks for the report, Stripe answers after 2.5s.
	var asked atomic.Int32
	fake.SetFault(func(r *http.Request) (int, string, bool) {
		if r.Method == http.MethodGet && strings.HasPrefix(r.URL.Path, "/v2/core/events/") && asked.Add(1) == 1 {
			time.Sleep(2500 * time.Millisecond)
		}
		return 0, "", false
	})
	since := time.Now().Add(-time.Hour)
	stripeSync(t, s, &since)
	for _, id := range []string{"slow-1", "slow-2"} {
		waitUsageStatus(t, svc, id, client.UsageStatusDead)
	}
	time.Sleep(3 * time.Second) // whatever was still running has ended
	want := `tally_usage_refused_total{code="timestamp_in_future"} 2`
	if m := metrics(t, s); !strings.Contains(m, want) {
		for _, line := range strings.Split(m, "\n") {
			if strings.HasPrefix(line, `tally_usage_refused_total{code="timestamp_in_future"}`) {
				t.Errorf("after one report of 2 refusals: %s, want %s", line, want)
			}
		}
	}
	mustVerifyClean(t, s)
}

// Stripe refuses, for good, to list a meter's v2 events (a restricted key
// without the v2 events permission, which a catch-up did not need before
// the reports were listed): the rest of the sync still works. A pending
// payment Stripe settled is still looked up and credited, and the v1
// catch-up still records how far it listed, instead of every sync failing
// at the reports and the v1 window growing to Stripe's 30 days.
func TestAMeterErrorListingStripeRefusesLeavesTheRestOfTheSyncWorking(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	fake.SetFault(func(r *http.Request) (int, string, bool) {
		if r.Method == http.MethodGet && r.URL.Path == "/v2/core/events" {
			return http.StatusForbidden, `{"error":{"type":"invalid_request_error","message":"The provided key 'rk_test_***' does not have the required permissions for this endpoint."}}`, true
		}
		return 0, "", false
	})
	s := startServer(t, syncEnv(t, fake.URL()))
	gdb := openDB(t, s)
	pay := checkout(t, s, "restricted", "starter", 1)
	paidAtStripe(t, fake, s, pay)

	// Only the pending payments: the window holds no event.
	r, err := s.admin(t).SyncStripeWithResponse(context.Background(), client.StripeSyncRequest{Since: future()})
	if err != nil {
		t.Fatal(err)
	}
	if p := getPayment(t, s, pay); p.Status != client.PaymentStatusSucceeded {
		t.Errorf("the payment Stripe settled, after a sync (%d %s): %s, want succeeded", r.StatusCode(), r.Body, p.Status)
	}
	// The default window: the v1 events of a second payment, made at
	// Stripe and never delivered, are listed and stored, and how far is
	// recorded.
	second := checkout(t, s, "restricted", "starter", 1)
	if _, err := fake.Sandbox().Pay(context.Background(), *getPayment(t, s, second).CheckoutSessionId, "4242424242424242", ""); err != nil {
		t.Fatal(err)
	}
	if r, err = s.admin(t).SyncStripeWithResponse(context.Background(), client.StripeSyncRequest{}); err != nil {
		t.Fatal(err)
	}
	if n := countRows(t, gdb, `SELECT count(*) FROM background_runs WHERE name = 'stripe catch-up listed'`); n != 1 {
		t.Errorf("after a default sync (%d %s), the v1 catch-up recorded no progress", r.StatusCode(), r.Body)
	}
	if p := getPayment(t, s, second); p.Status != client.PaymentStatusSucceeded {
		t.Errorf("the payment whose events the default sync listed: %s, want succeeded", p.Status)
	}
	if r.StatusCode() == http.StatusOK {
		t.Errorf("a sync that could not list the meter error reports answered 200: %s", r.Body)
	}
}

// An operator replays a meter error report tally processed already (found
// by the catch-up): no event changes again, and the refusals Stripe
// reported once are not counted again in tally_usage_refused_total (whose
// alert would fire a second time for them).
func TestReplayingAProcessedReportCountsItsRefusalsOnce(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	fake.SetMeter("mtr_api_calls", "api_calls")
	fake.SetClock(func() time.Time { return time.Now().Add(-10 * time.Minute) })
	s := meterErrorsServer(t, fake, "replayed-report", map[string]string{"TALLY_METER_TRANSPORT": "v2"})
	ctx := context.Background()
	svc := s.service(t)
	key := "replayed-report-batch"
	res, err := svc.IngestUsageEventsWithResponse(ctx, &client.IngestUsageEventsParams{IdempotencyKey: &key},
		client.UsageBatch{Events: []client.UsageEventInput{usageEvent("replayed-report", "replayed-1", 1)}})
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "ingest", res.StatusCode(), res.Body, http.StatusAccepted)
	waitUsageStatus(t, svc, "replayed-1", client.UsageStatusDelivered)
	var reportID string
	waitFor(t, "Stripe's meter error report", func() bool {
		for _, ev := range fake.Sandbox().Events() {
			if ev.Type == "v1.billing.meter.error_report_triggered" {
				reportID = ev.ID
			}
		}
		return reportID != ""
	})
	since := time.Now().Add(-time.Hour)
	stripeSync(t, s, &since)
	waitUsageStatus(t, svc, "replayed-1", client.UsageStatusDead)
	want := `tally_usage_refused_total{code="timestamp_in_future"} 1`
	if m := metrics(t, s); !strings.Contains(m, want) {
		t.Fatalf("metrics lack %q", want)
	}
	r, err := s.admin(t).ReplayStripeEventWithResponse(ctx, reportID)
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "replay", r.StatusCode(), r.Body, http.StatusOK)
	if m := metrics(t, s); !strings.Contains(m, want) {
		t.Errorf("after the replay, metrics lack %q", want)
	}
	if n := countRows(t, openDB(t, s), `SELECT count(*) FROM usage_events WHERE status = 'dead'`); n != 1 {
		t.Errorf("%d dead events after the replay, want 1", n)
	}
}
