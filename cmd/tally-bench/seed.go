package main

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/tallybilling/tally/internal/app"
)

// The seed loads a database the size of a busy deployment, so that the
// scenarios can show whether a request's cost grows with the data. Every
// seeded row satisfies the schema's constraints and `tally verify`: each
// seeded customer with ledger entries has one service grant, a ledger that
// opens with that grant and continues with consumes of 1 credit drawn from
// it (balance_after chained), and a balance row equal to both the ledger sum
// and the grant's remainder. Seeded usage events are delivered.
//
// Ids start with seedPrefix; a run's own customers start with "bench-", so
// the scenarios never pick a seeded customer.
const (
	seedPrefix = "seed-"
	// seedChunk customers are loaded per transaction, with all their rows,
	// so an interrupted seed leaves only whole customers behind and a rerun
	// resumes with the first chunk missing.
	seedChunk = 10_000
	// seedRemaining is what each seeded grant has left, so the balance of
	// every seeded customer.
	seedRemaining = 1_000_000
	// maxSeedCustomers and maxSeedPerCustomer bound one seed.
	maxSeedCustomers   = 100_000_000
	maxSeedPerCustomer = 1000
)

// seedPlan is what -seed loads.
type seedPlan struct {
	customers int
	ledger    int64 // entries over all customers
	usage     int64 // events over all customers
	meter     string
	workers   int
}

// seedResult reports what one seed did.
type seedResult struct {
	chunks, skipped int
	customers       int   // loaded by this run
	ledger, usage   int64 // loaded by this run
	load, analyze   time.Duration
	// indexes is how many secondary indexes were built after the load.
	indexes int
}

// Each statement covers the customers $1..$2 (1-based indexes) of a seed of
// $3 customers, at time $6; in seedPerCustomer, n is a customer's ledger
// entries and u its usage events, the totals $4 and $5 spread as evenly as
// integers allow. Every statement uses all of $1..$6, so that PostgreSQL
// knows each parameter's type; @prefix and @remaining are filled in by
// seedSQL.
const seedPerCustomer = `
	SELECT i,
	       $4::bigint / $3::bigint + (i <= $4::bigint % $3::bigint)::int AS n,
	       $5::bigint / $3::bigint + (i <= $5::bigint % $3::bigint)::int AS u,
	       $6::timestamptz - interval '365 days' AS t0
	FROM generate_series($1::bigint, $2::bigint) i`

var seedCustomersSQL = seedSQL(`
INSERT INTO customers (id, created_at, updated_at)
SELECT '@prefix' || c.i, c.t0 - interval '35 days', c.t0 - interval '35 days'
FROM (` + seedPerCustomer + `) c`)

// The grant holds @remaining plus every credit the consumes drew from it.
var seedGrantsSQL = seedSQL(`
INSERT INTO credit_grants (id, customer_id, amount, remaining, source, reason, created_at)
SELECT 'grt_seed_' || c.i, '@prefix' || c.i, @remaining + c.n - 1, @remaining, 'service', 'tally-bench seed', c.t0
FROM (` + seedPerCustomer + `) c
WHERE c.n >= 1`)

var seedBalancesSQL = seedSQL(`
INSERT INTO credit_balances (customer_id, balance, updated_at)
SELECT '@prefix' || c.i, @remaining, $6::timestamptz
FROM (` + seedPerCustomer + `) c
WHERE c.n >= 1`)

// The forecast watcher's state as a server that has been running leaves
// it: every customer looked at since its balance last changed. Without it
// the first server on the seeded database spends its first hour forecasting
// a million customers it has never seen, one transaction each, while the
// bench measures (a one-time catch-up after an upgrade, not the steady cost
// the large-database run is about).
var seedForecastStateSQL = seedSQL(`
INSERT INTO credit_forecast_state (customer_id, warned, checked_at)
SELECT '@prefix' || c.i, false, $6::timestamptz
FROM (` + seedPerCustomer + `) c
WHERE c.n >= 1`)

