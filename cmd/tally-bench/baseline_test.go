package main

import (
	"context"
	"strconv"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/tallybilling/tally/internal/db/dbtest"
)

// The baseline must debit exactly like a consume (never below zero, one
// ledger row per success, a refusal once the balance is spent) under many
// concurrent workers, and leave nothing behind in tally's database.
func TestBaselineDebitsWithoutOverdraftAndCleansUp(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	dbURL := dbtest.NewURL(t) // a migrated tally database, as in production
	runID := strconv.FormatInt(time.Now().UnixNano(), 36)

	b, err := openBaseline(ctx, dbURL, runID, 8)
	if err != nil {
		t.Fatal(err)
	}
	closed := false
	t.Cleanup(func() {
		if !closed {
			_ = b.close()
		}
	})
	if err := b.fund(ctx, []string{"hot", "other"}, 5); err != nil {
		t.Fatal(err)
	}

	p := population{runID: runID}
	r := drive(ctx, time.Now, 8, 0, 300*time.Millisecond, 1, nil, b.consumeOp(p, "sql-test", func(*worker) string { return "hot" }))
	if r.errorCount() != 0 {
		t.Fatalf("baseline errors: %v %v", r.errors, r.examples)
	}
	if r.ok != 5 || r.expected != r.requests-5 {
		t.Errorf("ok %d, refused %d of %d; want exactly 5 debits of a balance of 5, the rest refused", r.ok, r.expected, r.requests)
	}

	conn, err := pgx.Connect(ctx, dbURL)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	schema := pgx.Identifier{"tally_bench_" + runID}.Sanitize()
	var hot, other, rows, minAfter int64
	err = conn.QueryRow(ctx, `SELECT
		(SELECT balance FROM `+schema+`.tally_bench_baseline WHERE customer_id = 'hot'),
		(SELECT balance FROM `+schema+`.tally_bench_baseline WHERE customer_id = 'other'),
		(SELECT count(*) FROM `+schema+`.tally_bench_baseline_ledger),
		(SELECT coalesce(min(balance_after), -1) FROM `+schema+`.tally_bench_baseline_ledger)`).Scan(&hot, &other, &rows, &minAfter)
	if err != nil {
		t.Fatal(err)
	}
	if hot != 0 || other != 5 || rows != 5 || minAfter != 0 {
		t.Errorf("hot %d, other %d, ledger rows %d, lowest balance_after %d; want 0, 5, 5, 0", hot, other, rows, minAfter)
	}

	closed = true
	if err := b.close(); err != nil {
		t.Fatal(err)
	}
	var schemaLeft, customersTable *string
	if err := conn.QueryRow(ctx, `SELECT
		(SELECT nspname::text FROM pg_namespace WHERE nspname = $1),
		to_regclass('public.customers')::text`, "tally_bench_"+runID).Scan(&schemaLeft, &customersTable); err != nil {
		t.Fatal(err)
	}
	if schemaLeft != nil {
		t.Errorf("scratch schema %s left behind", *schemaLeft)
	}
	if customersTable == nil {
		t.Error("tally's customers table is gone after the baseline")
	}
}
