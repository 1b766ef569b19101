// Package db is tally's one way into PostgreSQL: opening the pool through
// gorm, the embedded schema migrations, the transaction helper, translation
// of database errors into the errs vocabulary, and the idempotency-key table
// that every money-moving request is guarded by.
//
// # How the code talks to the database
//
// gorm is the database layer, used as one; these are the conventions every
// package follows.
//
//   - A table's row struct (its model) lives in the package that owns the
//     table, unexported where it can be, named after the row (customerRow,
//     grantRow) and with a TableName method. It carries the columns and gorm
//     tags only: no json tags and no domain behaviour; the package converts
//     it to its domain type. Fields named CreatedAt or UpdatedAt are tagged
//     autoCreateTime:false / autoUpdateTime:false: times come from the
//     injected clock or the database, never from gorm's own time.Now. A
//     column the database fills (an identity, a txid) is tagged "->".
//   - Plain statements use gorm's builder: a read by key or by a simple
//     filter (Where, then Take, First or Find; Take's gorm.ErrRecordNotFound
//     is translated where the query runs, usually into errs.NotFound), an
//     insert (Create, with clause.OnConflict where the statement had ON
//     CONFLICT), an update by key (Model(&row{}).Where(...).Updates(map) or
//     UpdateColumn, with gorm.Expr for the database's clock or arithmetic on
//     a column), a delete by key. Updates take a map, never a struct, so a
//     zero value is written and not skipped.
//   - The set-based money statements stay SQL, run with Raw or Exec: draws
//     across grants, claims with FOR UPDATE SKIP LOCKED and MATERIALIZED
//     CTEs, the event feed's horizon, purges, reconciliation aggregates and
//     verify's checks. They say why in a comment.
//   - One placeholder style: ?, as gorm's builder writes it. A long statement
//     that uses a value more than once binds it once in a leading CTE
//     (WITH p AS (SELECT ?::text AS customer, ?::bigint AS amount)) and
//     refers to p.customer. The exception is a direct statement (ExecDirect,
//     ScanDirect): a statement of a hot path, run on the pool or the
//     transaction gorm holds but without gorm's statement building, written
//     as PostgreSQL receives it, with $1, $2, as a constant. Its comment
//     says why.
//   - Results are scanned with Scan into a small struct, a slice of them or
//     a single value; "no row" is RowsAffected == 0 (Scan) or
//     gorm.ErrRecordNotFound (Take, First), handled explicitly where the
//     query runs. Row().Scan is not used: its query runs, and fails, after
//     gorm has logged it, so its failures would go unlogged.
//   - A transaction is InTx (or InSnapshot for a consistent read). A
//     function that must run inside its caller's transaction takes that tx
//     as a *gorm.DB parameter and never calls InTx; InTx refuses a
//     transaction.
//   - Errors are translated where the query runs: Translate, with the
//     constraint names the statement may violate and the code each means.
//   - No bound value ever reaches a log line: the dialector logs every
//     statement as it was sent, placeholders and all (see Open), and the
//     logger masks what an error message quotes.
//   - gorm's implicit transactions stay off (SkipDefaultTransaction) and so
//     does its statement cache (PrepareStmt): pgx already caches every
//     statement per connection. Nothing reads gorm's internals beyond its
//     exported connection (Statement.ConnPool) and logger, which the
//     direct statements use as gorm's own statements do.
package db

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgtype"
	"github.com/jackc/pgx/v5/stdlib"
	"gorm.io/driver/postgres"
	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/errs"
)

// Pool settings that do not deserve a knob: connections are recycled every
// half hour so a failover or a PgBouncer restart is absorbed without a deploy.
const (
	connMaxLifetime = 30 * time.Minute
	connMaxIdleTime = 5 * time.Minute
)

