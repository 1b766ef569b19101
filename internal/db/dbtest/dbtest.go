// Package dbtest gives each test its own fresh PostgreSQL database on the
// server named by TALLY_TEST_DATABASE_URL, with the real schema, dropped
// when the test ends. Tests never share state and never mock the database;
// when no server is reachable they fail, with a hint, never skip.
//
// A fresh database is a copy of a template (CREATE DATABASE ... TEMPLATE),
// not a migration run: the template is migrated once per server and set of
// migration files, and copying it takes a fraction of the time. Its name
// carries a digest of the migration files (db.MigrationsDigest), so a
// changed or added migration builds a new template and never reuses a stale
// one, and test binaries running at once (go test ./... runs packages in
// parallel, and other checkouts may share the server) build it under a
// PostgreSQL advisory lock: one builds, the others wait and copy.
package dbtest

import (
	"context"
	"crypto/rand"
	"database/sql"
	"encoding/hex"
	"errors"
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
// many goroutines, small enough that parallel test processes, each running
// parallel tests, fit the server's default max_connections of 100.
const maxOpenConns = 10

// templatePrefix names the migrated templates; the rest of the name is the
// start of the migrations' digest.
const templatePrefix = "tally_template_"

// templateLockID keys the advisory lock under which a template is built
// (crc32 of "tally test template"); distinct from the migration lock.
const templateLockID int64 = 1859266406

// setupTimeout bounds creating, migrating and dropping one database.
const setupTimeout = 2 * time.Minute

// startHint follows the error when no server answers; it is a message for
// a person, printed by Fatalf, not an error string.
const startHint = `

The tests need a real PostgreSQL server (they never skip). With the PostgreSQL
package installed (apt-get install -y postgresql), make test starts a private one
when none answers, and so does
    go run ./cmd/tally-devdb -- go test ./...
Or start the local one with
    pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start
or point %s at a server where the user may CREATE DATABASE.`

// One admin pool per test process, for CREATE and DROP DATABASE only, and
// the template its databases are copied from.
var admin struct {
	once    sync.Once
	db      *sql.DB
	baseURL *url.URL
	err     error
	// hint is startHint when err says the server did not answer.
	hint string

	templateOnce sync.Once
	template     string
	templateErr  error
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
		unreachable := func(err error) {
			admin.err = fmt.Errorf("postgresql is not reachable at %s: %w", redact(u), err)
			admin.hint = fmt.Sprintf(startHint, EnvURL)
		}
		pool, err := sql.Open("pgx", raw)
		if err != nil {
			unreachable(err)
			return
		}
		// Creates and drops, plus the one connection that holds the
		// template lock while another builds.
		pool.SetMaxOpenConns(4)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := pool.PingContext(ctx); err != nil {
			_ = pool.Close()
			unreachable(err)
			return
		}
		admin.db = pool
	})
	if admin.err != nil {
		t.Fatalf("dbtest: %v%s", admin.err, admin.hint)
	}
	return admin.db, admin.baseURL
}

// templateDB returns the name of the migrated template for this binary's
// migrations, building it on the server when no test process has yet.
func templateDB(t testing.TB) string {
	t.Helper()
	pool, base := adminDB(t)
	admin.templateOnce.Do(func() {
		admin.template, admin.templateErr = ensureTemplate(pool, base)
	})
	if admin.templateErr != nil {
		t.Fatalf("dbtest: template database: %v", admin.templateErr)
	}
	return admin.template
}

