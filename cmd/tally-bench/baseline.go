package main

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// baseline is what the service does, done the cheapest honest way straight
// through pgx on the same PostgreSQL, with no HTTP, no idempotency record
// and no events: a consume is one transaction that locks and decrements a
// balance row only if it covers the amount and appends a ledger row; a
// balance read is a primary-key SELECT of the balance row. It lives in a
// scratch schema of its own and never reads or writes tally's tables, so a
// large tally database (-seed) slows the service, not the baseline.
type baseline struct {
	pool    *pgxpool.Pool
	schema  string
	debit   string
	account string
	read    string
}

// openBaseline connects with one pooled connection per worker and creates
// the scratch schema tally_bench_<runID> holding the tables
// tally_bench_baseline (balances) and tally_bench_baseline_ledger.
func openBaseline(ctx context.Context, dbURL, runID string, concurrency int) (*baseline, error) {
	pool, err := openPool(ctx, dbURL, concurrency)
	if err != nil {
		return nil, err
	}
	schema := pgx.Identifier{"tally_bench_" + runID}.Sanitize()
	b := &baseline{
		pool:   pool,
		schema: schema,
		debit: `UPDATE ` + schema + `.tally_bench_baseline SET balance = balance - 1
			WHERE customer_id = $1 AND balance >= 1 RETURNING balance`,
		account: `INSERT INTO ` + schema + `.tally_bench_baseline_ledger
			(customer_id, amount, balance_after, idempotency_key) VALUES ($1, -1, $2, $3)`,
		read: `SELECT balance FROM ` + schema + `.tally_bench_baseline WHERE customer_id = $1`,
	}
	_, err = pool.Exec(ctx, `CREATE SCHEMA `+schema+`;
		CREATE TABLE `+schema+`.tally_bench_baseline (
			customer_id text PRIMARY KEY,
			balance bigint NOT NULL CHECK (balance >= 0));
		CREATE TABLE `+schema+`.tally_bench_baseline_ledger (
			id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
			customer_id text NOT NULL REFERENCES `+schema+`.tally_bench_baseline,
			amount bigint NOT NULL,
			balance_after bigint NOT NULL,
			idempotency_key text NOT NULL UNIQUE,
			created_at timestamptz NOT NULL DEFAULT now())`)
	if err != nil {
		pool.Close()
		return nil, fmt.Errorf("baseline: create scratch schema %s: %w", schema, err)
	}
	return b, nil
}

// fund gives each customer amount credits in one statement.
func (b *baseline) fund(ctx context.Context, customers []string, amount int64) error {
	_, err := b.pool.Exec(ctx, `INSERT INTO `+b.schema+`.tally_bench_baseline (customer_id, balance)
		SELECT unnest($1::text[]), $2`, customers, amount)
	if err != nil {
		return fmt.Errorf("baseline: fund customers: %w", err)
	}
	return nil
}

// consumeOp debits 1 from the customer pick chooses; a balance that does not
// cover it is the expected refusal, like the service's 402. scenario keeps
// the ledger's idempotency keys of different scenarios apart.
func (b *baseline) consumeOp(p population, scenario string, pick func(*worker) string) op {
	return func(ctx context.Context, w *worker) outcome {
		err := pgx.BeginFunc(ctx, b.pool, func(tx pgx.Tx) error {
			customer := pick(w)
			var balance int64
			if err := tx.QueryRow(ctx, b.debit, customer).Scan(&balance); err != nil {
				return err
			}
			_, err := tx.Exec(ctx, b.account, customer, balance, p.uniqueKey(scenario, w))
			return err
		})
		switch {
		case err == nil:
			return outcome{ok: true}
		case errors.Is(err, pgx.ErrNoRows):
			return outcome{expected: true}
		case errors.Is(err, context.Canceled):
			return outcome{errLabel: "canceled", errDetail: err.Error()}
		default:
			return outcome{errLabel: "sql", errDetail: err.Error()}
		}
	}
}

// balanceOp reads the balance of a random customer, as GET .../balance does.
func (b *baseline) balanceOp(p population) op {
	return func(ctx context.Context, w *worker) outcome {
		var balance int64
		err := b.pool.QueryRow(ctx, b.read, p.pick(w)).Scan(&balance)
		switch {
		case err == nil:
			return outcome{ok: true}
		case errors.Is(err, context.Canceled):
			return outcome{errLabel: "canceled", errDetail: err.Error()}
		default:
			return outcome{errLabel: "sql", errDetail: err.Error()}
		}
	}
}

// close drops the scratch schema, with a context of its own so that an
// interrupted run still cleans up.
func (b *baseline) close() error {
	defer b.pool.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := b.pool.Exec(ctx, `DROP SCHEMA `+b.schema+` CASCADE`); err != nil {
		return fmt.Errorf("baseline: drop scratch schema %s: %w", b.schema, err)
	}
	return nil
}
