package db_test

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5/pgconn"
	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/db/dbtest"
	"github.com/tallybilling/tally/internal/errs"
)

func mustExec(t *testing.T, gdb *gorm.DB, sql string, args ...any) {
	t.Helper()
	if err := gdb.Exec(sql, args...).Error; err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
}

func count(t *testing.T, gdb *gorm.DB, sql string, args ...any) int64 {
	t.Helper()
	var n int64
	if err := gdb.Raw(sql, args...).Scan(&n).Error; err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
	return n
}

func newItemsDB(t *testing.T) *gorm.DB {
	gdb := dbtest.New(t)
	mustExec(t, gdb, `CREATE TABLE items (
		id int PRIMARY KEY,
		qty int NOT NULL CONSTRAINT items_qty_nonneg CHECK (qty >= 0),
		sku text CONSTRAINT items_sku_key UNIQUE)`)
	return gdb
}

func TestInTxCommits(t *testing.T) {
	t.Parallel()
	gdb := newItemsDB(t)
	err := db.InTx(context.Background(), gdb, func(tx *gorm.DB) error {
		if err := tx.Exec(`INSERT INTO items (id, qty) VALUES (1, 5)`).Error; err != nil {
			return err
		}
		return tx.Exec(`UPDATE items SET qty = qty + 1 WHERE id = 1`).Error
	})
	if err != nil {
		t.Fatalf("InTx: %v", err)
	}
	if n := count(t, gdb, `SELECT qty FROM items WHERE id = 1`); n != 6 {
		t.Fatalf("qty = %d, want 6", n)
	}
}

func TestInTxRollsBackOnError(t *testing.T) {
	t.Parallel()
	gdb := newItemsDB(t)
	want := errs.E(errs.NotFound, "nope")
	err := db.InTx(context.Background(), gdb, func(tx *gorm.DB) error {
		if err := tx.Exec(`INSERT INTO items (id, qty) VALUES (1, 5)`).Error; err != nil {
			return err
		}
		return want
	})
	if err != want {
		t.Fatalf("InTx returned %v, want fn's own *errs.Error unchanged", err)
	}
	if n := count(t, gdb, `SELECT count(*) FROM items`); n != 0 {
		t.Fatalf("%d rows survived a failed transaction", n)
	}
}

func TestInTxRollsBackOnPanicAndRepanics(t *testing.T) {
	t.Parallel()
	gdb := newItemsDB(t)
	func() {
		defer func() {
			if r := recover(); r != "boom" {
				t.Fatalf("recovered %v, want the original panic value", r)
			}
		}()
		_ = db.InTx(context.Background(), gdb, func(tx *gorm.DB) error {
			if err := tx.Exec(`INSERT INTO items (id, qty) VALUES (1, 5)`).Error; err != nil {
				return err
			}
			panic("boom")
		})
		t.Fatal("InTx swallowed a panic")
	}()
	if n := count(t, gdb, `SELECT count(*) FROM items`); n != 0 {
		t.Fatalf("%d rows survived a panicking transaction", n)
	}
	// The connection went back to the pool clean: a new transaction works.
	if err := db.InTx(context.Background(), gdb, func(tx *gorm.DB) error {
		return tx.Exec(`INSERT INTO items (id, qty) VALUES (2, 1)`).Error
	}); err != nil {
		t.Fatalf("InTx after a panic: %v", err)
	}
}

func TestInTxReturnsCommitError(t *testing.T) {
	t.Parallel()
	gdb := dbtest.New(t)
	// A deferred constraint is checked at COMMIT, so only the commit fails.
	mustExec(t, gdb, `CREATE TABLE d (k int CONSTRAINT d_k_key UNIQUE DEFERRABLE INITIALLY DEFERRED)`)
	err := db.InTx(context.Background(), gdb, func(tx *gorm.DB) error {
		return tx.Exec(`INSERT INTO d VALUES (1), (1)`).Error
	})
	if !errs.Is(err, errs.Conflict) {
		t.Fatalf("InTx = %v, want the commit's unique violation as conflict", err)
	}
	if n := count(t, gdb, `SELECT count(*) FROM d`); n != 0 {
		t.Fatalf("%d rows committed", n)
	}
}

func TestInTxReturnsErrorOfCommitAfterSwallowedFailure(t *testing.T) {
	t.Parallel()
	gdb := newItemsDB(t)
	// fn ignores a failed statement; PostgreSQL then turns COMMIT into
	// ROLLBACK, and InTx must say so instead of reporting success.
	err := db.InTx(context.Background(), gdb, func(tx *gorm.DB) error {
		_ = tx.Exec(`INSERT INTO items (id, qty) VALUES (1, -1)`).Error
		return nil
	})
	if err == nil {
		t.Fatal("InTx reported success for a transaction PostgreSQL rolled back")
	}
}

