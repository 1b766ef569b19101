package main

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tallybilling/tally/internal/metering"
	"github.com/tallybilling/tally/internal/stripeapi/stripefake"
	"github.com/tallybilling/tally/pkg/client"
)

// meterIdentifier is the identifier of a meter event request to the fake.
func meterIdentifier(r *http.Request) string {
	if r.URL.Path != "/v1/billing/meter_events" {
		return ""
	}
	body, _ := io.ReadAll(r.Body)
	form, _ := url.ParseQuery(string(body))
	return form.Get("identifier")
}

// A Stripe outage far longer than the old ten attempts (about 17 minutes of
// backoff), shown against the real binary with the backoff capped at 20ms:
// Stripe answers 500, then keeps events while their answers are lost, then
// 500 again. Every event is retried by time, many times over, none is
// dead-lettered but the one whose timestamp leaves Stripe's window (too_old);
// once Stripe recovers the backlog drains and each event is at Stripe
// exactly once. Then requeue: a refused event goes back without force, one
// whose 5xx is over 24 hours old needs force, a too_old one never goes.
func TestUsageSurvivesALongStripeOutageEndToEnd(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	env := meteringEnv(t, fake.URL())
	env["TALLY_METER_BACKOFF_MAX"] = "20ms"
	env["TALLY_METER_RATE_LIMIT"] = "500"
	env["TALLY_METER_MAX_ATTEMPTS"] = "3" // no longer read: named at start and ignored
	s := startServer(t, env)
	if !strings.Contains(s.logs.String(), "TALLY_METER_MAX_ATTEMPTS is no longer used") {
		t.Errorf("start logs do not warn about TALLY_METER_MAX_ATTEMPTS:\n%s", s.logs)
	}
	ctx := context.Background()
	svc, admin := s.service(t), s.admin(t)
	stripeID := "cus_olive"
	linked, err := svc.UpsertCustomerWithResponse(ctx, "olive", client.CustomerUpsert{StripeCustomerId: &stripeID})
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "link olive", linked.StatusCode(), linked.Body, http.StatusCreated)

	// The outage's phases: Stripe down (500), keeping the outage events
	// while losing their answers (dropping), down again, recovered. The
	// meter of "refused" is missing all along, and that of "flaky-refused"
	// once Stripe is back, until requeue time (fixed).
	const (
		down = iota
		dropping
		recovered
		fixed
	)
	var phase atomic.Int32
	fake.SetFault(func(r *http.Request) (int, string, bool) {
		id, p := meterIdentifier(r), phase.Load()
		noMeter := `{"error":{"type":"invalid_request_error","message":"No active meter was found for event_name api_calls."}}`
		switch {
		case p == fixed:
			return 0, "", false
		case id == "refused" || (id == "flaky-refused" && p == recovered):
			return http.StatusBadRequest, noMeter, true
		case p == down || (p == dropping && !strings.HasPrefix(id, "outage-")):
			return http.StatusInternalServerError, `{"error":{"type":"api_error","message":"Stripe is down."}}`, true
		}
		return 0, "", false
	})

	var ids []string
	var evs []client.UsageEventInput
	hourAgo := time.Now().Add(-time.Hour)
	for i := range 20 {
		id := fmt.Sprintf("outage-%02d", i)
		ids = append(ids, id)
		ev := usageEvent("olive", id, float64(i+1))
		ev.Timestamp = &hourAgo
		evs = append(evs, ev)
	}
	// edge leaves the window Stripe accepts fifteen seconds from now: it is
	// tried (and fails, Stripe being down) before it leaves. With three
	// seconds a loaded machine took longer than that to store it, and edge
	// went dead untried, without the last error the test checks.
	edge := time.Now().Add(-metering.DeliveryWindow + 15*time.Second)
	evs = append(evs, client.UsageEventInput{CustomerId: "olive", Meter: "api_calls", Value: 99, Identifier: "edge", Timestamp: &edge},
		usageEvent("olive", "refused", 1), usageEvent("olive", "flaky-refused", 2))
	res, err := svc.IngestUsageEventsWithResponse(ctx, nil, client.UsageBatch{Events: evs})
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "ingest", res.StatusCode(), res.Body, http.StatusAccepted)
	if res.JSON202.Accepted != len(evs) {
		t.Fatalf("intake %s, want all %d accepted", res.Body, len(evs))
	}

	gdb := openDB(t, s)
	attempts := func(where string) (minAttempts int64) {
		t.Helper()
		if err := gdb.Raw(`SELECT COALESCE(min(attempts), 0) FROM usage_events WHERE ` + where).Scan(&minAttempts).Error; err != nil {
			t.Fatal(err)
		}
		return minAttempts
	}
	// Many more attempts than the old limit of ten, and none dead but edge
	// and the event Stripe refuses for good.
	// Thirty rounds of backoff: about half a minute alone, more with the
	// suite running beside it.
	waitForWithin(t, "every event tried over 30 times", 3*time.Minute, func() bool { return attempts(`identifier LIKE 'outage-%'`) > 30 })
	if n := countRows(t, gdb, `SELECT count(*) FROM usage_events WHERE status = 'dead' AND identifier NOT IN ('edge', 'refused')`); n != 0 {
		t.Fatalf("%d events dead-lettered during the outage, want none", n)
	}
	dead := waitUsageStatus(t, svc, "edge", client.UsageStatusDead)
	if dead.DeadCode == nil || *dead.DeadCode != client.UsageDeadCodeTooOld || dead.LastError == nil || !strings.Contains(*dead.LastError, "Stripe is down") {
		t.Errorf("edge %+v, want dead too_old keeping the last error", dead)
	}
	refused := waitUsageStatus(t, svc, "refused", client.UsageStatusDead)
	if refused.DeadCode == nil || *refused.DeadCode != client.UsageDeadCodeStripeRefused || refused.MaybeSentAt != nil {
		t.Errorf("refused %+v, want dead stripe_refused, never maybe sent", refused)
	}

	// Stripe takes the events but the answers are lost, then fails again.
	phase.Store(dropping)
	fake.DropAnswers(func(r *http.Request) bool { return strings.HasPrefix(meterIdentifier(r), "outage-") })
	waitFor(t, "Stripe to keep the events while their answers are lost", func() bool {
		for _, id := range ids {
			if fake.Count(id) == 0 {
				return false
			}
		}
		return true
	})
	phase.Store(down)
	fake.DropAnswers(nil)
	time.Sleep(300 * time.Millisecond)
	if n := countRows(t, gdb, `SELECT count(*) FROM usage_events WHERE identifier LIKE 'outage-%' AND status = 'delivered'`); n != 0 {
		t.Fatalf("%d events recorded delivered although no answer arrived", n)
	}
	flaky := waitUsageStatus(t, svc, "flaky-refused", client.UsageStatusPending)
	if flaky.MaybeSentAt == nil {
		t.Errorf("flaky-refused after 500s: %+v, want maybe_sent_at set", flaky)
	}

	// Stripe recovers: the backlog drains, Stripe's "already exists"
	// answers count as delivered, and flaky-refused meets a refusal.
	phase.Store(recovered)
	for _, id := range ids {
		waitUsageStatus(t, svc, id, client.UsageStatusDelivered)
	}
	waitUsageStatus(t, svc, "flaky-refused", client.UsageStatusDead)
	for _, id := range ids {
		if c := fake.Count(id); c != 1 {
			t.Errorf("%s accepted %d times by Stripe, want 1", id, c)
		}
	}
	if fake.Count("edge") != 0 || len(fake.MeterEvents()) != len(ids) {
		t.Errorf("Stripe holds %d meter events (edge %d), want the %d outage events only", len(fake.MeterEvents()), fake.Count("edge"), len(ids))
	}

	// Requeue. flaky-refused's 500s were "25 hours ago".
	if err := gdb.Exec(`UPDATE usage_events SET maybe_sent_at = maybe_sent_at - interval '25 hours' WHERE identifier = 'flaky-refused'`).Error; err != nil {
		t.Fatal(err)
	}
	phase.Store(fixed)
	requeue := func(force bool, ids ...string) client.RequeueResult {
		t.Helper()
		r, err := admin.RequeueUsageEventsWithResponse(ctx, client.RequeueRequest{Identifiers: &ids, Force: &force})
		if err != nil {
			t.Fatal(err)
		}
		mustStatus(t, "requeue", r.StatusCode(), r.Body, http.StatusOK)
		return *r.JSON200
	}
	got := requeue(false, "refused", "flaky-refused", "edge")
	if got.Requeued != 1 || got.Skipped != 2 || got.Results[0].Status != client.RequeueItemStatus("requeued") ||
		got.Results[1].Code == nil || *got.Results[1].Code != client.RequeueSkipCodeForceRequired || got.Results[1].Detail == nil || !strings.Contains(*got.Results[1].Detail, "force") ||
		got.Results[2].Code == nil || *got.Results[2].Code != client.RequeueSkipCodeTooOld {
		t.Fatalf("requeue without force: %+v, want refused requeued, flaky-refused force_required, edge too_old", got)
	}
	got = requeue(true, "flaky-refused", "edge")
	if got.Requeued != 1 || got.Results[0].Status != client.RequeueItemStatus("requeued") || got.Results[1].Code == nil || *got.Results[1].Code != client.RequeueSkipCodeTooOld {
		t.Fatalf("requeue with force: %+v, want flaky-refused requeued and edge still too_old", got)
	}
	waitUsageStatus(t, svc, "refused", client.UsageStatusDelivered)
	waitUsageStatus(t, svc, "flaky-refused", client.UsageStatusDelivered)
	if fake.Count("refused") != 1 || fake.Count("flaky-refused") != 1 || fake.Count("edge") != 0 {
		t.Errorf("Stripe counts refused %d, flaky-refused %d, edge %d; want 1, 1, 0", fake.Count("refused"), fake.Count("flaky-refused"), fake.Count("edge"))
	}
	mustVerifyClean(t, s)
}
