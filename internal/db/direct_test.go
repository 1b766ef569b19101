package db_test

import (
	"context"
	"errors"
	"testing"

	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/db/dbtest"
	"github.com/tallybilling/tally/internal/errs"
)

// TestDirectStatementsRunWhereGormWould: a direct statement given a
// transaction runs in it (it sees the transaction's writes, and its own
// writes roll back with it), given the pool it runs outside any; ScanDirect
// tells a query that returned no row from one that failed, and ExecDirect
// answers the rows it affected.
func TestDirectStatementsRunWhereGormWould(t *testing.T) {
	t.Parallel()
	gdb := dbtest.New(t)
	ctx := context.Background()
	if err := gdb.Exec(`CREATE TABLE direct_things (id bigint PRIMARY KEY, name text NOT NULL)`).Error; err != nil {
		t.Fatal(err)
	}
	count := func(g *gorm.DB) int64 {
		t.Helper()
		var n int64
		found, err := db.ScanDirect(ctx, g, `SELECT count(*) FROM direct_things WHERE name <> $1`, []any{""}, &n)
		if err != nil || !found {
			t.Fatalf("count: found=%t, %v", found, err)
		}
		return n
	}
	errRollBack := errors.New("roll back")
	err := gdb.Transaction(func(tx *gorm.DB) error {
		if err := tx.Exec(`INSERT INTO direct_things VALUES (1, 'one')`).Error; err != nil {
			return err
		}
		n, err := db.ExecDirect(ctx, tx, `INSERT INTO direct_things VALUES ($1, $2), ($3, $4)`, 2, "two", 3, "three")
		if err != nil || n != 2 {
			t.Fatalf("ExecDirect in the transaction: %d rows, %v; want 2", n, err)
		}
		if got := count(tx); got != 3 {
			t.Fatalf("the transaction counts %d rows through ScanDirect, want 3 (its own writes)", got)
		}
		if got := count(gdb); got != 0 {
			t.Fatalf("the pool counts %d rows while the transaction is open, want 0", got)
		}
		return errRollBack
	})
	if !errors.Is(err, errRollBack) {
		t.Fatal(err)
	}
	if got := count(gdb); got != 0 {
		t.Fatalf("%d rows after the rollback, want 0: a direct statement ran outside the transaction", got)
	}

	n, err := db.ExecDirect(ctx, gdb, `INSERT INTO direct_things VALUES ($1, $2)`, 4, "four")
	if err != nil || n != 1 {
		t.Fatalf("ExecDirect on the pool: %d rows, %v; want 1", n, err)
	}
	if n, err := db.ExecDirect(ctx, gdb, `UPDATE direct_things SET name = $1 WHERE id = $2`, "none", 99); err != nil || n != 0 {
		t.Fatalf("ExecDirect of an update of no row: %d rows, %v; want 0", n, err)
	}
	var name string
	found, err := db.ScanDirect(ctx, gdb, `SELECT name FROM direct_things WHERE id = $1`, []any{4}, &name)
	if err != nil || !found || name != "four" {
		t.Fatalf("ScanDirect of row 4: found=%t name=%q, %v", found, name, err)
	}
	found, err = db.ScanDirect(ctx, gdb, `SELECT name FROM direct_things WHERE id = $1`, []any{5}, &name)
	if err != nil || found {
		t.Fatalf("ScanDirect of a missing row: found=%t, %v; want not found and no error", found, err)
	}
	if _, err := db.ScanDirect(ctx, gdb, `SELECT name FROM direct_things WHERE id = $1 AND 1/0 = 1`, []any{4}, &name); err == nil {
		t.Fatal("ScanDirect of a failing query answered no error")
	}
}

// TestDirectStatementErrorsTranslateAsGormsDid: a direct statement's error
// reaches db.Translate as the driver's own error, as a gorm statement's
// did, so the callers' translations hold: a violated unique constraint
// named in the caller's map gets its code (confirm's
// payments_payment_intent_id_key → conflict), one not named is a
// conflict, and a statement the server cancelled (statement_timeout) is
// unavailable, for ExecDirect and ScanDirect, in a transaction and on the
// pool.
func TestDirectStatementErrorsTranslateAsGormsDid(t *testing.T) {
	t.Parallel()
	gdb := dbtest.New(t)
	ctx := context.Background()
	if err := gdb.Exec(`CREATE TABLE direct_keys (id bigint PRIMARY KEY, name text CONSTRAINT direct_keys_name_key UNIQUE)`).Error; err != nil {
		t.Fatal(err)
	}
	if _, err := db.ExecDirect(ctx, gdb, `INSERT INTO direct_keys VALUES ($1, $2)`, 1, "taken"); err != nil {
		t.Fatal(err)
	}
	byName := map[string]errs.Code{"direct_keys_name_key": errs.InsufficientCredits} // any code but the default
	for _, tc := range []struct {
		name string
		run  func(g *gorm.DB) error
	}{
		{"ExecDirect", func(g *gorm.DB) error {
			_, err := db.ExecDirect(ctx, g, `INSERT INTO direct_keys VALUES ($1, $2)`, 2, "taken")
			return err
		}},
		{"ScanDirect", func(g *gorm.DB) error {
			var id int64
			_, err := db.ScanDirect(ctx, g, `INSERT INTO direct_keys VALUES ($1, $2) RETURNING id`, []any{2, "taken"}, &id)
			return err
		}},
	} {
		for _, inTx := range []bool{false, true} {
			var err error
			if inTx {
				err = gdb.Transaction(func(tx *gorm.DB) error { return tc.run(tx) })
			} else {
				err = tc.run(gdb)
			}
			if got := db.Translate(err, byName); !errs.Is(got, errs.InsufficientCredits) {
				t.Errorf("%s (transaction %t) with the constraint named: %v; want the caller's code", tc.name, inTx, got)
			}
			if got := db.Translate(err, nil); !errs.Is(got, errs.Conflict) {
				t.Errorf("%s (transaction %t): %v; want conflict", tc.name, inTx, got)
			}
		}
	}
	err := gdb.Transaction(func(tx *gorm.DB) error {
		if err := tx.Exec(`SET LOCAL statement_timeout = '50ms'`).Error; err != nil {
			return err
		}
		var one int
		_, err := db.ScanDirect(ctx, tx, `SELECT 1 FROM pg_sleep($1)`, []any{1}, &one)
		return err
	})
	if got := db.Translate(err, nil); !errs.Is(got, errs.Unavailable) {
		t.Errorf("ScanDirect cancelled by statement_timeout: %v; want unavailable", got)
	}
}