// Entry k of a customer: k = 1 is the grant, every later one a consume of 1
// drawn from it (as the service writes one: draws, an idempotency key, no
// grant_id); after entry k the balance is the grant's amount - (k - 1).
// Rows are inserted in (customer, k) order, so seq follows that order, and
// so do the ids: zero-padded, they sort as they are inserted, and each
// chunk appends to the unique index on id instead of touching pages all
// over it (likewise the usage events' identifiers below).
var seedLedgerSQL = seedSQL(`
INSERT INTO credit_ledger (id, customer_id, kind, amount, balance_after, reason, grant_id, draws, idempotency_key, created_at)
SELECT 'ctx_seed_' || lpad(c.i::text, 9, '0') || '_' || lpad(k::text, 4, '0'),
       '@prefix' || c.i,
       CASE WHEN k = 1 THEN 'grant' ELSE 'consume' END,
       CASE WHEN k = 1 THEN @remaining + c.n - 1 ELSE -1 END,
       @remaining + c.n - k,
       'tally-bench seed',
       CASE WHEN k = 1 THEN 'grt_seed_' || c.i END,
       CASE WHEN k > 1 THEN jsonb_build_array(jsonb_build_object('grant_id', 'grt_seed_' || c.i, 'amount', 1)) END,
       CASE WHEN k > 1 THEN 'seed-key-' || c.i || '-' || k END,
       c.t0 + k * interval '1 minute'
FROM (` + seedPerCustomer + `) c CROSS JOIN LATERAL generate_series(1, c.n) k
ORDER BY c.i, k`)

// Delivered usage events of meter $7, a minute apart over the last month.
var seedUsageSQL = seedSQL(`
INSERT INTO usage_events (identifier, customer_id, meter, stripe_event_name, value, occurred_at, status, attempts,
	next_attempt_at, first_attempt_at, delivered_at, created_at, updated_at)
SELECT '@prefix' || 'u-' || lpad(c.i::text, 9, '0') || '-' || lpad(k::text, 4, '0'), '@prefix' || c.i, $7, $7, 1, ts.t, 'delivered', 1,
       ts.t, ts.t, ts.t + interval '1 second', ts.t, ts.t + interval '1 second'
FROM (` + seedPerCustomer + `) c CROSS JOIN LATERAL generate_series(1, c.u) k
CROSS JOIN LATERAL (SELECT $6::timestamptz - interval '30 days' + k * interval '1 minute' AS t) ts`)

func seedSQL(q string) string {
	return strings.NewReplacer("@prefix", seedPrefix, "@remaining", strconv.Itoa(seedRemaining)).Replace(q)
}

// seedTables are the tables the seed writes, analysed once it is done.
var seedTables = []string{"customers", "credit_grants", "credit_balances", "credit_forecast_state", "credit_ledger", "usage_events"}

// seed loads plan into the database of pool, seedChunk customers per
// transaction on plan.workers connections, skipping chunks an earlier seed
// loaded, then vacuums and analyses the tables so that the planner and the
// autovacuum daemon do not change the picture during the measurement.
// progress reports each chunk.
func seed(ctx context.Context, pool *pgxpool.Pool, plan seedPlan, now time.Time, progress func(string, ...any)) (seedResult, error) {
	if plan.customers < 1 {
		return seedResult{}, errors.New("seed: at least one customer")
	}
	chunks := (plan.customers + seedChunk - 1) / seedChunk
	var res seedResult
	res.chunks = chunks
	started := time.Now()

	// The secondary indexes of the two big tables are dropped for the load
	// and built again afterwards: one sorted build of each costs far less
	// than ten million scattered insertions into it once the index no
	// longer fits in shared_buffers. Their definitions wait in
	// seedIndexTable, so an interrupted seed leaves them for the next one
	// to build.
	// A seed with nothing left to load leaves them alone.
	var dropped int
	missing, err := seedMissing(ctx, pool, plan, chunks)
	if err != nil {
		return res, err
	}
	// Nor does one while something else is connected (a server: its
	// workers poll usage_events and would scan the whole table each time).
	others, err := otherConnections(ctx, pool)
	if err != nil {
		return res, err
	}
	switch {
	case missing && others > 0:
		progress("seed: %d other connections to the database (a server?): the indexes stay, which makes the load slower; stop it for a faster seed", others)
	case missing:
		if dropped, err = dropSeedIndexes(ctx, pool); err != nil {
			return res, err
		}
	}
	res.indexes = dropped
	if dropped > 0 {
		progress("seed: %d secondary indexes of %s dropped for the load, built again after it", dropped, strings.Join(seedIndexedTables, " and "))
	}

	jobs := make(chan int)
	var mu sync.Mutex
	var first error
	var wg sync.WaitGroup
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	for range min(plan.workers, chunks) {
		wg.Go(func() {
			for c := range jobs {
				lo := c*seedChunk + 1
				hi := min(lo+seedChunk-1, plan.customers)
				loaded, ledger, usage, err := seedRange(ctx, pool, plan, lo, hi, now)
				mu.Lock()
				switch {
				case err != nil && first == nil:
					first = fmt.Errorf("seed customers %d to %d: %w", lo, hi, err)
					cancel()
				case err == nil && !loaded:
					res.skipped++
				case err == nil:
					res.customers += hi - lo + 1
					res.ledger += ledger
					res.usage += usage
					progress("seed: customers %d to %d of %d loaded (%s so far)", lo, hi, plan.customers, time.Since(started).Round(time.Second))
				}
				mu.Unlock()
			}
		})
	}
feed:
	for c := range chunks {
		select {
		case jobs <- c:
		case <-ctx.Done():
			break feed
		}
	}
	close(jobs)
	wg.Wait()
	if first == nil {
		first = ctx.Err()
	}
	if first != nil {
		if dropped > 0 {
			progress("seed: interrupted with the secondary indexes dropped; the next -seed builds them (their definitions wait in table %s)", seedIndexTable)
		}
		return res, first
	}
	if err := restoreSeedIndexes(ctx, pool, plan.workers, progress); err != nil {
		return res, err
	}
	res.load = time.Since(started)

	started = time.Now()
	for _, table := range seedTables {
		progress("seed: VACUUM ANALYZE %s", table)
		if _, err := pool.Exec(ctx, `VACUUM (ANALYZE) `+pgx.Identifier{table}.Sanitize()); err != nil {
			return res, fmt.Errorf("seed: vacuum %s: %w", table, err)
		}
	}
	res.analyze = time.Since(started)
	// As on a database whose server has been running: the last background
	// verify was a moment ago (the seed's rows pass it), so a server started
	// now does not spend its first minute scanning ten million entries under
	// the bench's load.
	if _, err := pool.Exec(ctx, `INSERT INTO background_runs AS r (name, last_run_at) VALUES ($1, now())
		ON CONFLICT (name) DO UPDATE SET last_run_at = excluded.last_run_at`, app.VerifyJob); err != nil {
		return res, fmt.Errorf("seed: record the verify: %w", err)
	}
	return res, nil
}

