package main

import (
	"context"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/tallybilling/tally/internal/app"
	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/db/dbtest"
)

// seedAndCount seeds plan into a fresh migrated database, checks the
// project's verify is clean over it and returns the database's row counts.
func seedAndCount(t *testing.T, dbURL string, plan seedPlan) (seedResult, map[string]int64) {
	t.Helper()
	ctx := context.Background()
	pool, err := openPool(ctx, dbURL, plan.workers)
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	res, err := seed(ctx, pool, plan, time.Now(), func(string, ...any) {})
	if err != nil {
		t.Fatalf("seed %+v: %v", plan, err)
	}
	gdb, err := db.Open(ctx, dbURL, 2, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close(gdb)
	rep, err := app.Verify(ctx, gdb)
	if err != nil {
		t.Fatal(err)
	}
	if !rep.OK {
		t.Fatalf("verify after seeding %+v: %d problems, first %+v", plan, len(rep.Problems), rep.Problems[0])
	}
	counts := map[string]int64{}
	for _, q := range []string{
		"customers", "credit_balances", "credit_grants", "credit_ledger", "usage_events",
		"credit_ledger WHERE kind = 'grant'", "usage_events WHERE status = 'delivered'",
		// What the forecast watcher would look at (its own condition).
		"credit_balances b LEFT JOIN credit_forecast_state f ON f.customer_id = b.customer_id " +
			"WHERE f.checked_at IS NULL OR b.updated_at > f.checked_at",
		"background_runs WHERE name = '" + app.VerifyJob + "' AND last_run_at > now() - interval '1 hour'",
	} {
		var n int64
		if err := pool.QueryRow(ctx, "SELECT count(*) FROM "+q).Scan(&n); err != nil {
			t.Fatal(err)
		}
		counts[q] = n
	}
	return res, counts
}

// A seed of uneven sizes over several chunks (the last one partial) loads
// exactly what was asked, in rows the project's verify finds consistent,
// and a second seed with the same flags loads nothing more.
func TestSeedLoadsConsistentRowsAndResumes(t *testing.T) {
	t.Parallel()
	if testing.Short() {
		t.Skip("loads a large data set (skipped by -short; make test runs it)")
	}
	dbURL := dbtest.NewURL(t)
	plan := seedPlan{customers: 2*seedChunk + 3, ledger: 3*(2*seedChunk+3) + 2, usage: 7, meter: "api_calls", workers: 2}
	res, counts := seedAndCount(t, dbURL, plan)
	want := map[string]int64{
		"customers": int64(plan.customers), "credit_balances": int64(plan.customers), "credit_grants": int64(plan.customers),
		"credit_ledger": plan.ledger, "credit_ledger WHERE kind = 'grant'": int64(plan.customers),
		"usage_events": plan.usage, "usage_events WHERE status = 'delivered'": plan.usage,
		// As on a database whose server has run: the watcher has caught up.
		"credit_balances b LEFT JOIN credit_forecast_state f ON f.customer_id = b.customer_id " +
			"WHERE f.checked_at IS NULL OR b.updated_at > f.checked_at": 0,
		// and its last background verify was a moment ago.
		"background_runs WHERE name = '" + app.VerifyJob + "' AND last_run_at > now() - interval '1 hour'": 1,
	}
	for q, n := range want {
		if counts[q] != n {
			t.Errorf("count(*) FROM %s = %d, want %d", q, counts[q], n)
		}
	}
	if res.chunks != 3 || res.skipped != 0 || res.customers != plan.customers || res.ledger != plan.ledger || res.usage != plan.usage {
		t.Errorf("result %+v, want 3 chunks loaded with every row", res)
	}

	again, counts2 := seedAndCount(t, dbURL, plan)
	if again.skipped != 3 || again.customers != 0 || again.ledger != 0 {
		t.Errorf("second seed %+v, want every chunk skipped", again)
	}
	for q, n := range counts {
		if counts2[q] != n {
			t.Errorf("second seed changed count(*) FROM %s from %d to %d", q, n, counts2[q])
		}
	}

	// The balances are what each customer's ledger says: seedRemaining each,
	// and the seeded customers carry the seed prefix only.
	pool, err := openPool(context.Background(), dbURL, 1)
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	var minBalance, maxBalance, foreign int64
	if err := pool.QueryRow(context.Background(), `SELECT min(balance), max(balance),
		(SELECT count(*) FROM customers WHERE id NOT LIKE 'seed-%') FROM credit_balances`).Scan(&minBalance, &maxBalance, &foreign); err != nil {
		t.Fatal(err)
	}
	if minBalance != seedRemaining || maxBalance != seedRemaining || foreign != 0 {
		t.Errorf("balances %d..%d, %d customers without the seed prefix; want all %d, none", minBalance, maxBalance, foreign, seedRemaining)
	}
}

// Fewer ledger entries than customers leaves some customers without any
// credits (a customer row only), which verify must also accept.
func TestSeedWithFewerEntriesThanCustomers(t *testing.T) {
	t.Parallel()
	_, counts := seedAndCount(t, dbtest.NewURL(t), seedPlan{customers: 10, ledger: 4, usage: 0, meter: "api_calls", workers: 1})
	if counts["customers"] != 10 || counts["credit_balances"] != 4 || counts["credit_ledger"] != 4 || counts["usage_events"] != 0 {
		t.Errorf("counts %v, want 10 customers, 4 of them with one grant each, no usage", counts)
	}
}

// The seed refuses a database the server never migrated, naming the fix.
func TestSeedRefusesAnUnmigratedDatabase(t *testing.T) {
	t.Parallel()
	var out strings.Builder
	err := run(t.Context(), []string{"-seed", "-db", dbtest.NewEmptyURL(t), "-seed-customers", "1", "-seed-ledger", "1", "-seed-usage", "1"}, env(nil), &out, &out)
	if err == nil || !strings.Contains(err.Error(), "make run migrates it") {
		t.Fatalf("run -seed on an empty database = %v, want a hint to migrate", err)
	}
}

// indexDefs lists the definitions of the indexes of the tables the seed
// drops indexes of.
func indexDefs(t *testing.T, pool *pgxpool.Pool) []string {
	t.Helper()
	rows, err := pool.Query(context.Background(), `SELECT indexdef FROM pg_indexes
		WHERE tablename = ANY ($1) ORDER BY indexname`, seedIndexedTables)
	if err != nil {
		t.Fatal(err)
	}
	defs, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		t.Fatal(err)
	}
	return defs
}

