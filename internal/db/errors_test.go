package db_test

import (
	"bytes"
	"context"
	"database/sql/driver"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/db/dbtest"
	"github.com/tallybilling/tally/internal/errs"
)

func TestTranslateRealConstraintViolations(t *testing.T) {
	t.Parallel()
	gdb := newItemsDB(t)
	mustExec(t, gdb, `INSERT INTO items (id, qty, sku) VALUES (1, 1, 'a')`)

	dupPK := gdb.Exec(`INSERT INTO items (id, qty) VALUES (1, 1)`).Error
	if err := db.Translate(dupPK, nil); !errs.Is(err, errs.Conflict) {
		t.Errorf("unique violation -> %v, want conflict", err)
	}
	var pgErr *pgconn.PgError
	if err := db.Translate(dupPK, nil); !errors.As(err, &pgErr) {
		t.Errorf("translation lost the cause: %v", err)
	}

	negative := gdb.Exec(`UPDATE items SET qty = -1 WHERE id = 1`).Error
	err := db.Translate(negative, nil)
	if !errs.Is(err, errs.Conflict) || !strings.Contains(err.Error(), "items_qty_nonneg") {
		t.Errorf("check violation -> %v, want conflict naming items_qty_nonneg", err)
	}

	// A domain names its constraints: a negative quantity is its own code.
	byConstraint := map[string]errs.Code{
		"items_qty_nonneg": errs.InsufficientCredits,
		"items_sku_key":    errs.Invalid,
	}
	if err := db.Translate(negative, byConstraint); !errs.Is(err, errs.InsufficientCredits) {
		t.Errorf("named check constraint -> %v, want insufficient_credits", err)
	}
	dupSKU := gdb.Exec(`INSERT INTO items (id, qty, sku) VALUES (2, 1, 'a')`).Error
	if err := db.Translate(dupSKU, byConstraint); !errs.Is(err, errs.Invalid) {
		t.Errorf("named unique constraint -> %v, want invalid_request", err)
	}
	// The map only applies to the constraints it names.
	if err := db.Translate(dupPK, byConstraint); !errs.Is(err, errs.Conflict) {
		t.Errorf("unnamed unique violation with a map -> %v, want conflict", err)
	}

	// Values the database cannot hold came from the caller: invalid_request.
	for name, query := range map[string]string{
		"NUL in text":      "SELECT E'a\\x00b'::text",
		"\\u0000 in jsonb": `SELECT '{"a":"\u0000"}'::jsonb`,
		"out of range":     `SELECT 99999999999999999999::bigint`,
		"bad date":         `SELECT '2026-13-45'::date`,
	} {
		err := db.Translate(gdb.Exec(query).Error, nil)
		if !errs.Is(err, errs.Invalid) {
			t.Errorf("%s -> %v, want invalid_request", name, err)
		}
	}
	badUTF8 := gdb.Exec(`SELECT ?::text`, "\xff\xfe").Error
	if err := db.Translate(badUTF8, nil); !errs.Is(err, errs.Invalid) {
		t.Errorf("bytes that are not UTF-8 -> %v, want invalid_request", err)
	}

	// Anything else stays internal and keeps its cause.
	syntax := gdb.Exec(`SELEKT 1`).Error
	if err := db.Translate(syntax, nil); errs.CodeOf(err) != errs.Internal || err != syntax {
		t.Errorf("syntax error -> %v, want unchanged", err)
	}
}

