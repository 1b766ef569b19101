package db

import (
	"context"
	"crypto/sha256"
	"database/sql"
	"embed"
	"encoding/hex"
	"fmt"
	"io/fs"

	"github.com/pressly/goose/v3"
	"github.com/pressly/goose/v3/lock"
	"gorm.io/gorm"
)

// The schema, as numbered goose SQL files, compiled into the binary so a
// deployed tally always carries exactly the schema it expects.
//
//go:embed migrations/*.sql
var migrationFiles embed.FS

// migrationLockID keys the advisory lock that serializes replicas migrating
// the same database at once (crc32 of "tally migrations"); distinct from
// goose's default so other goose users of the database never wait on us.
const migrationLockID int64 = 2618981255

func migrationsFS() fs.FS {
	sub, err := fs.Sub(migrationFiles, "migrations")
	if err != nil {
		panic(err) // the embedded directory is fixed at compile time
	}
	return sub
}

func newMigrationProvider(sqlDB *sql.DB) (*goose.Provider, error) {
	// Poll for the lock every second, for up to 10 minutes: a long migration
	// on another replica should make us wait, not fail the deploy.
	locker, err := lock.NewPostgresSessionLocker(
		lock.WithLockID(migrationLockID),
		lock.WithLockTimeout(1, 600),
		lock.WithUnlockTimeout(1, 60),
	)
	if err != nil {
		return nil, err
	}
	return goose.NewProvider(goose.DialectPostgres, sqlDB, migrationsFS(),
		goose.WithSessionLocker(locker),
		goose.WithDisableGlobalRegistry(true),
	)
}

// Migrate applies every embedded migration the database does not have yet.
// Replicas may call it at the same time: a PostgreSQL advisory lock lets one
// apply and the others then find nothing left to do.
func Migrate(ctx context.Context, gdb *gorm.DB) error {
	sqlDB, err := gdb.DB()
	if err != nil {
		return fmt.Errorf("db: migrate: %w", err)
	}
	p, err := newMigrationProvider(sqlDB)
	if err != nil {
		return fmt.Errorf("db: migrate: %w", err)
	}
	if _, err := p.Up(ctx); err != nil {
		return Translate(fmt.Errorf("db: migrate: %w", err), nil)
	}
	return nil
}

// LatestMigration is the highest migration version compiled into this binary.
func LatestMigration() (int64, error) {
	entries, err := fs.ReadDir(migrationsFS(), ".")
	if err != nil {
		return 0, err
	}
	var latest int64
	for _, e := range entries {
		v, err := goose.NumericComponent(e.Name())
		if err != nil {
			return 0, fmt.Errorf("db: migration %s has no version: %w", e.Name(), err)
		}
		latest = max(latest, v)
	}
	return latest, nil
}

// MigrationsCurrent reports whether the database has every migration this
// binary carries (a newer schema, from a newer replica mid-rollout, also
// counts as current). It runs two small queries, so /readyz may call it on
// every probe. Errors are translated (errs.Unavailable when unreachable).
func MigrationsCurrent(ctx context.Context, gdb *gorm.DB) (bool, error) {
	q := gdb.WithContext(ctx)
	var tableExists bool
	if err := q.Raw(`SELECT to_regclass(?) IS NOT NULL`, goose.DefaultTablename).Scan(&tableExists).Error; err != nil {
		return false, Translate(err, nil)
	}
	if !tableExists {
		return false, nil
	}
	var applied sql.NullInt64
	if err := q.Table(goose.DefaultTablename).Select("max(version_id)").Scan(&applied).Error; err != nil {
		return false, Translate(err, nil)
	}
	latest, err := LatestMigration()
	if err != nil {
		return false, err
	}
	return applied.Valid && applied.Int64 >= latest, nil
}

// MigrationsDigest is a hex SHA-256 over the names and contents of the
// embedded migration files: two binaries with the same digest build the
// same schema. Tests key their template database by it (internal/db/dbtest),
// so a changed or added migration builds a new template.
func MigrationsDigest() (string, error) {
	entries, err := fs.ReadDir(migrationsFS(), ".") // sorted by name
	if err != nil {
		return "", err
	}
	h := sha256.New()
	for _, e := range entries {
		body, err := fs.ReadFile(migrationsFS(), e.Name())
		if err != nil {
			return "", err
		}
		fmt.Fprintf(h, "%s\x00%d\x00", e.Name(), len(body))
		h.Write(body)
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}