// The seed drops the secondary indexes of the big tables for the load and
// builds every one of them again, as the migrations defined it; indexes a
// seed interrupted left dropped are built by the next seed.
func TestSeedBuildsTheIndexesItDropped(t *testing.T) {
	t.Parallel()
	dbURL := dbtest.NewURL(t)
	pool, err := openPool(context.Background(), dbURL, 2)
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	before := indexDefs(t, pool)
	if len(before) < 8 {
		t.Fatalf("only %d indexes on %v: %q", len(before), seedIndexedTables, before)
	}
	plan := seedPlan{customers: 5, ledger: 20, usage: 20, meter: "api_calls", workers: 2}
	// All but the three that back constraints: the two primary keys and
	// the ledger's unique id.
	if res, _ := seedAndCount(t, dbURL, plan); res.indexes != len(before)-3 {
		t.Fatalf("the seed built %d indexes, want every one but the three behind constraints (%d)", res.indexes, len(before)-3)
	}
	if after := indexDefs(t, pool); strings.Join(after, "\n") != strings.Join(before, "\n") {
		t.Fatalf("indexes after the seed:\n%s\nwant:\n%s", strings.Join(after, "\n"), strings.Join(before, "\n"))
	}

	// An interrupted seed: indexes dropped, their definitions waiting.
	waiting, err := dropSeedIndexes(context.Background(), pool)
	if err != nil {
		t.Fatal(err)
	}
	if waiting == 0 || len(indexDefs(t, pool)) != len(before)-waiting {
		t.Fatalf("%d indexes waiting, %d left of %d", waiting, len(indexDefs(t, pool)), len(before))
	}
	again, _ := seedAndCount(t, dbURL, plan)
	if again.customers != 0 {
		t.Fatalf("the second seed loaded %d customers, want none", again.customers)
	}
	if after := indexDefs(t, pool); strings.Join(after, "\n") != strings.Join(before, "\n") {
		t.Fatalf("indexes after the resumed seed:\n%s\nwant:\n%s", strings.Join(after, "\n"), strings.Join(before, "\n"))
	}
	var left bool
	if err := pool.QueryRow(context.Background(), `SELECT to_regclass($1) IS NOT NULL`, seedIndexTable).Scan(&left); err != nil || left {
		t.Fatalf("%s still exists (%v)", seedIndexTable, err)
	}
}

// While something else is connected to the database (a server, whose
// workers would scan whole tables without them), the seed keeps the
// indexes.
func TestSeedKeepsTheIndexesWhileAServerIsConnected(t *testing.T) {
	t.Parallel()
	dbURL := dbtest.NewURL(t)
	server, err := db.Open(context.Background(), dbURL, 1, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close(server)
	if err := db.Ping(context.Background(), server); err != nil {
		t.Fatal(err)
	}
	res, counts := seedAndCount(t, dbURL, seedPlan{customers: 5, ledger: 20, usage: 20, meter: "api_calls", workers: 2})
	if res.indexes != 0 || counts["credit_ledger"] != 20 || counts["usage_events"] != 20 {
		t.Fatalf("with a server connected: %d indexes dropped and built, counts %v; want none, every row", res.indexes, counts)
	}
}