const raiseSerialization = `DO $$ BEGIN RAISE EXCEPTION 'simulated' USING ERRCODE = '40001'; END $$`
const raiseDeadlock = `DO $$ BEGIN RAISE EXCEPTION 'simulated' USING ERRCODE = '40P01'; END $$`

func TestInTxRetriesSerializationFailure(t *testing.T) {
	t.Parallel()
	gdb := newItemsDB(t)
	attempts := 0
	err := db.InTx(context.Background(), gdb, func(tx *gorm.DB) error {
		attempts++
		if err := tx.Exec(`INSERT INTO items (id, qty) VALUES (1, ?)`, attempts).Error; err != nil {
			return err
		}
		if attempts == 1 {
			return tx.Exec(raiseSerialization).Error
		}
		if attempts == 2 {
			return tx.Exec(raiseDeadlock).Error
		}
		return nil
	})
	if err != nil {
		t.Fatalf("InTx: %v", err)
	}
	if attempts != 3 {
		t.Fatalf("fn ran %d times, want 3", attempts)
	}
	if n := count(t, gdb, `SELECT qty FROM items WHERE id = 1`); n != 3 {
		t.Fatalf("committed qty %d, want the third attempt's 3 (earlier attempts rolled back)", n)
	}
}

func TestInTxGivesUpAfterBoundedRetries(t *testing.T) {
	t.Parallel()
	gdb := newItemsDB(t)
	attempts := 0
	err := db.InTx(context.Background(), gdb, func(tx *gorm.DB) error {
		attempts++
		return tx.Exec(raiseSerialization).Error
	})
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) || pgErr.Code != "40001" {
		t.Fatalf("InTx = %v, want the serialization failure", err)
	}
	if attempts < 2 || attempts > 10 {
		t.Fatalf("fn ran %d times, want a small bounded number of retries", attempts)
	}
}

func TestInTxDoesNotRetryOtherErrors(t *testing.T) {
	t.Parallel()
	gdb := newItemsDB(t)
	attempts := 0
	_ = db.InTx(context.Background(), gdb, func(tx *gorm.DB) error {
		attempts++
		return tx.Exec(`INSERT INTO items (id, qty) VALUES (1, -1)`).Error
	})
	if attempts != 1 {
		t.Fatalf("fn ran %d times for a check violation, want 1", attempts)
	}
}

// A function that runs inside its caller's transaction takes that tx; an
// InTx called with a transaction would open a second, invisible unit of
// work (gorm would make it a savepoint, and InTx's retry would re-run it
// inside an outer transaction PostgreSQL may have aborted). It is refused
// before fn runs, and the outer transaction is unharmed.
func TestInTxRefusesToNest(t *testing.T) {
	t.Parallel()
	gdb := newItemsDB(t)
	innerRan := false
	var inner error
	err := db.InTx(context.Background(), gdb, func(tx *gorm.DB) error {
		if err := tx.Exec(`INSERT INTO items (id, qty) VALUES (1, 1)`).Error; err != nil {
			return err
		}
		inner = db.InTx(context.Background(), tx, func(tx2 *gorm.DB) error {
			innerRan = true
			return tx2.Exec(`INSERT INTO items (id, qty) VALUES (2, 2)`).Error
		})
		return nil
	})
	if err != nil {
		t.Fatalf("outer InTx: %v", err)
	}
	if inner == nil || !strings.Contains(inner.Error(), "inside a transaction") {
		t.Fatalf("InTx on a transaction = %v, want a refusal naming the misuse", inner)
	}
	if innerRan {
		t.Fatal("the nested fn ran")
	}
	if n := count(t, gdb, `SELECT count(*) FROM items`); n != 1 {
		t.Fatalf("%d rows, want only the outer one", n)
	}
}

func TestInTxConnectionKilledIsUnavailable(t *testing.T) {
	t.Parallel()
	gdb := dbtest.New(t)
	err := db.InTx(context.Background(), gdb, func(tx *gorm.DB) error {
		return tx.Exec(`SELECT pg_terminate_backend(pg_backend_pid())`).Error
	})
	if !errs.Is(err, errs.Unavailable) || !db.IsUnavailable(err) {
		t.Fatalf("InTx on a terminated connection = %v, want unavailable", err)
	}
	// The pool recovers by itself.
	if n := count(t, gdb, `SELECT 1`); n != 1 {
		t.Fatal("pool did not recover")
	}
}

func TestInTxCancelledContext(t *testing.T) {
	t.Parallel()
	gdb := dbtest.New(t)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	ran := false
	err := db.InTx(ctx, gdb, func(tx *gorm.DB) error { ran = true; return nil })
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("InTx with a cancelled context = %v, want context.Canceled", err)
	}
	if errs.Is(err, errs.Unavailable) {
		t.Fatal("a cancelled request was reported as the database being unavailable")
	}
	if ran {
		t.Fatal("fn ran although the context was cancelled before begin")
	}
}
