package db_test

import (
	"os"
	"strings"
	"testing"
	"time"

	"github.com/tallybilling/tally/internal/db/dbtest"
)

// migrationUp is the Up section of a migration file, as goose runs it.
func migrationUp(t *testing.T, name string) string {
	t.Helper()
	b, err := os.ReadFile("migrations/" + name)
	if err != nil {
		t.Fatal(err)
	}
	_, up, ok := strings.Cut(string(b), "-- +goose Up")
	up, _, ok2 := strings.Cut(up, "-- +goose Down")
	if !ok || !ok2 {
		t.Fatalf("%s: no Up section", name)
	}
	return up
}

// Events parked while waiting for a success that a sync recorded before a
// sync woke anything: the migration hands exactly those back to the retry
// worker, due now; everything else stays as it was.
func TestRequeueParkedWaitsMigration(t *testing.T) {
	t.Parallel()
	gdb := dbtest.New(t)
	mustExec(t, gdb, `INSERT INTO customers (id) VALUES ('c')`)
	payment := func(id, status, method, pi, invoice string) {
		t.Helper()
		mustExec(t, gdb, `INSERT INTO payments (id, customer_id, item, item_kind, quantity, status, unit_amount, amount, currency,
				livemode, method, payment_intent_id, invoice_id)
			VALUES (?, 'c', 'starter', 'credit_pack', 1, ?, 100, 100, 'usd', false, ?, NULLIF(?, ''), NULLIF(?, ''))`,
			id, status, method, pi, invoice)
	}
	payment("pay_ok", "succeeded", "checkout", "pi_ok", "")
	payment("pay_refunded", "refunded", "checkout", "pi_refunded", "")
	payment("pay_pending", "pending", "checkout", "pi_pending", "")
	payment("pay_failed", "failed", "checkout", "pi_failed", "")
	payment("pay_invoice", "succeeded", "invoice", "", "in_paid")
	payment("pay_plan", "succeeded", "checkout", "pi_plan", "in_plan") // a plan's first invoice: not waited on by invoice
	later := time.Now().Add(time.Hour).UTC()
	event := func(id, status, waitingFor string) {
		t.Helper()
		mustExec(t, gdb, `INSERT INTO stripe_events (id, type, livemode, payload, status, attempts, next_attempt_at, waiting_for, last_error)
			VALUES (?, 'charge.refunded', false, '{}', ?, 5, CASE WHEN ? = 'parked' THEN NULL ELSE ?::timestamptz END, NULLIF(?, ''), 'waiting')`,
			id, status, status, later, waitingFor)
	}
	event("evt_ok", "parked", "pi_ok")
	event("evt_refunded", "parked", "pi_refunded")
	event("evt_invoice", "parked", "in_paid")
	event("evt_pending", "parked", "pi_pending")
	event("evt_failed", "parked", "pi_failed")
	event("evt_plan", "parked", "in_plan")
	event("evt_unknown", "parked", "pi_unknown")
	event("evt_nowait", "parked", "")
	event("evt_retrying", "failed", "pi_ok") // already retried by the worker

	mustExec(t, gdb, migrationUp(t, "00054_requeue_parked_waits.sql"))

	want := map[string]string{
		"evt_ok": "failed", "evt_refunded": "failed", "evt_invoice": "failed",
		"evt_pending": "parked", "evt_failed": "parked", "evt_plan": "parked", "evt_unknown": "parked", "evt_nowait": "parked",
		"evt_retrying": "failed",
	}
	for id, status := range want {
		var got struct {
			Status string
			Due    bool
			Later  bool
		}
		if err := gdb.Raw(`SELECT status, next_attempt_at <= now() AS due, next_attempt_at > now() AS later FROM stripe_events WHERE id = ?`, id).
			Scan(&got).Error; err != nil {
			t.Fatal(err)
		}
		requeued := status == "failed" && id != "evt_retrying"
		if got.Status != status || (requeued && !got.Due) || (id == "evt_retrying" && !got.Later) {
			t.Errorf("%s: %+v, want %s (requeued due now: %t)", id, got, status, requeued)
		}
	}
}