// Open connects to the PostgreSQL database at url and checks it answers
// within ctx. Queries run without gorm's implicit transactions and as
// prepared statements (pgx's cache); failed queries are logged to logger
// (not-found and expected constraint violations only at debug level), and
// never with a value bound to them.
//
// Errors: errs.Invalid for a URL that does not parse or a pool size below 1;
// errs.Unavailable when the database cannot be reached.
func Open(ctx context.Context, url string, maxOpenConns int, logger *slog.Logger) (*gorm.DB, error) {
	if maxOpenConns < 1 {
		return nil, errs.E(errs.Invalid, "database pool size must be at least 1, got %d", maxOpenConns)
	}
	if _, err := pgconn.ParseConfig(url); err != nil {
		return nil, errs.Wrap(err, errs.Invalid, "database URL does not parse")
	}
	gdb, err := gorm.Open(dialector{&postgres.Dialector{Config: &postgres.Config{DSN: url,
		// Connections an outage killed are dropped before reuse (stale.go).
		OptionOpenDB: []stdlib.OptionOpenDB{stdlib.OptionShouldPing(pingStale), stdlib.OptionAfterConnect(readTimesInUTC)}}}}, &gorm.Config{
		SkipDefaultTransaction: true,
		// pgx already prepares and caches every statement per connection
		// (QueryExecModeCacheStatement); gorm's own cache on top re-prepared
		// through database/sql inside transactions and halved consume
		// throughput in the benchmark (552 vs 1090 req/s).
		PrepareStmt: false,
		// gorm's own ping has no context and could hang; we ping below.
		DisableAutomaticPing: true,
		// A read into a row struct selects that struct's columns by name,
		// not *: the log shows what was read, and a wide column (a stored
		// payload) is fetched only by the struct that holds it.
		QueryFields: true,
		Logger:      slogGorm{log: logger},
	})
	if err != nil {
		return nil, fmt.Errorf("db: open: %w", err)
	}
	sqlDB, err := gdb.DB()
	if err != nil {
		return nil, fmt.Errorf("db: open: %w", err)
	}
	sqlDB.SetMaxOpenConns(maxOpenConns)
	// As many idle as open: under load a smaller idle pool closes and reopens
	// connections on every burst.
	sqlDB.SetMaxIdleConns(maxOpenConns)
	sqlDB.SetConnMaxLifetime(connMaxLifetime)
	sqlDB.SetConnMaxIdleTime(connMaxIdleTime)
	if err := sqlDB.PingContext(ctx); err != nil {
		_ = sqlDB.Close()
		if errors.Is(err, context.Canceled) {
			return nil, err
		}
		return nil, errs.Wrap(err, errs.Unavailable, "database unreachable")
	}
	return gdb, nil
}

// readTimesInUTC makes conn return every timestamptz it reads in UTC, as
// the times tally makes are: pgx returns them in the process's zone, so a
// server on a host not on UTC answered times read back from the database
// with that host's offset (the same instant, written otherwise than every
// other time it answers).
func readTimesInUTC(_ context.Context, conn *pgx.Conn) error {
	conn.TypeMap().RegisterType(&pgtype.Type{Name: "timestamptz", OID: pgtype.TimestamptzOID,
		Codec: &pgtype.TimestamptzCodec{ScanLocation: time.UTC}})
	return nil
}

// Ping checks that gdb's database answers within ctx (readiness, the
// tally_db_up gauge). The error is the driver's, untranslated.
func Ping(ctx context.Context, gdb *gorm.DB) error {
	sqlDB, err := gdb.DB()
	if err != nil {
		return err
	}
	err = sqlDB.PingContext(ctx)
	if err != nil && !errors.Is(err, context.Canceled) {
		noteConnectionLost()
	}
	return err
}

// Close releases gdb's pool.
func Close(gdb *gorm.DB) error {
	sqlDB, err := gdb.DB()
	if err != nil {
		return err
	}
	return sqlDB.Close()
}

// NullIfEmpty is s as the value of a nullable text column, for an insert
// or an update from a map: NULL when s is empty, as SQL's NULLIF of s and
// the empty string would say, so an absent Stripe id or reason is stored
// as absent, never as "", and a unique column may hold many of them.
func NullIfEmpty(s string) *string {
	if s == "" {
		return nil
	}
	return &s
}

// dialector is gorm's PostgreSQL dialector, except that it explains (writes
// out for the log) a statement as it was sent, with $1, $2 where the values
// go. gorm's own Explain writes the values in, and one path (Scan, which
// records its SQL through a logger of its own) does so whatever the
// logger's ParamsFilter says; Explain is the one place every path goes
// through, so keeping it value-free keeps them all value-free.
type dialector struct{ *postgres.Dialector }

// Explain returns sql unchanged, without vars.
func (dialector) Explain(sql string, _ ...any) string { return sql }
