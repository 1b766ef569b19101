package main

import (
	"context"
	"fmt"
	"net/http"
	"reflect"
	"testing"
	"time"

	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/stripeapi/stripefake"
	"github.com/tallybilling/tally/pkg/client"
)

// The running server's janitor purges what is past its retention, in small
// batches, and keeps what correctness needs: delivered usage becomes daily
// totals, so usage totals and reconciliation answer the same over HTTP
// before and after; young, unsettled and unpushed rows stay.
func TestRetentionPurgesAndAnswersStayTheSame(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	fake.SetMeter("mtr_api_calls", "api_calls")
	env := meteringEnv(t, fake.URL())
	env["TALLY_RETENTION_INTERVAL"] = "200ms"
	env["TALLY_RETENTION_BATCH_SIZE"] = "3"
	env["TALLY_RETENTION_USAGE_EVENTS"] = "840h"
	env["TALLY_RETENTION_STRIPE_EVENTS"] = "840h"
	s := startServer(t, env)
	ctx := context.Background()
	svc, admin := s.service(t), s.admin(t)
	gdb := openDB(t, s)
	for _, c := range []string{"pat", "quinn"} {
		id := "cus_" + c
		r, err := svc.UpsertCustomerWithResponse(ctx, c, client.CustomerUpsert{StripeCustomerId: &id})
		if err != nil {
			t.Fatal(err)
		}
		mustStatus(t, "link "+c, r.StatusCode(), r.Body, http.StatusCreated)
	}
	now := time.Now()
	var evs []client.UsageEventInput
	for i := range 40 {
		at := now.Add(-time.Duration(i*13+2) * time.Hour)
		ev := usageEvent([]string{"pat", "quinn"}[i%2], fmt.Sprintf("ret-%02d", i), float64(i+1))
		ev.Timestamp = &at
		evs = append(evs, ev)
	}
	key := "retention-batch"
	r, err := svc.IngestUsageEventsWithResponse(ctx, &client.IngestUsageEventsParams{IdempotencyKey: &key}, client.UsageBatch{Events: evs})
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "ingest", r.StatusCode(), r.Body, http.StatusAccepted)
	waitFor(t, "every event delivered", func() bool {
		return countRows(t, gdb, `SELECT count(*) FROM usage_events WHERE status = 'delivered'`) == 40
	})

	// The first 25 events "happened 200 days ago" (Stripe's fake still has
	// them at their real times, inside the reconciliation window below).
	execSQL(t, gdb, `UPDATE usage_events SET occurred_at = occurred_at - interval '200 days' WHERE identifier < 'ret-25'`)
	type answers struct {
		Totals []client.UsageTotals
		Rec    client.Reconciliation
	}
	read := func() answers {
		t.Helper()
		var a answers
		for _, p := range []client.GetCustomerUsageParams{
			{From: new(now.Add(-30 * 24 * time.Hour)), To: &now},
			{From: new(now.Add(-300 * 24 * time.Hour)), To: &now},
			{From: new(now.Add(-215*24*time.Hour + 5*time.Hour)), To: new(now.Add(-201*24*time.Hour + 7*time.Hour))},
		} {
			for _, c := range []string{"pat", "quinn"} {
				res, err := svc.GetCustomerUsageWithResponse(ctx, c, &p)
				if err != nil {
					t.Fatal(err)
				}
				mustStatus(t, "totals", res.StatusCode(), res.Body, http.StatusOK)
				a.Totals = append(a.Totals, *res.JSON200)
			}
		}
		rec, err := admin.CreateReconciliationWithResponse(ctx, client.ReconciliationRequest{Meter: "api_calls",
			From: ptrTo(now.Add(-300 * 24 * time.Hour)), To: ptrTo(now.Add(-time.Minute))})
		if err != nil {
			t.Fatal(err)
		}
		mustStatus(t, "reconciliation", rec.StatusCode(), rec.Body, http.StatusOK)
		a.Rec = *rec.JSON200
		a.Rec.Id = nil // each run is stored under its own id
		return a
	}
	before := read()
	if before.Rec.Checked != 2 || len(before.Rec.Mismatches) != 0 {
		t.Fatalf("reconciliation before the purge: %+v, want 2 customers and no drift", before.Rec)
	}
	if len(before.Totals[2].Meters) != 1 || before.Totals[2].Meters[0].Total == 0 {
		t.Fatalf("pat's totals since 300 days: %+v, want usage", before.Totals[2])
	}

	// Now they were also reported then, and other tables have old rows.
	execSQL(t, gdb, `UPDATE usage_events SET created_at = created_at - interval '200 days' WHERE identifier < 'ret-25'`)
	execSQL(t, gdb, `INSERT INTO stripe_events (id, type, livemode, payload, status, received_at) VALUES
		('evt_old_processed', 'x.y', false, '{}', 'processed', now() - interval '36 days'),
		('evt_old_ignored', 'x.y', false, '{}', 'ignored', now() - interval '36 days'),
		('evt_old_failed', 'x.y', false, '{}', 'failed', now() - interval '36 days'),
		('evt_young_processed', 'x.y', false, '{}', 'processed', now() - interval '34 days')`)
	execSQL(t, gdb, `INSERT INTO usage_refusal_reports (stripe_event_id, applied_at) VALUES
		('evt_old_report', now() - interval '36 days'), ('evt_young_report', now() - interval '34 days')`)
	execSQL(t, gdb, `UPDATE events SET created_at = created_at - interval '91 days' WHERE type = 'customer.created'`)
	if r, err := svc.UpsertCustomerWithResponse(ctx, "rosa", client.CustomerUpsert{}); err != nil || r.StatusCode() != http.StatusCreated {
		t.Fatalf("create rosa: %v %v", err, r)
	}
	execSQL(t, gdb, `UPDATE idempotency_keys SET created_at = created_at - interval '3 days'`)

	waitFor(t, "the janitor to purge", func() bool {
		return countRows(t, gdb, `SELECT count(*) FROM usage_events WHERE identifier < 'ret-25'`) == 0 &&
			countRows(t, gdb, `SELECT count(*) FROM stripe_events WHERE id IN ('evt_old_processed', 'evt_old_ignored')`) == 0 &&
			countRows(t, gdb, `SELECT count(*) FROM usage_refusal_reports WHERE stripe_event_id = 'evt_old_report'`) == 0 &&
			countRows(t, gdb, `SELECT count(*) FROM events WHERE type = 'customer.created' AND customer_id <> 'rosa'`) == 0 &&
			countRows(t, gdb, `SELECT count(*) FROM idempotency_keys`) == 0
	})
	if n := countRows(t, gdb, `SELECT count(*) FROM usage_events`); n != 15 {
		t.Errorf("%d usage rows left, want the 15 recent ones", n)
	}
	if n := countRows(t, gdb, `SELECT COALESCE(sum(events), 0) FROM usage_daily_totals`); n != 25 {
		t.Errorf("daily totals count %d events, want the 25 purged", n)
	}
	if n := countRows(t, gdb, `SELECT count(*) FROM stripe_events WHERE id IN ('evt_old_failed', 'evt_young_processed')`); n != 2 {
		t.Errorf("%d of the failed and the young Stripe events left, want both", n)
	}
	if n := countRows(t, gdb, `SELECT count(*) FROM usage_refusal_reports WHERE stripe_event_id = 'evt_young_report'`); n != 1 {
		t.Errorf("the record of a report applied 34 days ago was purged, want it kept as long as Stripe events")
	}
	if n := countRows(t, gdb, `SELECT count(*) FROM events WHERE customer_id = 'rosa'`); n != 1 {
		t.Errorf("%d feed events of rosa, want her young customer.created kept", n)
	}

	after := read()
	if !reflect.DeepEqual(before, after) {
		t.Errorf("answers changed by the purge:\nbefore %+v\nafter  %+v", before, after)
	}
	mustVerifyClean(t, s)
}

// execSQL runs q on gdb, failing the test on an error.
func execSQL(t testing.TB, gdb *gorm.DB, q string) {
	t.Helper()
	if err := gdb.Exec(q).Error; err != nil {
		t.Fatalf("%s: %v", q, err)
	}
}
