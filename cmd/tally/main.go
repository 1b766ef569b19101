// Command tally is the tally billing service: one binary whose subcommands
// serve the API, apply migrations and run the operator's checks.
package main

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/app"
	"github.com/tallybilling/tally/internal/config"
	"github.com/tallybilling/tally/internal/credits"
	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/httpapi"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args, os.Getenv, os.Stdout, os.Stderr); err != nil {
		if !errors.Is(err, flag.ErrHelp) {
			fmt.Fprintln(os.Stderr, "tally:", err)
		}
		os.Exit(exitCode(err))
	}
}

// exitError carries a specific exit status (verify exits 2 on a breach).
type exitError struct {
	code int
	err  error
}

func (e exitError) Error() string { return e.err.Error() }
func (e exitError) Unwrap() error { return e.err }

func exitCode(err error) int {
	var ee exitError
	if errors.As(err, &ee) {
		return ee.code
	}
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	return 1
}

type command struct {
	name    string
	summary string
	run     func(ctx context.Context, args []string, env environment) error
}

// environment is what a subcommand may touch of the outside world.
type environment struct {
	getenv func(string) string
	stdin  io.Reader
	stdout io.Writer
	stderr io.Writer
	// listening, when set, is told the addresses serve bound (the API's,
	// and /metrics' or ""), once they accept connections: tests that run
	// serve in-process on port 0 learn where it is.
	listening func(addr, metricsAddr string)
}

func commands() []command {
	return []command{
		{"serve", "run the HTTP API and the background workers (default)", serve},
		{"migrate", "apply the database migrations and exit", migrate},
		{"verify", "check the invariants (balances, ledger, credited payments); exit 2 on any breach", verifyCmd},
		{"sync", "catch up with Stripe: process missed events, look up pending payments", syncCmd},

		{"usage", "import usage history (CSV, NDJSON) or compare totals with a legacy system's", usageCmd},
		{"reconcile", "compare delivered usage with Stripe's meter event summaries (exit 2 on drift)", reconcile},
		{"forecast", "forecast customers' daily consumption from a CSV file, or backtest the model (no database)", forecastCmd},
		{"healthcheck", "exit 0 when the local server answers /healthz (for container healthchecks)", healthcheck},
		{"version", "print the version", printVersion},
	}
}

// run is the whole program: it parses args, reads configuration through
// getenv and writes only to stdout and stderr, returning errors rather than
// exiting, so tests can run the real binary in-process.
func run(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	return runIn(ctx, args, environment{getenv: getenv, stdin: os.Stdin, stdout: stdout, stderr: stderr})
}

// runIn is run in an environment a test may add to (see listening).
func runIn(ctx context.Context, args []string, env environment) error {
	name, rest := "serve", []string{}
	if len(args) > 1 {
		name, rest = args[1], args[2:]
	}
	if name == "help" || name == "-h" || name == "--help" {
		usage(env.stdout)
		return nil
	}
	if strings.HasPrefix(name, "-") {
		name, rest = "serve", args[1:]
	}
	for _, c := range commands() {
		if c.name == name {
			return c.run(ctx, rest, env)
		}
	}
	usage(env.stderr)
	return fmt.Errorf("unknown command %q", name)
}

func usage(w io.Writer) {
	fmt.Fprintln(w, "usage: tally <command> [flags]\n\ncommands:")
	for _, c := range commands() {
		fmt.Fprintf(w, "  %-12s %s\n", c.name, c.summary)
	}
	fmt.Fprintln(w, "\nConfiguration comes from TALLY_* environment variables; see README.md.\nRun 'tally <command> --help' for a command's flags.")
}

func newFlags(name, summary string, env environment) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(env.stderr)
	fs.Usage = func() {
		fmt.Fprintf(env.stderr, "usage: tally %s [flags]\n\n%s\n", name, summary)
		fs.PrintDefaults()
	}
	return fs
}

func newLogger(cfg config.Config, w io.Writer) *slog.Logger {
	return slog.New(slog.NewJSONHandler(w, &slog.HandlerOptions{Level: cfg.LogLevel, ReplaceAttr: timesInUTC}))
}

// timesInUTC writes every time a log line carries in UTC, as the API
// answers them, whatever the host's zone: replicas in different zones
// write lines one can sort and compare.
func timesInUTC(_ []string, a slog.Attr) slog.Attr {
	if a.Value.Kind() == slog.KindTime {
		a.Value = slog.TimeValue(a.Value.Time().UTC())
	}
	return a
}

// connect is the start of every one-shot subcommand: the configuration, a
// JSON logger on stderr and a small database pool (close it with db.Close).
func connect(ctx context.Context, env environment) (config.Config, *slog.Logger, *gorm.DB, error) {
	cfg, err := config.Load(env.getenv)
	if err != nil {
		return config.Config{}, nil, nil, fmt.Errorf("configuration:\n%w", err)
	}
	logger := newLogger(cfg, env.stderr)
	gdb, err := db.Open(ctx, cfg.DatabaseURL, 2, logger)
	if err != nil {
		return config.Config{}, nil, nil, err
	}
	return cfg, logger, gdb, nil
}

