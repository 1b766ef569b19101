package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/tallybilling/tally/internal/stripeapi/stripefake"
	"github.com/tallybilling/tally/internal/stripeapi/stripemock"
	"github.com/tallybilling/tally/pkg/client"
)

// Intake through pkg/client, delivery to stripe-mock through the v1 API,
// and every way a batch or an event can be refused.
func TestUsageEndToEndAgainstStripeMock(t *testing.T) {
	t.Parallel()
	s := startServer(t, meteringEnv(t, stripemock.Start(t)))
	ctx := context.Background()
	svc := s.service(t)

	stripeID := "cus_UsageE2E"
	linked, err := svc.UpsertCustomerWithResponse(ctx, "meter-user", client.CustomerUpsert{StripeCustomerId: &stripeID})
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "link customer", linked.StatusCode(), linked.Body, http.StatusCreated)

	old := time.Now().Add(-36 * 24 * time.Hour)
	ahead := time.Now().Add(10 * time.Minute)
	batch := client.UsageBatch{Events: []client.UsageEventInput{
		usageEvent("meter-user", "e2e-1", 5),
		usageEvent("meter-user", "e2e-2", 1.5),
		usageEvent("meter-user", "e2e-3", -1),
		{CustomerId: "meter-user", Meter: "api_calls", Value: 1, Identifier: "e2e-4", Timestamp: &old},
		{CustomerId: "meter-user", Meter: "api_calls", Value: 1, Identifier: "e2e-5", Timestamp: &ahead},
		usageEvent("meter-user", "e2e-1", 5),
		usageEvent("waiting-user", "e2e-6", 2),
	}}
	key := "usage-batch-1"
	res, err := svc.IngestUsageEventsWithResponse(ctx, &client.IngestUsageEventsParams{IdempotencyKey: &key}, batch)
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "ingest", res.StatusCode(), res.Body, http.StatusAccepted)
	got := res.JSON202
	if got.Accepted != 2 || got.Rejected != 4 || got.Duplicates != 1 {
		t.Fatalf("intake counts %s, want 2 accepted, 4 rejected, 1 duplicate", res.Body)
	}
	wantStatus := []client.UsageEventResultStatus{"accepted", "rejected", "rejected", "rejected", "rejected", "duplicate", "accepted"}
	for i, r := range got.Results {
		if r.Status != wantStatus[i] || r.Identifier != batch.Events[i].Identifier {
			t.Errorf("result %d = %s %s, want %s %s", i, r.Identifier, r.Status, batch.Events[i].Identifier, wantStatus[i])
		}
		if r.Status == "rejected" && (r.Code == nil || *r.Code != client.ErrorCodeInvalidRequest || r.Detail == nil || *r.Detail == "") {
			t.Errorf("rejected result %d without invalid_request code and detail: %+v", i, r)
		}
	}

	// The same key and body: the first answer, replayed. Another body: 422.
	replay, err := svc.IngestUsageEventsWithResponse(ctx, &client.IngestUsageEventsParams{IdempotencyKey: &key}, batch)
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "replay", replay.StatusCode(), replay.Body, http.StatusAccepted)
	if replay.HTTPResponse.Header.Get("Idempotent-Replayed") != "true" || replay.JSON202.Accepted != 2 {
		t.Errorf("replay: header %q body %s, want the first answer replayed", replay.HTTPResponse.Header.Get("Idempotent-Replayed"), replay.Body)
	}
	reused, err := svc.IngestUsageEventsWithResponse(ctx, &client.IngestUsageEventsParams{IdempotencyKey: &key},
		client.UsageBatch{Events: []client.UsageEventInput{usageEvent("meter-user", "e2e-other", 1)}})
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "key reused with another body", reused.StatusCode(), reused.Body, http.StatusUnprocessableEntity)

	// A batch over 1000 is refused whole, before anything is stored.
	big := client.UsageBatch{}
	for i := range 1001 {
		big.Events = append(big.Events, usageEvent("big-user", fmt.Sprintf("big-%04d", i), 1))
	}
	tooBig, err := svc.IngestUsageEventsWithResponse(ctx, nil, big)
	if err != nil {
		t.Fatal(err)
	}
	if tooBig.StatusCode() != http.StatusBadRequest && tooBig.StatusCode() != http.StatusUnprocessableEntity {
		t.Fatalf("batch of 1001: status %d, want 400 or 422; body %s", tooBig.StatusCode(), tooBig.Body)
	}
	for _, id := range []string{"big-0000", "e2e-2", "e2e-4", "e2e-other"} {
		missing, err := svc.GetUsageEventWithResponse(ctx, id)
		if err != nil {
			t.Fatal(err)
		}
		mustStatus(t, "refused event "+id, missing.StatusCode(), missing.Body, http.StatusNotFound)
	}

	// Delivered to stripe-mock; the unlinked customer's event waits.
	delivered := waitUsageStatus(t, svc, "e2e-1", client.UsageStatusDelivered)
	if delivered.Attempts != 1 || delivered.DeliveredAt == nil || delivered.Value != 5 {
		t.Errorf("delivered event %+v", delivered)
	}
	waitUsageStatus(t, svc, "e2e-6", client.UsageStatusWaitingCustomer)
	waitingID := "cus_WaitingE2E"
	linkLater, err := svc.UpsertCustomerWithResponse(ctx, "waiting-user", client.CustomerUpsert{StripeCustomerId: &waitingID})
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "link the waiting customer", linkLater.StatusCode(), linkLater.Body, http.StatusOK)
	waitUsageStatus(t, svc, "e2e-6", client.UsageStatusDelivered)

	totals, err := svc.GetCustomerUsageWithResponse(ctx, "meter-user", &client.GetCustomerUsageParams{})
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "totals", totals.StatusCode(), totals.Body, http.StatusOK)
	if len(totals.JSON200.Meters) != 1 || totals.JSON200.Meters[0].Total != 5 || totals.JSON200.Meters[0].Events != 1 {
		t.Errorf("totals %s, want api_calls 5 over 1 event", totals.Body)
	}
	unknown, err := svc.GetCustomerUsageWithResponse(ctx, "nobody", &client.GetCustomerUsageParams{})
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "totals of an unknown customer", unknown.StatusCode(), unknown.Body, http.StatusNotFound)

	own, err := s.client(t, userToken(t, "meter-user", time.Now().Add(time.Hour))).GetCustomerUsageWithResponse(ctx, "meter-user", &client.GetCustomerUsageParams{})
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "own totals with an end-user token", own.StatusCode(), own.Body, http.StatusOK)
	other, err := s.client(t, userToken(t, "meter-user", time.Now().Add(time.Hour))).GetCustomerUsageWithResponse(ctx, "waiting-user", &client.GetCustomerUsageParams{})
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "another customer's totals with an end-user token", other.StatusCode(), other.Body, http.StatusForbidden)

	body := metricsText(t, s)
	for _, want := range []string{`tally_usage_deliveries_total{result="delivered"} 2`, "tally_usage_events_pending", "tally_usage_events_dead"} {
		if !strings.Contains(body, want) {
			t.Errorf("/metrics lacks %s", want)
		}
	}

	admin := s.admin(t)
	dead := client.UsageStatusDead
	list, err := admin.ListUsageEventsWithResponse(ctx, &client.ListUsageEventsParams{Status: &dead})
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "list dead", list.StatusCode(), list.Body, http.StatusOK)
	if len(list.JSON200.Data) != 0 {
		t.Errorf("dead letters %s, want none", list.Body)
	}
	all := true
	both, err := admin.RequeueUsageEventsWithResponse(ctx, client.RequeueRequest{AllDead: &all, Identifiers: &[]string{"e2e-1"}})
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "requeue with both", both.StatusCode(), both.Body, http.StatusBadRequest)
	requeued, err := admin.RequeueUsageEventsWithResponse(ctx, client.RequeueRequest{AllDead: &all})
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "requeue all dead", requeued.StatusCode(), requeued.Body, http.StatusOK)
	if requeued.JSON200.Requeued != 0 {
		t.Errorf("requeued %d, want 0", requeued.JSON200.Requeued)
	}
	forbidden, err := svc.ListUsageEventsWithResponse(ctx, &client.ListUsageEventsParams{})
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "dead letters with a service key", forbidden.StatusCode(), forbidden.Body, http.StatusForbidden)
}

