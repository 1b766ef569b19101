package db

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"io"
	"net"
	"strings"
	"syscall"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/tallybilling/tally/internal/errs"
)

// SQLSTATE codes we act on.
const (
	uniqueViolation      = "23505"
	checkViolation       = "23514"
	serializationFailure = "40001"
	deadlockDetected     = "40P01"
	queryCanceled        = "57014"
	featureNotSupported  = "0A000"
)

// Translate turns a database error into the errs vocabulary, where the query
// runs, so handlers never see a driver error:
//
//   - a violation of a constraint named in byConstraint gets that code
//     (this is how a domain says "duplicate email is a conflict" or "negative
//     balance is insufficient_credits");
//   - any other unique or check violation is errs.Conflict;
//   - a lost, refused or shut-down connection is errs.Unavailable, so clients
//     get 503 and retry, and is remembered so that the pool checks its
//     other connections before reuse (stale.go);
//   - a statement the server cancelled (SQLSTATE 57014: an operator's
//     statement_timeout, or pg_cancel_backend) is errs.Unavailable too: it
//     rolled back and may succeed if retried, so clients get 503, not a
//     500 that reads as tally's bug; the connection is fine;
//   - a statement prepared before a migration changed the type or the
//     collation of a column it returns ("cached plan must not change result
//     type", SQLSTATE 0A000; pgx drops the statement, so it is prepared
//     again on its next run) is errs.Unavailable: it did nothing, and the
//     retry succeeds (InTx retries it itself);
//   - a value the database cannot hold (SQLSTATE class 22: a NUL character,
//     bytes that are not UTF-8, a number out of range, a malformed date)
//     came from the caller, so it is errs.Invalid, not an internal error;
//   - an error that already carries a code, a cancelled context and anything
//     else are returned unchanged (anything else is internal).
func Translate(err error, byConstraint map[string]errs.Code) error {
	if err == nil {
		return nil
	}
	if _, ok := errs.As(err); ok {
		return err
	}
	// The client went away; not the database's fault, and not worth a 503.
	if errors.Is(err, context.Canceled) {
		return err
	}
	// Whatever stopped the connection from forming (refused, timed out, the
	// server's FATAL at startup such as a missing database), the request
	// cannot be served now.
	var connectErr *pgconn.ConnectError
	if errors.As(err, &connectErr) {
		noteConnectionLost()
		return errs.Wrap(err, errs.Unavailable, "database unavailable")
	}
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		if code, ok := byConstraint[pgErr.ConstraintName]; ok && pgErr.ConstraintName != "" {
			return errs.Wrap(err, code, "violates %s", pgErr.ConstraintName)
		}
		switch {
		case pgErr.Code == uniqueViolation:
			return errs.Wrap(err, errs.Conflict, "already exists (%s)", pgErr.ConstraintName)
		case pgErr.Code == checkViolation:
			return errs.Wrap(err, errs.Conflict, "violates check constraint %s", pgErr.ConstraintName)
		case unavailableSQLState(pgErr.Code):
			noteConnectionLost()
			return errs.Wrap(err, errs.Unavailable, "database unavailable")
		case pgErr.Code == queryCanceled:
			return errs.Wrap(err, errs.Unavailable, "the database cancelled the statement: %s", pgErr.Message)
		case cachedPlanChanged(pgErr):
			return errs.Wrap(err, errs.Unavailable, "a migration changed a table under a prepared statement; retry")
		case strings.HasPrefix(pgErr.Code, "22"):
			return errs.Wrap(err, errs.Invalid, "a value cannot be stored: %s", pgErr.Message)
		}
		return err
	}
	if connectionFailure(err) {
		noteConnectionLost()
		return errs.Wrap(err, errs.Unavailable, "database unavailable")
	}
	return err
}

// IsCanceledStatement reports whether err is a statement the server
// cancelled (statement_timeout, pg_cancel_backend): unavailable for the
// caller, but the database is reachable, and a smaller statement may pass.
func IsCanceledStatement(err error) bool {
	var pgErr *pgconn.PgError
	return errors.As(err, &pgErr) && pgErr.Code == queryCanceled
}

// IsUnavailable reports whether err means the database could not be reached
// (after translation), i.e. whether the request may succeed if retried later.
func IsUnavailable(err error) bool {
	return errs.Is(Translate(err, nil), errs.Unavailable)
}

// cachedPlanChanged: a statement prepared on this connection before a
// migration changed its result's columns (their type or collation, as
// a trial migration did to usage_events' names), refused by PostgreSQL
// before it ran.
func cachedPlanChanged(pgErr *pgconn.PgError) bool {
	return pgErr.Code == featureNotSupported && strings.HasPrefix(pgErr.Message, "cached plan must not change result type")
}

// unavailableSQLState: the server told us it cannot serve us right now.
func unavailableSQLState(code string) bool {
	switch {
	case strings.HasPrefix(code, "08"): // connection exception
		return true
	case code == "57P01", // admin_shutdown
		code == "57P02", // crash_shutdown
		code == "57P03", // cannot_connect_now (starting up, recovery)
		code == "53300", // too_many_connections
		code == "25006": // read_only_sql_transaction: a write reached a demoted primary during failover
		return true
	}
	return false
}

// connectionFailure: the client side of the connection broke.
func connectionFailure(err error) bool {
	var opErr *net.OpError
	if errors.As(err, &opErr) {
		return true
	}
	switch {
	case errors.Is(err, io.ErrUnexpectedEOF),
		errors.Is(err, driver.ErrBadConn),
		errors.Is(err, sql.ErrConnDone),
		errors.Is(err, pgconn.ErrConnClosed),
		errors.Is(err, syscall.ECONNREFUSED),
		errors.Is(err, syscall.ECONNRESET),
		errors.Is(err, syscall.EPIPE):
		return true
	}
	// pgx reports some closed-connection cases only in the message.
	return strings.Contains(err.Error(), "conn closed")
}