// otherConnections counts the client connections to the database that are
// not the tool's own.
func otherConnections(ctx context.Context, pool *pgxpool.Pool) (int, error) {
	var n int
	err := pool.QueryRow(ctx, `SELECT count(*) FROM pg_stat_activity
		WHERE datname = current_database() AND backend_type = 'client backend' AND application_name <> $1`, benchAppName).Scan(&n)
	if err != nil {
		return 0, fmt.Errorf("seed: look for other connections: %w", err)
	}
	return n, nil
}

// seedMissing reports whether a chunk of plan is not loaded yet (its first
// customer does not exist).
func seedMissing(ctx context.Context, pool *pgxpool.Pool, plan seedPlan, chunks int) (bool, error) {
	firsts := make([]string, chunks)
	for c := range chunks {
		firsts[c] = fmt.Sprintf("%s%d", seedPrefix, c*seedChunk+1)
	}
	var loaded int
	if err := pool.QueryRow(ctx, `SELECT count(*) FROM customers WHERE id = ANY ($1)`, firsts).Scan(&loaded); err != nil {
		return false, fmt.Errorf("seed: find what is loaded: %w", err)
	}
	return loaded < chunks, nil
}

// seedRange loads customers lo..hi with all their rows in one transaction,
// unless their first customer exists already (loaded is then false).
func seedRange(ctx context.Context, pool *pgxpool.Pool, plan seedPlan, lo, hi int, now time.Time) (loaded bool, ledger, usage int64, err error) {
	err = pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
		// Durability of a benchmark data set is not worth a flush per chunk.
		if _, err := tx.Exec(ctx, `SET LOCAL synchronous_commit = off`); err != nil {
			return err
		}
		var exists bool
		if err := tx.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM customers WHERE id = $1)`, fmt.Sprintf("%s%d", seedPrefix, lo)).Scan(&exists); err != nil {
			return err
		}
		if exists {
			return nil
		}
		args := []any{lo, hi, plan.customers, plan.ledger, plan.usage, now}
		for _, q := range []string{seedCustomersSQL, seedGrantsSQL, seedBalancesSQL, seedForecastStateSQL} {
			if _, err := tx.Exec(ctx, q, args...); err != nil {
				return err
			}
		}
		tag, err := tx.Exec(ctx, seedLedgerSQL, args...)
		if err != nil {
			return err
		}
		ledger = tag.RowsAffected()
		tag, err = tx.Exec(ctx, seedUsageSQL, append(args, plan.meter)...)
		if err != nil {
			return err
		}
		usage = tag.RowsAffected()
		loaded = true
		return nil
	})
	return loaded, ledger, usage, err
}

// seedIndexTable holds the definitions of the indexes a seed dropped until
// they are built again.
const seedIndexTable = "tally_bench_seed_dropped_indexes"

// seedIndexedTables are the tables whose secondary indexes a seed drops.
var seedIndexedTables = []string{"credit_ledger", "usage_events"}

// dropSeedIndexes records the definition of every index of
// seedIndexedTables that backs no constraint (primary keys and unique
// constraints stay, so the load is still checked by them) in
// seedIndexTable, and drops those indexes, in one transaction. It returns
// how many indexes wait to be built, including any an interrupted seed left.
func dropSeedIndexes(ctx context.Context, pool *pgxpool.Pool) (int, error) {
	var waiting int
	err := pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `CREATE TABLE IF NOT EXISTS `+seedIndexTable+` (name text PRIMARY KEY, definition text NOT NULL)`); err != nil {
			return err
		}
		rows, err := tx.Query(ctx, `INSERT INTO `+seedIndexTable+` (name, definition)
			SELECT i.indexrelid::regclass::text, pg_get_indexdef(i.indexrelid)
			FROM pg_index i
			WHERE i.indrelid = ANY ($1::regclass[])
			  AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid)
			ON CONFLICT (name) DO NOTHING
			RETURNING name`, seedIndexedTables)
		if err != nil {
			return err
		}
		names, err := pgx.CollectRows(rows, pgx.RowTo[string])
		if err != nil {
			return err
		}
		for _, name := range names {
			// name is regclass text: quoted as an identifier already.
			if _, err := tx.Exec(ctx, `DROP INDEX `+name); err != nil {
				return err
			}
		}
		return tx.QueryRow(ctx, `SELECT count(*) FROM `+seedIndexTable).Scan(&waiting)
	})
	if err != nil {
		return 0, fmt.Errorf("seed: drop the secondary indexes for the load: %w", err)
	}
	return waiting, nil
}

// restoreSeedIndexes builds every index seedIndexTable holds, on up to
// workers connections, forgetting each once it is built, then drops the
// table.
func restoreSeedIndexes(ctx context.Context, pool *pgxpool.Pool, workers int, progress func(string, ...any)) error {
	var waiting bool
	if err := pool.QueryRow(ctx, `SELECT to_regclass($1) IS NOT NULL`, seedIndexTable).Scan(&waiting); err != nil {
		return fmt.Errorf("seed: look for %s: %w", seedIndexTable, err)
	}
	if !waiting {
		return nil
	}
	type index struct{ name, definition string }
	rows, err := pool.Query(ctx, `SELECT name, definition FROM `+seedIndexTable+` ORDER BY name`)
	if err != nil {
		return fmt.Errorf("seed: list the indexes to build: %w", err)
	}
	list, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (index, error) {
		var i index
		return i, r.Scan(&i.name, &i.definition)
	})
	if err != nil {
		return fmt.Errorf("seed: list the indexes to build: %w", err)
	}
	jobs := make(chan index, len(list))
	for _, i := range list {
		jobs <- i
	}
	close(jobs)
	errc := make(chan error, len(list))
	var wg sync.WaitGroup
	for range min(workers, len(list)) {
		wg.Go(func() {
			for i := range jobs {
				started := time.Now()
				errc <- buildSeedIndex(ctx, pool, i.name, i.definition)
				progress("seed: index %s built in %s", i.name, time.Since(started).Round(time.Millisecond))
			}
		})
	}
	wg.Wait()
	close(errc)
	for err := range errc {
		if err != nil {
			return err
		}
	}
	if _, err := pool.Exec(ctx, `DROP TABLE IF EXISTS `+seedIndexTable); err != nil {
		return fmt.Errorf("seed: drop %s: %w", seedIndexTable, err)
	}
	return nil
}

// buildSeedIndex builds one dropped index from its definition (as
// pg_get_indexdef wrote it) and forgets it, in one transaction; an index
// that exists already (a build that committed just before an
// interruption could not forget it) is only forgotten.
func buildSeedIndex(ctx context.Context, pool *pgxpool.Pool, name, definition string) error {
	def, ok := strings.CutPrefix(definition, "CREATE INDEX ")
	if ok {
		def = "CREATE INDEX IF NOT EXISTS " + def
	} else if def, ok = strings.CutPrefix(definition, "CREATE UNIQUE INDEX "); ok {
		def = "CREATE UNIQUE INDEX IF NOT EXISTS " + def
	} else {
		return fmt.Errorf("seed: index %s: unexpected definition %q", name, definition)
	}
	err := pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
		// A sort in memory builds an index of ten million rows fastest.
		if _, err := tx.Exec(ctx, `SET LOCAL maintenance_work_mem = '256MB'`); err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, def); err != nil {
			return err
		}
		_, err := tx.Exec(ctx, `DELETE FROM `+seedIndexTable+` WHERE name = $1`, name)
		return err
	})
	if err != nil {
		return fmt.Errorf("seed: build index %s: %w", name, err)
	}
	return nil
}
