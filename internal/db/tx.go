package db

import (
	"context"
	"errors"
	"math/rand/v2"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"gorm.io/gorm"
)

// txAttempts bounds how often InTx runs fn when PostgreSQL aborts the
// transaction for a serialization failure or a deadlock.
const txAttempts = 4

// InTx runs fn in one database transaction bound to ctx and commits it.
// It rolls back when fn returns an error or panics (and re-panics), and
// returns the commit's error if the commit fails. When PostgreSQL aborts the
// transaction with a serialization failure (40001) or a deadlock (40P01), the
// whole of fn runs again, a few times, after a short jittered pause; fn must
// therefore keep no effects outside tx that a retry would repeat.
//
// Called with a gdb that is already a transaction, InTx runs fn inside a
// savepoint of it instead, without retries (the outermost InTx retries).
//
// The error goes through Translate: codes already set by fn pass unchanged,
// lost connections become errs.Unavailable.
func InTx(ctx context.Context, gdb *gorm.DB, fn func(tx *gorm.DB) error) error {
	if inTransaction(gdb) {
		return Translate(gdb.WithContext(ctx).Transaction(fn), nil)
	}
	var err error
	for attempt := 1; ; attempt++ {
		err = gdb.WithContext(ctx).Transaction(fn)
		if err == nil || attempt == txAttempts || !retryableTxError(err) {
			break
		}
		if waitErr := backoff(ctx, attempt); waitErr != nil {
			break
		}
	}
	return Translate(err, nil)
}

func inTransaction(gdb *gorm.DB) bool {
	if gdb.Statement == nil {
		return false
	}
	committer, ok := gdb.Statement.ConnPool.(gorm.TxCommitter)
	return ok && committer != nil
}

func retryableTxError(err error) bool {
	var pgErr *pgconn.PgError
	return errors.As(err, &pgErr) && (pgErr.Code == serializationFailure || pgErr.Code == deadlockDetected)
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
