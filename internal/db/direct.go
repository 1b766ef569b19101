package db

import (
	"context"
	"database/sql"
	"errors"
	"time"

	"gorm.io/gorm"
)

// Direct statements: a hot statement written with PostgreSQL's own
// placeholders ($1, $2, ...) runs on gdb's connection, the pool or the
// transaction gdb is, through database/sql as gorm would run it, but
// without gorm's statement building. gorm copies its statement for every
// call and writes a Raw statement's text out again byte by byte to turn
// each ? into $n; for the long statements of a credited webhook payment
// (the confirmation, the grant: over a kilobyte each) that building was a
// third of the bytes the server allocated per payment and a tenth of its
// CPU, for a text that never changes.
//
// The arguments go to the driver as gorm passes them (pgx encodes them,
// and caches the prepared statement by its text), so only plain values
// may be given: no slice to expand into a list (pass an array, Array),
// no gorm expression. A failure is logged as gorm logs one (Open's
// logger: never a bound value), a statement that returns no row is not
// a failure.

// ExecDirect runs a statement that returns no rows and answers how many
// rows it affected.
func ExecDirect(ctx context.Context, gdb *gorm.DB, query string, args ...any) (int64, error) {
	begin := time.Now()
	res, err := gdb.Statement.ConnPool.ExecContext(ctx, query, args...)
	var rows int64
	if err == nil {
		rows, err = res.RowsAffected()
	}
	trace(ctx, gdb, begin, query, rows, err)
	return rows, err
}

// ScanDirect runs a query and scans the first row it returns into dest,
// one destination a column; found is false, with no error, when it
// returns none.
func ScanDirect(ctx context.Context, gdb *gorm.DB, query string, args []any, dest ...any) (found bool, err error) {
	begin := time.Now()
	err = gdb.Statement.ConnPool.QueryRowContext(ctx, query, args...).Scan(dest...)
	if errors.Is(err, sql.ErrNoRows) {
		trace(ctx, gdb, begin, query, 0, nil)
		return false, nil
	}
	var rows int64
	if err == nil {
		rows = 1
	}
	trace(ctx, gdb, begin, query, rows, err)
	return err == nil, err
}

// trace hands a direct statement to gorm's logger, as gorm does for its
// own statements.
func trace(ctx context.Context, gdb *gorm.DB, begin time.Time, query string, rows int64, err error) {
	if gdb.Logger == nil {
		return
	}
	gdb.Logger.Trace(ctx, begin, func() (string, int64) { return query, rows }, err)
}
