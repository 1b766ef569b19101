package db_test

import (
	"bytes"
	"context"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/db/dbtest"
)

// lockedBuffer is a log sink safe for the pool's goroutines.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) take() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	s := b.buf.String()
	b.buf.Reset()
	return s
}

// TestFailedQueriesNeverLogBoundValues runs failing queries down every path
// gorm has (Exec, Raw with Scan, the query builder's Find, Take, Count,
// Create, Updates and Delete, a violated constraint, a timeout, a value
// PostgreSQL cannot read) with customer data bound to them, and checks that
// the failure is logged and no bound value is.
func TestFailedQueriesNeverLogBoundValues(t *testing.T) {
	t.Parallel()
	dbURL := dbtest.NewURL(t)
	var out lockedBuffer
	logger := slog.New(slog.NewJSONHandler(&out, &slog.HandlerOptions{Level: slog.LevelDebug}))
	gdb, err := db.Open(context.Background(), dbURL, 2, logger)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close(gdb)
	if err := gdb.Exec(`CREATE TABLE people (id bigint PRIMARY KEY, email text NOT NULL UNIQUE,
		age bigint NOT NULL CONSTRAINT people_age_positive CHECK (age > 0))`).Error; err != nil {
		t.Fatal(err)
	}
	if err := gdb.Exec(`INSERT INTO people VALUES (1, 'taken@example.com', 30)`).Error; err != nil {
		t.Fatal(err)
	}
	out.take()

	const (
		email  = "secret.person@example.com"
		number = int64(4242424242)
	)
	type person struct {
		ID    int64
		Email string
		Age   int64
	}
	people := func() *gorm.DB { return gdb.Table("people") }
	for _, c := range []struct {
		name string
		run  func() error
	}{
		{"Exec", func() error {
			return gdb.Exec(`UPDATE people SET email = ? WHERE id = 1/0 AND age = ?`, email, number).Error
		}},
		{"Raw+Scan", func() error {
			var ps []person
			return gdb.Raw(`SELECT id, email, age FROM people WHERE email = ? AND id = ? AND 1/0 = 1`, email, number).Scan(&ps).Error
		}},
		{"Raw+Scan into a value", func() error {
			var n int64
			return gdb.Raw(`SELECT count(*) FROM people WHERE email = ? AND id = ? AND 1/0 = 1`, email, number).Scan(&n).Error
		}},
		{"Find", func() error {
			var ps []person
			return people().Where("email = ? AND id = ? AND 1/0 = 1", email, number).Find(&ps).Error
		}},
		{"Take", func() error {
			var p person
			return people().Where("email = ? AND id = ? AND 1/0 = 1", email, number).Take(&p).Error
		}},
		{"Count", func() error {
			var n int64
			return people().Where("email = ? AND id = ? AND 1/0 = 1", email, number).Count(&n).Error
		}},
		{"Updates", func() error {
			return people().Where("id = ? AND 1/0 = 1", number).Updates(map[string]any{"email": email}).Error
		}},
		{"Delete", func() error {
			return people().Where("email = ? AND id = ? AND 1/0 = 1", email, number).Delete(nil).Error
		}},
		{"Create of a struct", func() error {
			return people().Create(&person{ID: number, Email: "taken@example.com", Age: number}).Error
		}},
		{"unique violation", func() error {
			return gdb.Exec(`INSERT INTO people VALUES (?, ?, ?)`, number, "taken@example.com", number).Error
		}},
		{"check violation", func() error {
			return gdb.Exec(`INSERT INTO people VALUES (?, ?, -1)`, number, email).Error
		}},
		{"not-null violation with Create", func() error {
			return gdb.Table("people").Create(map[string]any{"id": number, "email": email, "age": nil}).Error
		}},
		{"timeout", func() error {
			ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
			defer cancel()
			var ps []person
			return gdb.WithContext(ctx).Raw(`SELECT id, email, age FROM people WHERE email <> ? AND id <> ? AND pg_sleep(5) IS NOT NULL`, email, number).Scan(&ps).Error
		}},
		{"a value PostgreSQL cannot read", func() error {
			var n int64
			return gdb.Raw(`SELECT count(*) FROM people WHERE id = ?::text::bigint`, email).Scan(&n).Error
		}},
		{"a value pgx cannot encode", func() error {
			var n int64
			return gdb.Raw(`SELECT count(*) FROM people WHERE age::int4 = ? AND email <> ?`, number, email).Scan(&n).Error
		}},
		{"ExecDirect", func() error {
			_, err := db.ExecDirect(context.Background(), gdb, `UPDATE people SET email = $1 WHERE id = 1/0 AND age = $2`, email, number)
			return err
		}},
		{"ScanDirect", func() error {
			var n int64
			_, err := db.ScanDirect(context.Background(), gdb, `SELECT count(*) FROM people WHERE email = $1 AND id = $2 AND 1/0 = 1`,
				[]any{email, number}, &n)
			return err
		}},
		{"ScanDirect of a violated constraint in a transaction", func() error {
			return gdb.Transaction(func(tx *gorm.DB) error {
				var id int64
				_, err := db.ScanDirect(context.Background(), tx, `INSERT INTO people VALUES ($1, $2, $3) RETURNING id`,
					[]any{number, "taken@example.com", number}, &id)
				return err
			})
		}},
		{"a value in a transaction", func() error {
			return gdb.Transaction(func(tx *gorm.DB) error {
				var ps []person
				return tx.Raw(`SELECT id FROM people WHERE email = ? AND id = ? AND 1/0 = 1`, email, number).Scan(&ps).Error
			})
		}},
	} {
		t.Run(c.name, func(t *testing.T) {
			err := c.run()
			if err == nil {
				t.Fatal("the query did not fail")
			}
			logged := out.take()
			if !strings.Contains(logged, "database query failed") {
				t.Fatalf("the failure (%v) was not logged: %s", err, logged)
			}
			for _, secret := range []string{"secret.person", "4242424242", "taken@example"} {
				if strings.Contains(logged, secret) {
					t.Fatalf("a bound value (%s) reached the log:\n%s", secret, logged)
				}
			}
			if !strings.Contains(logged, `"sql"`) {
				t.Fatalf("the log does not say which query failed: %s", logged)
			}
		})
	}
}

// TestFailedQueryLogsTheStatementAsSent: the logged SQL is the statement
// PostgreSQL received, its placeholders in place of the values and the
// literals the code wrote kept, so an operator can find the query.
func TestFailedQueryLogsTheStatementAsSent(t *testing.T) {
	t.Parallel()
	dbURL := dbtest.NewURL(t)
	var out lockedBuffer
	logger := slog.New(slog.NewJSONHandler(&out, &slog.HandlerOptions{Level: slog.LevelDebug}))
	gdb, err := db.Open(context.Background(), dbURL, 2, logger)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close(gdb)
	var n int64
	if err := gdb.Raw(`SELECT count(*) FROM idempotency_keys WHERE scope = 'fixed:scope' AND key = ? AND 1/0 = 1`, "secret-key").Scan(&n).Error; err == nil {
		t.Fatal("the query did not fail")
	}
	logged := out.take()
	const want = `SELECT count(*) FROM idempotency_keys WHERE scope = 'fixed:scope' AND key = $1 AND 1/0 = 1`
	if !strings.Contains(logged, want) {
		t.Fatalf("the log does not hold the statement as sent (%s):\n%s", want, logged)
	}
	if strings.Contains(logged, "secret-key") {
		t.Fatalf("a bound value reached the log:\n%s", logged)
	}
}
