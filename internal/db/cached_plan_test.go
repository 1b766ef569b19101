package db_test

import (
	"context"
	"testing"

	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/db/dbtest"
	"github.com/tallybilling/tally/internal/errs"
)

// A migration that changes a column's type or collation (a trial
// migration made usage_events' names COLLATE "C") changes the result type
// of every statement that reads it, and a server still running keeps those
// statements prepared on its connections (pgx's cache): PostgreSQL answers
// their next run "cached plan must not change result type" (0A000), once
// per connection and statement, and pgx drops the statement so that the
// run after prepares it again. In a rolling upgrade to it the servers
// still running answered 32 usage intakes and 5 dead-letter pages 500.
// A transaction that meets it is run again; a lone statement is
// errs.Unavailable (503, retry), not an internal error.
func TestACachedPlanAMigrationChangedIsRetriedNotInternal(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	// One connection, so the statement runs again where it was prepared.
	gdb := dbtest.NewOneConn(t)
	mustExec(t, gdb, `CREATE TABLE names (id text PRIMARY KEY, owner text NOT NULL)`)
	mustExec(t, gdb, `INSERT INTO names VALUES ('a', 'x')`)

	readInTx := func() error {
		return db.InTx(ctx, gdb, func(tx *gorm.DB) error {
			var rows []struct{ ID, Owner string }
			return tx.Raw(`SELECT id, owner FROM names WHERE id = ?`, "a").Scan(&rows).Error
		})
	}
	readAlone := func() error {
		var rows []struct{ ID, Owner string }
		return db.Translate(gdb.Raw(`SELECT owner, id FROM names WHERE owner = ?`, "x").Scan(&rows).Error, nil)
	}
	if err := readInTx(); err != nil {
		t.Fatal(err)
	}
	if err := readAlone(); err != nil {
		t.Fatal(err)
	}
	mustExec(t, gdb, `ALTER TABLE names ALTER COLUMN id TYPE text COLLATE "C", ALTER COLUMN owner TYPE text COLLATE "C"`)
	if err := readInTx(); err != nil {
		t.Errorf("transaction after the column's collation changed: %v (code %v), want it run again and succeed", err, errs.CodeOf(err))
	}
	if err := readAlone(); !errs.Is(err, errs.Unavailable) {
		t.Errorf("statement after the column's collation changed: %v, want errs.Unavailable", err)
	}
	if err := readAlone(); err != nil {
		t.Errorf("statement run again: %v, want it prepared again", err)
	}
}