func TestTranslateClassifies(t *testing.T) {
	t.Parallel()
	coded := errs.E(errs.NotFound, "x")
	plain := errors.New("plain")
	cases := []struct {
		name string
		err  error
		want errs.Code
	}{
		{"admin shutdown", &pgconn.PgError{Code: "57P01"}, errs.Unavailable},
		{"crash shutdown", &pgconn.PgError{Code: "57P02"}, errs.Unavailable},
		{"starting up", &pgconn.PgError{Code: "57P03"}, errs.Unavailable},
		{"connection exception class", &pgconn.PgError{Code: "08006"}, errs.Unavailable},
		{"too many connections", &pgconn.PgError{Code: "53300"}, errs.Unavailable},
		{"statement cancelled (statement_timeout)", &pgconn.PgError{Code: "57014"}, errs.Unavailable},
		{"unique", &pgconn.PgError{Code: "23505", ConstraintName: "x_key"}, errs.Conflict},
		{"check", &pgconn.PgError{Code: "23514", ConstraintName: "x_check"}, errs.Conflict},
		{"not null stays internal", &pgconn.PgError{Code: "23502"}, errs.Internal},
		{"net.OpError", fmt.Errorf("query: %w", &net.OpError{Op: "read", Err: errors.New("connection reset")}), errs.Unavailable},
		{"unexpected EOF", fmt.Errorf("read: %w", io.ErrUnexpectedEOF), errs.Unavailable},
		{"bad conn", driver.ErrBadConn, errs.Unavailable},
		{"conn closed", fmt.Errorf("x: %w", pgconn.ErrConnClosed), errs.Unavailable},
		{"conn closed text", errors.New("conn closed"), errs.Unavailable},
		{"coded passes", coded, errs.NotFound},
		{"plain passes", plain, errs.Internal},
		{"deadline during a query stays internal", context.DeadlineExceeded, errs.Internal},
	}
	for _, tc := range cases {
		got := db.Translate(tc.err, nil)
		if errs.CodeOf(got) != tc.want {
			t.Errorf("%s: Translate(%v) = %v (code %s), want %s", tc.name, tc.err, got, errs.CodeOf(got), tc.want)
		}
		if !errors.Is(got, tc.err) {
			t.Errorf("%s: cause lost", tc.name)
		}
		if db.IsUnavailable(tc.err) != (tc.want == errs.Unavailable) {
			t.Errorf("%s: IsUnavailable = %v", tc.name, db.IsUnavailable(tc.err))
		}
	}
	if db.Translate(nil, nil) != nil {
		t.Error("Translate(nil) != nil")
	}
	if got := db.Translate(coded, nil); got != coded {
		t.Error("an *errs.Error was not returned unchanged")
	}
	canceled := fmt.Errorf("query: %w", context.Canceled)
	if got := db.Translate(canceled, nil); !errors.Is(got, context.Canceled) || errs.CodeOf(got) != errs.Internal {
		t.Errorf("cancellation -> %v, want it unchanged", got)
	}
}

func TestOpenUnreachableIsUnavailable(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	// Port 1 on loopback: nothing listens, the connection is refused at once.
	_, err := db.Open(ctx, "postgres://postgres@127.0.0.1:1/tally?sslmode=disable", 2, slog.New(slog.DiscardHandler))
	if !errs.Is(err, errs.Unavailable) {
		t.Fatalf("Open on a closed port = %v, want unavailable", err)
	}
	if !db.IsUnavailable(err) {
		t.Fatal("IsUnavailable false for an unreachable database")
	}
}

func TestOpenTimeoutWhileConnectingIsUnavailable(t *testing.T) {
	t.Parallel()
	// A listener that accepts and never answers: the connect deadline expires.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			defer c.Close()
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	_, err = db.Open(ctx, "postgres://postgres@"+ln.Addr().String()+"/tally?sslmode=disable", 2, slog.New(slog.DiscardHandler))
	if !errs.Is(err, errs.Unavailable) {
		t.Fatalf("Open against a silent server = %v, want unavailable", err)
	}
}

func TestOpenRejectsBadInput(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	if _, err := db.Open(ctx, "postgres://host:notaport/x", 2, slog.New(slog.DiscardHandler)); !errs.Is(err, errs.Invalid) {
		t.Errorf("bad URL -> %v, want invalid_request", err)
	}
	if _, err := db.Open(ctx, dbtest.DefaultURL, 0, slog.New(slog.DiscardHandler)); !errs.Is(err, errs.Invalid) {
		t.Errorf("pool size 0 -> %v, want invalid_request", err)
	}
}

func TestOpenLogsFailedQueriesWithoutArguments(t *testing.T) {
	t.Parallel()
	dbURL := dbtest.NewURL(t)
	var buf bytes.Buffer
	logger := slog.New(slog.NewJSONHandler(&buf, &slog.HandlerOptions{Level: slog.LevelDebug}))
	gdb, err := db.Open(context.Background(), dbURL, 2, logger)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close(gdb)

	var n int
	err = gdb.Raw(`SELECT 1/0 WHERE ? <> ''`, "card-4242-secret").Scan(&n).Error
	if err == nil {
		t.Fatal("division by zero succeeded")
	}
	out := buf.String()
	if !strings.Contains(out, "division by zero") || !strings.Contains(out, `"level":"ERROR"`) {
		t.Fatalf("failed query not logged as an error: %s", out)
	}
	if !strings.Contains(out, "$1") {
		t.Errorf("logged SQL lost its placeholder: %s", out)
	}
	if strings.Contains(out, "card-4242-secret") {
		t.Fatalf("query arguments leaked into the log: %s", out)
	}

	// Not-found is an ordinary outcome: not logged at all.
	buf.Reset()
	var row struct{ ID int }
	if err := gdb.Table("idempotency_keys").Select("1 AS id").Take(&row).Error; err == nil {
		t.Fatal("Take on an empty table found a row")
	}
	if buf.Len() != 0 {
		t.Errorf("record-not-found was logged: %s", buf.String())
	}
}
