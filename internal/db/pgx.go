package db

import (
	"context"
	"fmt"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/stdlib"
	"gorm.io/gorm"
)

// Pgx runs fn on the pgx connection beneath gorm's pool, taken from and
// given back to that pool: gorm stays the database layer and its pool the
// only one, while a hot statement (the balance read, the consume batch:
// one statement, many times a second) skips gorm's statement building and
// reflection and database/sql's value conversions, which a CPU profile of
// GET .../balance showed costing as much as the query itself. gdb must be
// the pool, not a transaction. Pass JSON as a string, never []byte: in
// the exec and simple protocol modes a database URL may choose, pgx sends
// []byte as bytea.
// Statements run here are not in gorm's log; fn's error comes back as it
// is (pass it through Translate).
func Pgx(ctx context.Context, gdb *gorm.DB, fn func(*pgx.Conn) error) error {
	sqlDB, err := gdb.DB()
	if err != nil {
		return fmt.Errorf("db: the pgx connection beneath gorm: %w", err)
	}
	conn, err := sqlDB.Conn(ctx)
	if err != nil {
		return err
	}
	defer conn.Close()
	return conn.Raw(func(driverConn any) error {
		c, ok := driverConn.(*stdlib.Conn)
		if !ok {
			return fmt.Errorf("db: the driver connection is a %T, not pgx's", driverConn)
		}
		return fn(c.Conn())
	})
}
