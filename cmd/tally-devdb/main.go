//go:build linux

// Command tally-devdb runs one command against PostgreSQL for development and
// tests: the server at the configured URL when it accepts the connection, or
// else a private server it starts from the installed PostgreSQL binaries and
// stops when the command ends. `make run` and `make test` run through it, so a
// fresh machine needs the PostgreSQL package and nothing else: no cluster to
// start, no pg_hba.conf to edit.
//
//	tally-devdb [flags] -- command [arg...]
//
// The command finds the database's URL in the environment variable named by
// -env. A private server
//
//   - lives in a state directory (-state, default .state/postgres): a scratch
//     cluster per run, removed at the end, or with -keep NAME one kept between
//     runs (make run keeps its database; one command at a time uses it);
//   - listens on a free port on 127.0.0.1 only, with a random password for the
//     postgres user that only the command gets, so other local users cannot
//     use it as a superuser;
//   - runs as the `postgres` (or else `nobody`) user when started as root,
//     because PostgreSQL refuses to run as root;
//   - has fsync off: it holds development and test data only, and a power
//     loss may cost a kept database (remove its directory to start over);
//   - is stopped when the command ends, when tally-devdb is interrupted, and
//     by the kernel when tally-devdb itself is killed (a server left behind by
//     any other crash is stopped by the next run).
//
// Exit status: the command's, 128+n when it was ended by signal n, and 1 when
// no database could be had.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// defaultURL is the server of the documented development set-up, the same
// default as the test harness (internal/db/dbtest).
const defaultURL = "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable"

// options is the command line.
type options struct {
	url            string // the database the command should use when it answers
	env            string // the variable that carries the URL to the command
	state          string // where private servers keep their files
	keep           string // name of a kept private server; "" for a scratch one
	create         bool   // create the URL's database when it is missing
	maxConnections int
	command        []string
}

func main() {
	os.Exit(run(os.Args[1:], os.Stderr))
}

func parseFlags(args []string, stderr io.Writer) (options, error) {
	var o options
	fs := flag.NewFlagSet("tally-devdb", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: tally-devdb [flags] -- command [arg...]")
		fmt.Fprintln(stderr, "Runs the command with a PostgreSQL URL in -env: the -url server when it")
		fmt.Fprintln(stderr, "accepts the connection, else a private server started for the command.")
		fs.PrintDefaults()
	}
	fs.StringVar(&o.url, "url", "", "the database URL the command should use when that server answers (default: $<-env>, else "+defaultURL+")")
	fs.StringVar(&o.env, "env", "TALLY_TEST_DATABASE_URL", "environment variable that gives the command the URL")
	fs.StringVar(&o.state, "state", filepath.Join(".state", "postgres"), "directory for private servers")
	fs.StringVar(&o.keep, "keep", "", "keep the private server's data between runs under this name (one command at a time)")
	fs.BoolVar(&o.create, "create", false, "create the URL's database when it does not exist")
	fs.IntVar(&o.maxConnections, "max-connections", 500, "max_connections of a private server")
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	o.command = fs.Args()
	if len(o.command) == 0 {
		fs.Usage()
		return o, fmt.Errorf("no command given")
	}
	if o.env == "" {
		return o, fmt.Errorf("-env must name a variable")
	}
	if o.keep != "" && (strings.ContainsAny(o.keep, `/\`) || strings.HasPrefix(o.keep, ".") || strings.HasPrefix(o.keep, scratchPrefix)) {
		return o, fmt.Errorf("-keep %q: want a plain name such as run", o.keep)
	}
	if o.maxConnections < 10 {
		return o, fmt.Errorf("-max-connections %d: want at least 10", o.maxConnections)
	}
	if o.url == "" {
		o.url = os.Getenv(o.env)
	}
	if o.url == "" {
		o.url = defaultURL
	}
	return o, nil
}

func run(args []string, stderr io.Writer) int {
	o, err := parseFlags(args, stderr)
	if err != nil {
		if err == flag.ErrHelp {
			return 0
		}
		fmt.Fprintln(stderr, "tally-devdb:", err)
		return 2
	}
	say := func(format string, a ...any) {
		fmt.Fprintf(stderr, "tally-devdb: "+format+"\n", a...)
	}

	// Signals are caught from the start: an interrupt while the server starts
	// still stops it, and one while the command runs goes to the command.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	fw := newForwarder(cancel)
	defer fw.close()

	dbURL, stop, err := database(ctx, o, say)
	if err != nil {
		if sig := fw.received(); sig != nil {
			say("interrupted while preparing the database")
			return signalStatus(sig)
		}
		say("%v", err)
		return 1
	}
	defer stop()
	if sig := fw.received(); sig != nil {
		return signalStatus(sig)
	}
	shown := dbURL
	if dbURL == o.url {
		// The configured URL may carry a real password; a private server's
		// is throwaway, and shown so that psql can use it.
		if u, err := url.Parse(dbURL); err == nil {
			shown = u.Redacted()
		}
	}
	say("%s=%s", o.env, shown)
	return runCommand(o.command, append(os.Environ(), o.env+"="+dbURL), fw, say)
}

// elapsed formats a duration for the messages, to a tenth of a second.
func elapsed(since time.Time) string {
	return fmt.Sprintf("%.1fs", time.Since(since).Seconds())
}