func serve(ctx context.Context, args []string, env environment) error {
	fs := newFlags("serve", "Serve the HTTP API and run the background workers until SIGINT or SIGTERM.", env)
	if err := fs.Parse(args); err != nil {
		return err
	}
	cfg, err := config.Load(env.getenv)
	if err != nil {
		return fmt.Errorf("configuration:\n%w", err)
	}
	logger := newLogger(cfg, env.stderr)
	// Listening before the app is built lets TALLY_HTTP_ADDR name port 0:
	// the address bound is logged (and is the sandbox's URL when it has
	// none of its own).
	opts := app.Options{Config: cfg, Logger: logger}
	if opts.Listener, err = net.Listen("tcp", cfg.HTTPAddr); err != nil {
		return fmt.Errorf("listen on %s: %w", cfg.HTTPAddr, err)
	}
	if cfg.MetricsAddr != "" {
		if opts.MetricsListener, err = net.Listen("tcp", cfg.MetricsAddr); err != nil {
			opts.Listener.Close()
			return fmt.Errorf("listen on %s: %w", cfg.MetricsAddr, err)
		}
	}
	a, err := app.New(ctx, opts)
	if err != nil {
		return err
	}
	logger.Info("tally starting", "version", version, "addr", a.Addr(), "metrics_addr", a.MetricsAddr(), "livemode", cfg.Stripe.Livemode())
	if env.listening != nil {
		env.listening(a.Addr(), a.MetricsAddr())
	}
	return a.Run(ctx)
}

func migrate(ctx context.Context, args []string, env environment) error {
	fs := newFlags("migrate", "Apply every pending database migration (safe to run from many replicas at once).", env)
	if err := fs.Parse(args); err != nil {
		return err
	}
	_, _, gdb, err := connect(ctx, env)
	if err != nil {
		return err
	}
	defer db.Close(gdb)
	if err := db.Migrate(ctx, gdb); err != nil {
		return err
	}
	fmt.Fprintln(env.stdout, "migrations applied")
	return nil
}

func healthcheck(ctx context.Context, args []string, env environment) error {
	fs := newFlags("healthcheck", "GET /healthz on the local server; exit 0 when it answers 200.", env)
	addr := fs.String("addr", "", "host:port to check (default: TALLY_HTTP_ADDR, or its default, on 127.0.0.1)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *addr == "" {
		*addr = cmp.Or(env.getenv("TALLY_HTTP_ADDR"), config.Default().HTTPAddr)
		if strings.HasPrefix(*addr, ":") {
			*addr = "127.0.0.1" + *addr
		}
	}
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+*addr+"/healthz", nil)
	if err != nil {
		return err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("healthz answered %d", resp.StatusCode)
	}
	return nil
}

func printVersion(ctx context.Context, args []string, env environment) error {
	fmt.Fprintln(env.stdout, "tally", version)
	return nil
}

func verifyCmd(ctx context.Context, args []string, env environment) error {
	fs := newFlags("verify", "Recompute every balance from the ledger and from the grants, check every succeeded payment was\ncredited exactly once and every consume key spent once. Exits 2 naming each breach.", env)
	asJSON := fs.Bool("json", false, "print the report as JSON")
	if err := fs.Parse(args); err != nil {
		return err
	}
	_, _, gdb, err := connect(ctx, env)
	if err != nil {
		return err
	}
	defer db.Close(gdb)
	rep, err := app.Verify(ctx, gdb)
	if err != nil {
		return fmt.Errorf("verify: %w", err)
	}
	if err := printVerifyReport(env.stdout, rep, *asJSON); err != nil {
		return err
	}
	if !rep.OK {
		return exitError{code: 2, err: fmt.Errorf("verify found %d breaches", len(rep.Problems))}
	}
	return nil
}

// printVerifyReport writes rep as `tally verify` shows it: one line per
// breach and per receivable, or with asJSON the report as JSON.
func printVerifyReport(w io.Writer, rep credits.VerifyReport, asJSON bool) error {
	if asJSON {
		// The body of GET /v1/admin/verify, so a script reads one shape.
		out := httpapi.ToAPIVerifyReport(rep)
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		if err := enc.Encode(out); err != nil {
			return err
		}
	} else {
		fmt.Fprintf(w, "checked %d customers and %d payments\n", rep.CustomersChecked, rep.PaymentsChecked)
		for _, p := range rep.Problems {
			fmt.Fprintf(w, "BREACH %s", p.Kind)
			if p.CustomerID != "" {
				fmt.Fprintf(w, " customer=%s", p.CustomerID)
			}
			if p.PaymentID != "" {
				fmt.Fprintf(w, " payment=%s", p.PaymentID)
			}
			fmt.Fprintf(w, ": %s\n", p.Detail)
		}
		// Receivables are money owed, not breaches: listed, exit code unaffected.
		for _, r := range rep.Receivables {
			fmt.Fprintf(w, "receivable customer=%s: %d credits refunded or disputed after they were spent (%d revokes)\n",
				r.CustomerID, r.Shortfall, r.Revokes)
		}
		if rep.OK {
			fmt.Fprintln(w, "ok: every invariant holds")
		}
	}
	return nil
}