// ensureTemplate makes sure the template of the current migrations exists
// and returns its name. A template is complete once it is marked
// IS_TEMPLATE (and closed to connections, so copies never find a session in
// it); a database of that name without the mark is a build that died half
// way and is built again.
func ensureTemplate(pool *sql.DB, base *url.URL) (string, error) {
	digest, err := db.MigrationsDigest()
	if err != nil {
		return "", err
	}
	name := templatePrefix + digest[:16]
	ctx, cancel := context.WithTimeout(context.Background(), setupTimeout)
	defer cancel()
	ready := func(q interface {
		QueryRowContext(context.Context, string, ...any) *sql.Row
	}) (bool, error) {
		var isTemplate bool
		err := q.QueryRowContext(ctx, `SELECT datistemplate FROM pg_database WHERE datname = $1`, name).Scan(&isTemplate)
		if errors.Is(err, sql.ErrNoRows) {
			return false, nil
		}
		return isTemplate, err
	}
	if ok, err := ready(pool); err != nil || ok {
		return name, err
	}

	// A session-level lock, on one connection held until the build ends
	// (or the process dies, which releases it).
	conn, err := pool.Conn(ctx)
	if err != nil {
		return "", err
	}
	defer conn.Close()
	if _, err := conn.ExecContext(ctx, `SELECT pg_advisory_lock($1)`, templateLockID); err != nil {
		return "", fmt.Errorf("lock: %w", err)
	}
	defer func() { _, _ = conn.ExecContext(context.Background(), `SELECT pg_advisory_unlock($1)`, templateLockID) }()
	if ok, err := ready(conn); err != nil || ok {
		return name, err // another process built it while we waited
	}
	if _, err := conn.ExecContext(ctx, `DROP DATABASE IF EXISTS `+name+` WITH (FORCE)`); err != nil {
		return "", fmt.Errorf("drop the unfinished %s: %w", name, err)
	}
	if _, err := conn.ExecContext(ctx, `CREATE DATABASE `+name); err != nil {
		return "", fmt.Errorf("create %s: %w", name, err)
	}
	u := *base
	u.Path = "/" + name
	gdb, err := db.Open(ctx, u.String(), 1, slog.New(slog.DiscardHandler))
	if err != nil {
		return "", fmt.Errorf("open %s: %w", name, err)
	}
	err = db.Migrate(ctx, gdb)
	if cerr := db.Close(gdb); err == nil && cerr != nil {
		err = cerr
	}
	if err != nil {
		return "", fmt.Errorf("migrate %s: %w", name, err)
	}
	if _, err := conn.ExecContext(ctx, `ALTER DATABASE `+name+` WITH IS_TEMPLATE true ALLOW_CONNECTIONS false`); err != nil {
		return "", fmt.Errorf("mark %s a template: %w", name, err)
	}
	return name, nil
}

func redact(u *url.URL) string { return u.Redacted() }

// create makes a database, a copy of template (empty: the server's default
// template1), and registers its removal; it returns the database's URL.
func create(t testing.TB, template string) string {
	t.Helper()
	pool, base := adminDB(t)
	var b [8]byte
	if _, err := rand.Read(b[:]); err != nil {
		t.Fatalf("dbtest: %v", err)
	}
	name := "tally_test_" + hex.EncodeToString(b[:])
	ctx, cancel := context.WithTimeout(context.Background(), setupTimeout)
	defer cancel()
	stmt := "CREATE DATABASE " + name
	if template != "" {
		stmt += " TEMPLATE " + template
	}
	if _, err := pool.ExecContext(ctx, stmt); err != nil {
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
	return open(t, NewURL(t), maxOpenConns)
}

// NewOneConn is New with a pool of one connection: every statement runs on
// the same session, for tests of what a statement leaves on its session or
// keeps prepared there.
func NewOneConn(t testing.TB) *gorm.DB {
	t.Helper()
	return open(t, NewURL(t), 1)
}

// NewURL returns the URL of a fresh, migrated database, for tests that start
// the real binary. The database is dropped when the test ends.
func NewURL(t testing.TB) string {
	t.Helper()
	return create(t, templateDB(t))
}

// NewEmptyURL returns the URL of a fresh database without any migration
// applied (for testing `tally migrate` and auto-migration). The database is
// dropped when the test ends.
func NewEmptyURL(t testing.TB) string {
	t.Helper()
	return create(t, "")
}

// Logger returns a logger that writes to the test's log (shown on failure or
// with -v) until the test ends, and discards afterwards, so background
// goroutines that outlive a test cannot make it panic.
func Logger(t testing.TB) *slog.Logger {
	w := &testWriter{t: t}
	t.Cleanup(w.stop)
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: slog.LevelInfo}))
}

func open(t testing.TB, dbURL string, conns int) *gorm.DB {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), setupTimeout)
	defer cancel()
	gdb, err := db.Open(ctx, dbURL, conns, Logger(t))
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
