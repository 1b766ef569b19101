package db

import (
	"context"
	"database/sql/driver"
	"fmt"
	"hash/crc32"

	"gorm.io/gorm"
)

// LockKey is the advisory lock key of a named background job: the crc32
// of its name, so each job has its own and none collides with the
// migrations' lock.
func LockKey(name string) int64 { return int64(crc32.ChecksumIEEE([]byte("tally " + name))) }

// TryExclusive runs fn while this process holds the PostgreSQL session
// advisory lock key, so that one replica at a time runs a job however many
// run the schedule. It answers ran=false at once when another holds it.
// The lock lives on one pooled connection held for the whole run; if the
// process dies the connection closes and PostgreSQL frees the lock.
//
// fn works through the pool meanwhile, so a run holds one connection and
// asks for another. That cannot exhaust the pool only because few jobs do
// it (config.MinDBOpenConns counts them) and nothing else does: a caller
// that holds a connection (a transaction, a lock) never asks the pool for
// a second.
func TryExclusive(ctx context.Context, gdb *gorm.DB, key int64, fn func(ctx context.Context) error) (ran bool, err error) {
	sqlDB, err := gdb.DB()
	if err != nil {
		return false, fmt.Errorf("db: exclusive: %w", err)
	}
	conn, err := sqlDB.Conn(ctx)
	if err != nil {
		return false, Translate(err, nil)
	}
	defer conn.Close()
	var got bool
	if err := conn.QueryRowContext(ctx, "SELECT pg_try_advisory_lock($1)", key).Scan(&got); err != nil {
		return false, Translate(err, nil)
	}
	if !got {
		return false, nil
	}
	defer func() {
		// A failed unlock closes the connection: the session, and its lock, end.
		if _, uerr := conn.ExecContext(context.WithoutCancel(ctx), "SELECT pg_advisory_unlock($1)", key); uerr != nil {
			_ = conn.Raw(func(any) error { return driver.ErrBadConn })
		}
	}()
	return true, fn(ctx)
}