// `tally reconcile` and POST /v1/admin/reconciliations against a fake Stripe
// whose summary drifts for one customer.
func TestReconcileEndToEnd(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	fake.SetMeter("mtr_api_calls", "api_calls")
	s := startServer(t, meteringEnv(t, fake.URL()))
	ctx := context.Background()
	svc := s.service(t)
	for _, c := range []string{"recA", "recB"} {
		id := "cus_" + c
		res, err := svc.UpsertCustomerWithResponse(ctx, c, client.CustomerUpsert{StripeCustomerId: &id})
		if err != nil {
			t.Fatal(err)
		}
		mustStatus(t, "link "+c, res.StatusCode(), res.Body, http.StatusCreated)
	}
	// Stripe summarises whole minutes and the window ends at the start of
	// the current one, so the usage happened a few minutes ago.
	at := time.Now().Add(-3 * time.Minute)
	evs := []client.UsageEventInput{usageEvent("recA", "rec-1", 3), usageEvent("recA", "rec-2", 4), usageEvent("recB", "rec-3", 10)}
	for i := range evs {
		evs[i].Timestamp = &at
	}
	res, err := svc.IngestUsageEventsWithResponse(ctx, nil, client.UsageBatch{Events: evs})
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "ingest", res.StatusCode(), res.Body, http.StatusAccepted)
	for _, id := range []string{"rec-1", "rec-2", "rec-3"} {
		waitUsageStatus(t, svc, id, client.UsageStatusDelivered)
	}
	from := time.Now().Add(-time.Hour).UTC().Format(time.RFC3339)
	to := time.Now().Add(time.Hour).UTC().Format(time.RFC3339)

	out, err := s.tallyCmd(t, "reconcile", "--meter", "api_calls", "--from", from, "--to", to)
	if err != nil {
		t.Fatalf("reconcile without drift: %v\n%s", err, out)
	}
	if !strings.Contains(out, "2 customers checked, 0 differ") {
		t.Errorf("reconcile output %q", out)
	}

	fake.SetSummaryOverride("cus_recB", 12)
	out, err = s.tallyCmd(t, "reconcile", "--meter", "api_calls", "--from", from, "--to", to, "--json")
	if exitCode(err) != 2 {
		t.Fatalf("reconcile with drift: exit %d (%v), want 2\n%s", exitCode(err), err, out)
	}
	var report struct {
		Checked    int `json:"checked"`
		Mismatches []struct {
			CustomerID  string `json:"customer_id"`
			LocalTotal  int64  `json:"local_total"`
			StripeTotal int64  `json:"stripe_total"`
			Difference  int64  `json:"difference"`
		} `json:"mismatches"`
	}
	if err := json.Unmarshal([]byte(out[:strings.LastIndex(out, "}")+1]), &report); err != nil {
		t.Fatalf("reconcile --json output: %v\n%s", err, out)
	}
	if report.Checked != 2 || len(report.Mismatches) != 1 || report.Mismatches[0].CustomerID != "recB" ||
		report.Mismatches[0].LocalTotal != 10 || report.Mismatches[0].StripeTotal != 12 || report.Mismatches[0].Difference != 2 {
		t.Errorf("report %+v, want recB alone: local 10, Stripe 12, difference 2", report)
	}

	fromT, _ := time.Parse(time.RFC3339, from)
	toT, _ := time.Parse(time.RFC3339, to)
	api, err := s.admin(t).CreateReconciliationWithResponse(ctx, client.ReconciliationRequest{Meter: "api_calls", From: &fromT, To: &toT})
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "reconciliation over HTTP", api.StatusCode(), api.Body, http.StatusOK)
	if len(api.JSON200.Mismatches) != 1 || api.JSON200.Mismatches[0].CustomerId != "recB" || api.JSON200.Mismatches[0].Difference != 2 {
		t.Errorf("reconciliation %s, want recB with difference 2", api.Body)
	}
	if api.JSON200.To.After(time.Now()) {
		t.Errorf("to %s is in the future; it should be clamped to now", api.JSON200.To)
	}
}

