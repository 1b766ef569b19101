package dbtest_test

import (
	"context"
	"net/url"
	"strings"
	"testing"

	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/db/dbtest"
)

func TestNewGivesMigratedDatabaseDroppedAfterTest(t *testing.T) {
	var name string
	t.Run("inner", func(t *testing.T) {
		gdb := dbtest.New(t)
		if err := gdb.Raw(`SELECT current_database()`).Scan(&name).Error; err != nil {
			t.Fatal(err)
		}
		if !strings.HasPrefix(name, "tally_test_") {
			t.Fatalf("database %q is not a tally_test_ database", name)
		}
		current, err := db.MigrationsCurrent(context.Background(), gdb)
		if err != nil || !current {
			t.Fatalf("fresh database not migrated: %v, %v", current, err)
		}
	})
	observer := dbtest.New(t)
	var exists bool
	if err := observer.Raw(`SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = ?)`, name).Scan(&exists).Error; err != nil {
		t.Fatal(err)
	}
	if exists {
		t.Fatalf("database %s still exists after its test ended", name)
	}
}

func TestDatabasesAreIsolated(t *testing.T) {
	a, b := dbtest.New(t), dbtest.New(t)
	if err := a.Exec(`CREATE TABLE only_in_a (x int)`).Error; err != nil {
		t.Fatal(err)
	}
	var found bool
	if err := b.Raw(`SELECT to_regclass('only_in_a') IS NOT NULL`).Scan(&found).Error; err != nil {
		t.Fatal(err)
	}
	if found {
		t.Fatal("a table created in one test database is visible in another")
	}
}

func TestNewURLAndNewEmptyURL(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		name    string
		url     string
		current bool
	}{
		{"NewURL", dbtest.NewURL(t), true},
		{"NewEmptyURL", dbtest.NewEmptyURL(t), false},
	} {
		u, err := url.Parse(tc.url)
		if err != nil || !strings.HasPrefix(u.Path, "/tally_test_") {
			t.Fatalf("%s returned %q", tc.name, tc.url)
		}
		gdb, err := db.Open(ctx, tc.url, 2, dbtest.Logger(t))
		if err != nil {
			t.Fatalf("%s: open: %v", tc.name, err)
		}
		current, err := db.MigrationsCurrent(ctx, gdb)
		_ = db.Close(gdb)
		if err != nil || current != tc.current {
			t.Fatalf("%s: MigrationsCurrent = %v, %v; want %v", tc.name, current, err, tc.current)
		}
	}
}
