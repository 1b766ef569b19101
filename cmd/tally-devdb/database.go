//go:build linux

package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// probeTimeout bounds the attempt to reach the configured server: enough for a
// server on another host, short enough that a fresh machine does not wait.
const probeTimeout = 5 * time.Second

// SQLSTATEs the probe tells apart.
const (
	invalidCatalogName = "3D000" // the database does not exist
	duplicateDatabase  = "42P04" // a concurrent run created it first
)

// database returns the URL the command should use and a function that
// releases what was started for it. The configured server is used whenever it
// accepts the connection; any other outcome (nothing listening, a password
// wanted, no such host) starts a private server, and says why.
func database(ctx context.Context, o options, say func(string, ...any)) (string, func(), error) {
	cfg, err := pgx.ParseConfig(o.url)
	if err != nil {
		return "", nil, fmt.Errorf("-url: %w", err)
	}
	err = ping(ctx, cfg)
	var pgErr *pgconn.PgError
	switch {
	case err == nil:
		return o.url, func() {}, nil
	case errors.As(err, &pgErr) && pgErr.Code == invalidCatalogName:
		// The server answers; only the database is missing.
		if o.create {
			if err := createDatabase(ctx, cfg); err != nil {
				return "", nil, err
			}
		}
		return o.url, func() {}, nil
	case ctx.Err() != nil:
		return "", nil, ctx.Err()
	}
	say("no PostgreSQL accepts %s at %s (%s); starting a private one", cfg.User, hostPort(cfg), reason(err))

	srv, err := startServer(ctx, o, say)
	if err != nil {
		return "", nil, err
	}
	name := cfg.Database
	if name == "" {
		name = "postgres"
	}
	dbURL := srv.url(name)
	if o.create {
		pcfg, err := pgx.ParseConfig(dbURL)
		if err == nil {
			err = createDatabase(ctx, pcfg)
		}
		if err != nil {
			srv.stop()
			return "", nil, err
		}
	}
	return dbURL, srv.stop, nil
}

func ping(ctx context.Context, cfg *pgx.ConnConfig) error {
	ctx, cancel := context.WithTimeout(ctx, probeTimeout)
	defer cancel()
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return err
	}
	return conn.Close(ctx)
}

// createDatabase creates cfg's database on its server unless it exists,
// connecting to the server's postgres database to do so.
func createDatabase(ctx context.Context, cfg *pgx.ConnConfig) error {
	admin := cfg.Copy()
	admin.Database = "postgres"
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	conn, err := pgx.ConnectConfig(ctx, admin)
	if err != nil {
		return fmt.Errorf("connect to create database %s: %w", cfg.Database, err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	var exists bool
	if err := conn.QueryRow(ctx, "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)", cfg.Database).Scan(&exists); err != nil {
		return fmt.Errorf("look up database %s: %w", cfg.Database, err)
	}
	if exists {
		return nil
	}
	_, err = conn.Exec(ctx, "CREATE DATABASE "+pgx.Identifier{cfg.Database}.Sanitize())
	var pgErr *pgconn.PgError
	if err != nil && !(errors.As(err, &pgErr) && pgErr.Code == duplicateDatabase) {
		return fmt.Errorf("create database %s: %w", cfg.Database, err)
	}
	return nil
}

// reason is the gist of a failed connection, on one line: pgx repeats the
// address for each attempt (with and without TLS).
func reason(err error) string {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		return pgErr.Severity + ": " + pgErr.Message + " (SQLSTATE " + pgErr.Code + ")"
	}
	var netErr *net.OpError
	if errors.As(err, &netErr) {
		return netErr.Error()
	}
	return strings.Join(strings.Fields(err.Error()), " ")
}

func hostPort(cfg *pgx.ConnConfig) string {
	return net.JoinHostPort(cfg.Host, strconv.Itoa(int(cfg.Port)))
}

// serverURL is the URL of database name on a private server.
func serverURL(port int, password, name string) string {
	u := url.URL{
		Scheme:   "postgres",
		User:     url.UserPassword(superuser, password),
		Host:     net.JoinHostPort("127.0.0.1", strconv.Itoa(port)),
		Path:     "/" + name,
		RawQuery: "sslmode=disable",
	}
	return u.String()
}