// Stripe dedupes identifiers across the account: bob's u-1 must not be
// swallowed as a duplicate of alice's u-1. It is answered conflict, nothing
// of it is stored, alice's event stands and reaches Stripe once; only the
// same event again is a duplicate, within one batch too.
func TestUsageIdentifierConflictEndToEnd(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	s := startServer(t, meteringEnv(t, fake.URL()))
	ctx := context.Background()
	svc := s.service(t)
	for _, c := range []string{"alice", "bob"} {
		id := "cus_" + c
		res, err := svc.UpsertCustomerWithResponse(ctx, c, client.CustomerUpsert{StripeCustomerId: &id})
		if err != nil {
			t.Fatal(err)
		}
		mustStatus(t, "link "+c, res.StatusCode(), res.Body, http.StatusCreated)
	}
	post := func(evs ...client.UsageEventInput) client.UsageIntakeResult {
		t.Helper()
		res, err := svc.IngestUsageEventsWithResponse(ctx, nil, client.UsageBatch{Events: evs})
		if err != nil {
			t.Fatal(err)
		}
		mustStatus(t, "ingest", res.StatusCode(), res.Body, http.StatusAccepted)
		return *res.JSON202
	}
	if got := post(usageEvent("alice", "u-1", 5)); got.Accepted != 1 {
		t.Fatalf("alice's u-1: %+v, want accepted", got)
	}
	got := post(usageEvent("bob", "u-1", 500))
	if got.Conflicts != 1 || got.Accepted != 0 || got.Duplicates != 0 || got.Results[0].Status != client.UsageEventResultStatusConflict ||
		got.Results[0].Code == nil || *got.Results[0].Code != client.ErrorCodeIdentifierConflict {
		t.Fatalf("bob's u-1: %+v, want one conflict with code identifier_conflict", got)
	}
	if got := post(usageEvent("alice", "u-1", 5)); got.Duplicates != 1 || got.Conflicts != 0 {
		t.Fatalf("alice's u-1 again: %+v, want a duplicate", got)
	}
	got = post(usageEvent("bob", "u-2", 7), usageEvent("alice", "u-2", 7), usageEvent("bob", "u-2", 7))
	if got.Accepted != 1 || got.Conflicts != 1 || got.Duplicates != 1 ||
		got.Results[1].Status != client.UsageEventResultStatusConflict || got.Results[2].Status != client.UsageEventResultStatusDuplicate {
		t.Fatalf("one batch with u-2 three times: %+v, want accepted, conflict, duplicate", got)
	}

	u1 := waitUsageStatus(t, svc, "u-1", client.UsageStatusDelivered)
	if u1.CustomerId != "alice" || u1.Value != 5 {
		t.Errorf("u-1 is %+v, want alice's 5", u1)
	}
	waitUsageStatus(t, svc, "u-2", client.UsageStatusDelivered)
	for _, m := range fake.MeterEvents() {
		if m.Identifier == "u-1" && (m.Payload["stripe_customer_id"] != "cus_alice" || m.Payload["value"] != "5") {
			t.Errorf("Stripe got u-1 as %v, want alice's 5", m.Payload)
		}
	}
	if fake.Count("u-1") != 1 || fake.Count("u-2") != 1 || len(fake.MeterEvents()) != 2 {
		t.Errorf("Stripe holds %d meter events (u-1 %d, u-2 %d), want each once", len(fake.MeterEvents()), fake.Count("u-1"), fake.Count("u-2"))
	}
	bobs, err := svc.GetCustomerUsageWithResponse(ctx, "bob", &client.GetCustomerUsageParams{})
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "bob's totals", bobs.StatusCode(), bobs.Body, http.StatusOK)
	if len(bobs.JSON200.Meters) != 1 || bobs.JSON200.Meters[0].Total != 7 {
		t.Errorf("bob's totals %s, want only u-2's 7 (his conflicting u-1 was not stored)", bobs.Body)
	}
	mustVerifyClean(t, s)
}

