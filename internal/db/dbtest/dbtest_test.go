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
	t.Parallel()
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
	t.Parallel()
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
	t.Parallel()
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

// New copies a template that carries the digest of the migration files in
// its name, is marked a template and takes no connections, so a copy never
// finds a session in it and a changed migration never reuses it.
func TestNewCopiesTheTemplateOfTheseMigrations(t *testing.T) {
	t.Parallel()
	gdb := dbtest.New(t)
	digest, err := db.MigrationsDigest()
	if err != nil {
		t.Fatal(err)
	}
	var tmpl struct {
		Datname       string
		Datistemplate bool
		Datallowconn  bool
	}
	if err := gdb.Raw(`SELECT datname, datistemplate, datallowconn FROM pg_database WHERE datname = ?`, "tally_template_"+digest[:16]).Scan(&tmpl).Error; err != nil {
		t.Fatal(err)
	}
	if tmpl.Datname == "" || !tmpl.Datistemplate || tmpl.Datallowconn {
		t.Fatalf("template for digest %s: %+v; want it present, marked a template, closed to connections", digest[:16], tmpl)
	}
	other, err := db.MigrationsDigest()
	if err != nil || other != digest {
		t.Fatalf("MigrationsDigest is not stable: %s then %s (%v)", digest, other, err)
	}
}
