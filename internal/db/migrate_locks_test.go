package db_test

import (
	"context"
	"os"
	"testing"
	"time"

	"github.com/pressly/goose/v3"

	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/db/dbtest"
)

// Migration 00056 replaces CHECK constraints of tables that take writes all
// the time (payments, stripe_events, ...). Each replacement needs its
// table's ACCESS EXCLUSIVE lock for a moment; waiting for it behind a long
// reader (a report, pg_dump, a slow transaction) must not queue every write
// of the table behind the migration for as long as the reader runs.
func TestMigration56DoesNotQueueWritesBehindALongReader(t *testing.T) {
	t.Parallel()
	dbURL := dbtest.NewEmptyURL(t)
	mig := openURL(t, dbURL)
	work := openURL(t, dbURL)
	ctx := context.Background()

	sqlDB, err := mig.DB()
	if err != nil {
		t.Fatal(err)
	}
	p, err := goose.NewProvider(goose.DialectPostgres, sqlDB, os.DirFS("migrations"), goose.WithDisableGlobalRegistry(true))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.UpTo(ctx, 55); err != nil {
		t.Fatalf("migrate to 55: %v", err)
	}

	// A reader holds payments (ACCESS SHARE) for 4 seconds.
	workDB, err := work.DB()
	if err != nil {
		t.Fatal(err)
	}
	reader, err := workDB.Conn(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer reader.Close()
	tx, err := reader.BeginTx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(`SELECT count(*) FROM payments`); err != nil {
		t.Fatal(err)
	}
	readerDone := time.AfterFunc(4*time.Second, func() { _ = tx.Commit() })
	defer readerDone.Stop()

	migrated := make(chan error, 1)
	go func() { migrated <- db.Migrate(ctx, mig) }()
	time.Sleep(500 * time.Millisecond)

	// Writes to payments while the reader still runs: none may wait long.
	writer, err := workDB.Conn(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer writer.Close()
	var worst time.Duration
	for end := time.Now().Add(2 * time.Second); time.Now().Before(end); {
		start := time.Now()
		if _, err := writer.ExecContext(ctx, `UPDATE payments SET updated_at = now() WHERE id = 'pay_none'`); err != nil {
			t.Fatalf("write: %v", err)
		}
		worst = max(worst, time.Since(start))
		time.Sleep(20 * time.Millisecond)
	}
	if worst > time.Second {
		t.Errorf("a write to payments waited %v behind the migration (reader still running)", worst)
	}

	select {
	case err := <-migrated:
		if err != nil {
			t.Fatalf("Migrate: %v", err)
		}
	case <-time.After(90 * time.Second):
		t.Fatal("Migrate did not finish 90s after the reader ended")
	}
	if current, err := db.MigrationsCurrent(ctx, mig); err != nil || !current {
		t.Fatalf("MigrationsCurrent = %v, %v", current, err)
	}
	if n := count(t, work, `SELECT count(*) FROM pg_constraint WHERE conname = 'payments_status_check'
		AND convalidated AND pg_get_constraintdef(oid) LIKE '%{pending,succeeded,failed,refunded,disputed,dispute_lost}%'`); n != 1 {
		t.Fatalf("payments_status_check is not 00056's validated constraint (%d)", n)
	}
}