// The zero time 0001-01-01T00:00:00Z is what an unset time looks like when
// a client serialises it, so it is refused wherever a time is given, never
// silently read as "absent": on a usage event it is rejected, as from or to
// of usage totals and of a reconciliation it is a 422 naming the field.
func TestZeroTimestampsAreRefused(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	fake.SetMeter("mtr_api_calls", "api_calls")
	s := startServer(t, meteringEnv(t, fake.URL()))
	ctx := context.Background()
	svc := s.service(t)
	zero := time.Time{}
	res, err := svc.IngestUsageEventsWithResponse(ctx, nil, client.UsageBatch{Events: []client.UsageEventInput{
		{CustomerId: "zed", Meter: "api_calls", Value: 1, Identifier: "zero-1", Timestamp: &zero},
		usageEvent("zed", "zero-2", 1),
	}})
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "ingest", res.StatusCode(), res.Body, http.StatusAccepted)
	r := res.JSON202.Results[0]
	if r.Status != client.UsageEventResultStatusRejected || r.Detail == nil || !strings.Contains(*r.Detail, "zero time") {
		t.Errorf("event with the zero timestamp: %+v, want rejected naming the zero time", r)
	}
	if res.JSON202.Results[1].Status != client.UsageEventResultStatusAccepted {
		t.Errorf("the event without a timestamp: %+v, want accepted (now)", res.JSON202.Results[1])
	}

	for _, param := range []string{"from", "to"} {
		req, _ := http.NewRequest(http.MethodGet, s.URL+"/v1/customers/zed/usage?"+param+"=0001-01-01T00:00:00Z", nil)
		req.Header.Set("Authorization", "Bearer "+testServiceKey)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		var p client.Problem
		_ = json.Unmarshal(body, &p)
		if resp.StatusCode != http.StatusUnprocessableEntity || p.Code != client.ErrorCodeInvalidRequest || p.Detail == nil || !strings.Contains(*p.Detail, "zero time") {
			t.Errorf("totals with %s=0001-01-01T00:00:00Z: %d %s, want 422 invalid_request naming the zero time", param, resp.StatusCode, body)
		}
	}
	rec, err := s.admin(t).CreateReconciliationWithResponse(ctx, client.ReconciliationRequest{Meter: "api_calls", From: &zero, To: ptrTo(time.Now())})
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "reconciliation from the zero time", rec.StatusCode(), rec.Body, http.StatusUnprocessableEntity)
	if !strings.Contains(string(rec.Body), "zero time") {
		t.Errorf("reconciliation from the zero time: %s, want the zero time named", rec.Body)
	}
	if n := len(fake.Requests()); n != 0 {
		t.Errorf("Stripe got %d requests for a refused reconciliation", n)
	}
}

func ptrTo[T any](v T) *T { return &v }
