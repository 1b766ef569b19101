package db_test

import (
	"context"
	"net/url"
	"strings"
	"sync"
	"testing"

	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/db/dbtest"
)

func openURL(t *testing.T, dbURL string) *gorm.DB {
	t.Helper()
	gdb, err := db.Open(context.Background(), dbURL, 4, dbtest.Logger(t))
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { _ = db.Close(gdb) })
	return gdb
}

func TestMigrationsCurrentAfterMigrate(t *testing.T) {
	t.Parallel()
	gdb := openURL(t, dbtest.NewEmptyURL(t))
	ctx := context.Background()

	current, err := db.MigrationsCurrent(ctx, gdb)
	if err != nil || current {
		t.Fatalf("MigrationsCurrent on an empty database = %v, %v; want false, nil", current, err)
	}
	if err := db.Migrate(ctx, gdb); err != nil {
		t.Fatalf("Migrate: %v", err)
	}
	current, err = db.MigrationsCurrent(ctx, gdb)
	if err != nil || !current {
		t.Fatalf("MigrationsCurrent after Migrate = %v, %v; want true, nil", current, err)
	}
	// Migrating again is a no-op.
	if err := db.Migrate(ctx, gdb); err != nil {
		t.Fatalf("second Migrate: %v", err)
	}
	if n := count(t, gdb, `SELECT count(*) FROM idempotency_keys`); n != 0 {
		t.Fatalf("idempotency_keys has %d rows", n)
	}
}

func TestMigrationsCurrentFalseWhenBehind(t *testing.T) {
	t.Parallel()
	gdb := dbtest.New(t)
	latest, err := db.LatestMigration()
	if err != nil {
		t.Fatal(err)
	}
	// Pretend the newest migration was never applied (an older schema).
	mustExec(t, gdb, `DELETE FROM goose_db_version WHERE version_id = ?`, latest)
	current, err := db.MigrationsCurrent(context.Background(), gdb)
	if err != nil || current {
		t.Fatalf("MigrationsCurrent with version %d missing = %v, %v; want false", latest, current, err)
	}
}

func TestLatestMigrationMatchesFiles(t *testing.T) {
	t.Parallel()
	latest, err := db.LatestMigration()
	if err != nil {
		t.Fatalf("LatestMigration: %v", err)
	}
	if latest < 1 {
		t.Fatalf("LatestMigration = %d, want at least 1 (00001_idempotency.sql)", latest)
	}
}

func TestMigrateConcurrentReplicas(t *testing.T) {
	t.Parallel()
	dbURL := dbtest.NewEmptyURL(t)
	const replicas = 4
	handles := make([]*gorm.DB, replicas)
	for i := range handles {
		handles[i] = openURL(t, dbURL)
	}
	var wg sync.WaitGroup
	errc := make(chan error, replicas)
	for _, h := range handles {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errc <- db.Migrate(context.Background(), h)
		}()
	}
	wg.Wait()
	close(errc)
	for err := range errc {
		if err != nil {
			t.Errorf("concurrent Migrate: %v", err)
		}
	}
	gdb := handles[0]
	current, err := db.MigrationsCurrent(context.Background(), gdb)
	if err != nil || !current {
		t.Fatalf("MigrationsCurrent = %v, %v", current, err)
	}
	// Every version applied exactly once (version 0 is goose's own marker).
	if n := count(t, gdb, `SELECT count(*) FROM (SELECT version_id FROM goose_db_version GROUP BY version_id HAVING count(*) > 1) d`); n != 0 {
		t.Fatalf("%d migrations were applied more than once", n)
	}
}

func TestMigrationsCurrentOnVanishedDatabaseIsUnavailable(t *testing.T) {
	t.Parallel()
	dbURL := dbtest.NewURL(t)
	gdb := openURL(t, dbURL)
	other := dbtest.New(t)
	u, err := url.Parse(dbURL)
	if err != nil {
		t.Fatal(err)
	}
	// The server ends our connections and refuses new ones.
	mustExec(t, other, `DROP DATABASE `+strings.TrimPrefix(u.Path, "/")+` WITH (FORCE)`)
	_, err = db.MigrationsCurrent(context.Background(), gdb)
	if !db.IsUnavailable(err) {
		t.Fatalf("MigrationsCurrent on a dropped database = %v, want unavailable", err)
	}
}
