// Package dbtest gives each test its own fresh PostgreSQL database on the
// server named by TALLY_TEST_DATABASE_URL, migrated with the real schema and
// dropped when the test ends. Tests never share state and never mock the
// database; when no server is reachable they fail, with a hint, never skip.
package dbtest

import (
	"context"
	"crypto/rand"
	"database/sql"
	"encoding/hex"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	_ "github.com/jackc/pgx/v5/stdlib" // the "pgx" database/sql driver for the admin connection
	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/db"
)

// EnvURL names the server tests run against.
const EnvURL = "TALLY_TEST_DATABASE_URL"

// DefaultURL is used when EnvURL is unset: the local server of the dev setup.
const DefaultURL = "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable"

// maxOpenConns for handles given to tests: enough for concurrency tests with
// many goroutines, small enough that parallel test processes fit the
// server's default max_connections of 100.
const maxOpenConns = 10

// setupTimeout bounds creating, migrating and dropping one database.
const setupTimeout = 2 * time.Minute

const startHint = `PostgreSQL is not reachable at %s: %v

The tests need a real PostgreSQL server (they never skip). With the PostgreSQL
package installed (apt-get install -y postgresql), make test starts a private one
when none answers, and so does
    go run ./cmd/tally-devdb -- go test ./...
Or start the local one with
    pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start
or point %s at a server where the user may CREATE DATABASE.`

// One admin pool per test process, for CREATE and DROP DATABASE only.
var admin struct {
	once    sync.Once
	db      *sql.DB
	baseURL *url.URL
	err     error
}

func adminDB(t testing.TB) (*sql.DB, *url.URL) {
	t.Helper()
	admin.once.Do(func() {
		raw := os.Getenv(EnvURL)
		if raw == "" {
			raw = DefaultURL
		}
		u, err := url.Parse(raw)
		if err != nil || (u.Scheme != "postgres" && u.Scheme != "postgresql") {
			admin.err = fmt.Errorf("%s=%q must be a postgres:// URL", EnvURL, raw)
			return
		}
		admin.baseURL = u
		pool, err := sql.Open("pgx", raw)
		if err != nil {
			admin.err = fmt.Errorf(startHint, redact(u), err, EnvURL)
			return
		}
		pool.SetMaxOpenConns(4)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := pool.PingContext(ctx); err != nil {
			_ = pool.Close()
			admin.err = fmt.Errorf(startHint, redact(u), err, EnvURL)
			return
		}
		admin.db = pool
	})
	if admin.err != nil {
		t.Fatalf("dbtest: %v", admin.err)
	}
	return admin.db, admin.baseURL
}

func redact(u *url.URL) string { return u.Redacted() }

// create makes an empty database and registers its removal; it returns the
// database's URL.
func create(t testing.TB) string {
	t.Helper()
	pool, base := adminDB(t)
	var b [8]byte
	if _, err := rand.Read(b[:]); err != nil {
		t.Fatalf("dbtest: %v", err)
	}
	name := "tally_test_" + hex.EncodeToString(b[:])
	ctx, cancel := context.WithTimeout(context.Background(), setupTimeout)
	defer cancel()
	if _, err := pool.ExecContext(ctx, "CREATE DATABASE "+name); err != nil {
		t.Fatalf("dbtest: create database %s on %s: %v", name, redact(base), err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), setupTimeout)
		defer cancel()
		// FORCE ends connections a test leaked (a server still shutting down).
		if _, err := pool.ExecContext(ctx, "DROP DATABASE IF EXISTS "+name+" WITH (FORCE)"); err != nil {
			t.Errorf("dbtest: drop database %s: %v", name, err)
		}
	})
	u := *base
	u.Path = "/" + name
	return u.String()
}

// New returns a gorm handle (opened by db.Open) on a fresh database with all
// migrations applied. The handle is closed and the database dropped when the
// test ends.
func New(t testing.TB) *gorm.DB {
	t.Helper()
	dbURL := create(t)
	gdb := open(t, dbURL)
	ctx, cancel := context.WithTimeout(context.Background(), setupTimeout)
	defer cancel()
	if err := db.Migrate(ctx, gdb); err != nil {
		t.Fatalf("dbtest: migrate: %v", err)
	}
	return gdb
}

// NewURL returns the URL of a fresh, migrated database, for tests that start
// the real binary. The database is dropped when the test ends.
func NewURL(t testing.TB) string {
	t.Helper()
	dbURL := create(t)
	gdb := openLogged(t, dbURL, slog.New(slog.DiscardHandler))
	ctx, cancel := context.WithTimeout(context.Background(), setupTimeout)
	defer cancel()
	err := db.Migrate(ctx, gdb)
	if cerr := db.Close(gdb); err == nil && cerr != nil {
		err = cerr
	}
	if err != nil {
		t.Fatalf("dbtest: migrate: %v", err)
	}
	return dbURL
}

// NewEmptyURL returns the URL of a fresh database without any migration
// applied (for testing `tally migrate` and auto-migration). The database is
// dropped when the test ends.
func NewEmptyURL(t testing.TB) string {
	t.Helper()
	return create(t)
}

// Logger returns a logger that writes to the test's log (shown on failure or
// with -v) until the test ends, and discards afterwards, so background
// goroutines that outlive a test cannot make it panic.
func Logger(t testing.TB) *slog.Logger {
	w := &testWriter{t: t}
	t.Cleanup(w.stop)
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: slog.LevelInfo}))
}

func open(t testing.TB, dbURL string) *gorm.DB {
	t.Helper()
	return openLogged(t, dbURL, Logger(t))
}

func openLogged(t testing.TB, dbURL string, logger *slog.Logger) *gorm.DB {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), setupTimeout)
	defer cancel()
	gdb, err := db.Open(ctx, dbURL, maxOpenConns, logger)
	if err != nil {
		t.Fatalf("dbtest: open %s: %v", dbURL, err)
	}
	// Registered after create's drop, so it runs before it.
	t.Cleanup(func() { _ = db.Close(gdb) })
	return gdb
}

type testWriter struct {
	mu   sync.Mutex
	t    testing.TB
	done bool
}

func (w *testWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.done {
		w.t.Helper()
		w.t.Log(strings.TrimSuffix(string(p), "\n"))
	}
	return len(p), nil
}

func (w *testWriter) stop() {
	w.mu.Lock()
	w.done = true
	w.mu.Unlock()
}
