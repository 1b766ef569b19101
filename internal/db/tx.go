package db

import (
	"context"
	"database/sql"
	"errors"
	"math/rand/v2"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"gorm.io/gorm"
)

// txAttempts bounds how often InTx runs fn when PostgreSQL aborts the
// transaction for a serialization failure, a deadlock or a statement a
// migration changed under it.
const txAttempts = 4

// errNested is InTx's answer when given a transaction instead of the pool.
var errNested = errors.New("db: InTx called inside a transaction; a function that runs in its caller's transaction takes tx and never calls InTx")

// InTx runs fn in one database transaction bound to ctx and commits it.
// It rolls back when fn returns an error or panics (and re-panics), and
// returns the commit's error if the commit fails. When PostgreSQL aborts the
// transaction with a serialization failure (40001), a deadlock (40P01) or a
// statement prepared before a migration changed its result's columns
// ("cached plan must not change result type", 0A000: each connection of a
// server running through a migration meets it once per such statement, and
// pgx prepares the statement again on its next run), the whole of fn runs
// again, a few times, after a short jittered pause; fn must
// therefore keep no effects outside tx that a retry would repeat.
//
// gdb must be the pool, not a transaction: InTx always begins a transaction
// of its own, and called with one it returns an error without running fn.
// Code that runs inside its caller's transaction takes that tx instead.
//
// The error goes through Translate: codes already set by fn pass unchanged,
// lost connections become errs.Unavailable.
func InTx(ctx context.Context, gdb *gorm.DB, fn func(tx *gorm.DB) error) error {
	var err error
	for attempt := 1; ; attempt++ {
		err = runTx(ctx, gdb, nil, fn)
		if err == nil || attempt == txAttempts || !retryableTxError(err) {
			break
		}
		if waitErr := backoff(ctx, attempt); waitErr != nil {
			break
		}
	}
	return Translate(err, nil)
}

// InSnapshot runs fn in one read-only REPEATABLE READ transaction, so every
// query fn makes sees the same consistent snapshot of a live database (the
// invariant checks of `tally verify`). Like InTx it refuses a gdb that is
// already a transaction; it never retries (a read-only snapshot cannot
// fail to serialize). Errors are translated.
func InSnapshot(ctx context.Context, gdb *gorm.DB, fn func(tx *gorm.DB) error) error {
	return Translate(runTx(ctx, gdb, &sql.TxOptions{Isolation: sql.LevelRepeatableRead, ReadOnly: true}, fn), nil)
}

// runTx is one attempt: begin (with opts, when given), fn, commit; rollback
// when fn fails or panics.
func runTx(ctx context.Context, gdb *gorm.DB, opts *sql.TxOptions, fn func(tx *gorm.DB) error) (err error) {
	var tx *gorm.DB
	if opts != nil {
		tx = gdb.WithContext(ctx).Begin(opts)
	} else {
		tx = gdb.WithContext(ctx).Begin()
	}
	if tx.Error != nil {
		// gorm can begin only on the pool: a transaction cannot begin another.
		if errors.Is(tx.Error, gorm.ErrInvalidTransaction) {
			return errNested
		}
		return tx.Error
	}
	panicked := true
	defer func() {
		if panicked || err != nil {
			// The rollback's own error changes nothing: the transaction is
			// over either way, and fn's error (or panic) is the news.
			tx.Rollback()
		}
	}()
	err = fn(tx)
	panicked = false
	if err != nil {
		return err
	}
	return tx.Commit().Error
}

func retryableTxError(err error) bool {
	var pgErr *pgconn.PgError
	return errors.As(err, &pgErr) && (pgErr.Code == serializationFailure || pgErr.Code == deadlockDetected || cachedPlanChanged(pgErr))
}

// backoff sleeps 5ms·2^(attempt-1) plus as much jitter, so transactions that
// collided once do not collide again in lockstep.
func backoff(ctx context.Context, attempt int) error {
	base := 5 * time.Millisecond << (attempt - 1)
	d := base + rand.N(base)
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}
