package db

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/jackc/pgx/v5/pgconn"
	"gorm.io/gorm"
	gormlogger "gorm.io/gorm/logger"
)

// slogGorm routes gorm's log to slog. gorm's chatter (info, warnings, slow
// queries) is dropped; failed queries are logged with their SQL and error,
// but never a value bound to them, which may hold customer data (ids,
// emails, metadata, amounts).
//
// The SQL it is given holds no values: Open's dialector explains every
// statement as it was sent, with its placeholders. Errors of PostgreSQL and
// pgx may quote a value they could not use, so the error text is masked
// (see safeErrorText).
type slogGorm struct{ log *slog.Logger }

var _ gormlogger.Interface = slogGorm{}

func (l slogGorm) LogMode(gormlogger.LogLevel) gormlogger.Interface { return l }
func (l slogGorm) Info(context.Context, string, ...any)             {}
func (l slogGorm) Warn(context.Context, string, ...any)             {}

// Error logs gorm's own errors (a misused API), which name no values.
func (l slogGorm) Error(ctx context.Context, msg string, args ...any) {
	if l.log != nil {
		l.log.ErrorContext(ctx, "gorm: "+fmt.Sprintf(msg, args...))
	}
}

func (l slogGorm) Trace(ctx context.Context, begin time.Time, fc func() (string, int64), err error) {
	if l.log == nil || err == nil || errors.Is(err, gorm.ErrRecordNotFound) {
		return
	}
	level := slog.LevelError
	if expectedQueryError(err) {
		level = slog.LevelDebug
	}
	if !l.log.Enabled(ctx, level) {
		return
	}
	sql, rows := fc()
	attrs := []slog.Attr{
		slog.String("err", safeErrorText(err)),
		slog.String("sql", sql),
		slog.Int64("rows", rows),
		slog.Duration("elapsed", time.Since(begin)),
	}
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && pgErr.ConstraintName != "" {
		attrs = append(attrs, slog.String("constraint", pgErr.ConstraintName))
	}
	l.log.LogAttrs(ctx, level, "database query failed", attrs...)
}

// safeErrorText is err's text without the values it may quote.
//
//   - PostgreSQL's own message names no value, except for data exceptions
//     (SQLSTATE class 22: "invalid input syntax for type bigint: "…""), whose
//     message is cut before the value and masked; identifiers in other
//     messages (constraint and column names) are kept, they are the point.
//   - A failed connection or a cancelled query names no value either.
//   - Anything else (pgx's "unable to encode 4242 into … int4", which
//     prints the value) has its quoted strings and numbers masked.
func safeErrorText(err error) string {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		msg := pgErr.Message
		if strings.HasPrefix(pgErr.Code, "22") {
			msg, _, _ = strings.Cut(msg, ": ")
			msg = maskLiterals(msg, `'"`)
		}
		return fmt.Sprintf("%s: %s (SQLSTATE %s)", pgErr.Severity, msg, pgErr.Code)
	}
	var connectErr *pgconn.ConnectError
	var opErr *net.OpError
	if errors.As(err, &connectErr) || errors.As(err, &opErr) ||
		errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return err.Error()
	}
	return maskLiterals(err.Error(), `'"`)
}

// maskLiterals replaces each literal of an error text s with "?": strings
// quoted with one of quotes (a doubled quote, as SQL writes it, and a
// backslash both escape a quote inside) and numbers that stand on their own.
// Placeholders ($1) and digits inside names (int4, args) are kept, so the
// text still says what it was about.
func maskLiterals(s, quotes string) string {
	var b strings.Builder
	b.Grow(len(s))
	inName := false // the previous rune continues a name or a placeholder
	for i := 0; i < len(s); {
		r, size := utf8.DecodeRuneInString(s[i:])
		switch {
		case r < utf8.RuneSelf && strings.IndexByte(quotes, byte(r)) >= 0:
			q := byte(r)
			b.WriteByte(q)
			b.WriteByte('?')
			b.WriteByte(q)
			i = endOfQuoted(s, i+1, q)
			inName = false
			continue
		case r >= '0' && r <= '9' && !inName:
			b.WriteByte('?')
			i = endOfNumber(s, i)
			inName = false
			continue
		}
		b.WriteString(s[i : i+size])
		inName = r == '_' || r == '$' || unicode.IsLetter(r) || unicode.IsDigit(r)
		i += size
	}
	return b.String()
}

// endOfQuoted is the index just past the quote q that closes the string
// opened before i (len(s) when it is never closed).
func endOfQuoted(s string, i int, q byte) int {
	for i < len(s) {
		switch s[i] {
		case '\\':
			i += 2
			continue
		case q:
			if i+1 < len(s) && s[i+1] == q { // a doubled quote stays inside
				i += 2
				continue
			}
			return i + 1
		}
		i++
	}
	return len(s)
}

// endOfNumber is the index just past the number starting at i: digits, an
// optional fraction and an optional exponent.
func endOfNumber(s string, i int) int {
	digits := func(i int) int {
		for i < len(s) && s[i] >= '0' && s[i] <= '9' {
			i++
		}
		return i
	}
	i = digits(i)
	if i+1 < len(s) && s[i] == '.' && s[i+1] >= '0' && s[i+1] <= '9' {
		i = digits(i + 1)
	}
	if i+1 < len(s) && (s[i] == 'e' || s[i] == 'E') {
		j := i + 1
		if j < len(s) && (s[j] == '+' || s[j] == '-') {
			j++
		}
		if j < len(s) && s[j] >= '0' && s[j] <= '9' {
			i = digits(j)
		}
	}
	return i
}

// expectedQueryError is true for failures that callers handle as ordinary
// outcomes: constraint violations (translated into conflicts), serialization
// failures (retried by InTx) and requests the client abandoned.
func expectedQueryError(err error) bool {
	if errors.Is(err, context.Canceled) {
		return true
	}
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		return strings.HasPrefix(pgErr.Code, "23") || pgErr.Code == serializationFailure || pgErr.Code == deadlockDetected
	}
	return false
}
