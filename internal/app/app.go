// Package app builds tally from a Config: the database, every capability
// service, the HTTP server and the background workers; it starts them and
// stops them in order on shutdown.
package app

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/catalog"
	"github.com/tallybilling/tally/internal/config"
	"github.com/tallybilling/tally/internal/credits"
	"github.com/tallybilling/tally/internal/customers"
	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/events"
	"github.com/tallybilling/tally/internal/httpapi"
	"github.com/tallybilling/tally/internal/metering"
	"github.com/tallybilling/tally/internal/payments"
	"github.com/tallybilling/tally/internal/stripeapi"
	"github.com/tallybilling/tally/internal/stripehook"
)

// Worker is a background job that runs until its context ends. Every worker
// must be safe to run on every replica at once.
type Worker interface {
	Name() string
	Run(ctx context.Context) error
}

// App is a built tally instance.
type App struct {
	cfg     config.Config
	logger  *slog.Logger
	db      *gorm.DB
	handler http.Handler
	metrics http.Handler
	workers []Worker
	// ln and metricsLn are the listeners Options gave, nil until Run
	// listens itself.
	ln, metricsLn net.Listener
}

// Options are what New needs.
type Options struct {
	Config config.Config
	// Logger receives every log line; nil discards them.
	Logger *slog.Logger
	// Now is the clock; nil means time.Now.
	Now func() time.Time
	// Listener, when set, is where Run serves the API instead of listening
	// on Config.HTTPAddr itself, so the caller knows the address before
	// Run (bound to port 0, say: see Addr). Without
	// TALLY_STRIPE_SANDBOX_URL the sandbox's public URL is its address.
	// Run closes it; so does New when it fails.
	Listener net.Listener
	// MetricsListener is the same for /metrics and Config.MetricsAddr
	// (used only when that is set).
	MetricsListener net.Listener
}

// New opens the database (applying migrations when Config.AutoMigrate), and
// builds every service, the HTTP handler and the workers. It does not
// listen: Run does, on the listeners of opts or on the configured addresses.
func New(ctx context.Context, opts Options) (a *App, err error) {
	defer func() {
		if err != nil {
			for _, ln := range []net.Listener{opts.Listener, opts.MetricsListener} {
				if ln != nil {
					_ = ln.Close()
				}
			}
		}
	}()
	cfg := opts.Config
	if cfg.Stripe.Sandbox.Enabled && cfg.Stripe.Sandbox.URL == "" {
		if opts.Listener == nil {
			return nil, errors.New("stripe sandbox: TALLY_STRIPE_SANDBOX_URL must be set when TALLY_HTTP_ADDR has no fixed port")
		}
		cfg.Stripe.Sandbox.URL = config.SandboxURL(opts.Listener.Addr().String())
	}
	now := opts.Now
	if now == nil {
		now = time.Now
	}
	logger := opts.Logger
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	for _, msg := range cfg.Obsolete {
		logger.Warn(msg)
	}
	gdb, err := db.Open(ctx, cfg.DatabaseURL, cfg.DBMaxOpenConns, logger)
	if err != nil {
		return nil, fmt.Errorf("open database: %w", err)
	}
	if cfg.AutoMigrate {
		if err := db.Migrate(ctx, gdb); err != nil {
			closeDB(gdb)
			return nil, fmt.Errorf("migrate: %w", err)
		}
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "tally_db_up", Help: "1 when the database answered a ping within a second.",
	}, func() float64 {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		if db.Ping(ctx, gdb) != nil {
			return 0
		}
		return 1
	}))

	feed := events.NewFeed(gdb)
	reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "tally_events_feed_held_back_seconds",
		Help: "How long the oldest committed business event has waited for an older transaction on the database server to end before the feed (and the push) may show it.",
	}, func() float64 {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		d, err := feed.HeldBack(ctx)
		if err != nil {
			return 0
		}
		return d.Seconds()
	}))

	a = &App{cfg: cfg, logger: logger, db: gdb, ln: opts.Listener}
	if cfg.MetricsAddr != "" {
		a.metricsLn = opts.MetricsListener
	} else if opts.MetricsListener != nil {
		_ = opts.MetricsListener.Close() // /metrics is served with the API
	}

	// The sandbox is tally's Stripe when TALLY_STRIPE_SANDBOX is on: the
	// client below talks to it over HTTP, as it would to Stripe.
	var sb *stripeSandbox
	if cfg.Stripe.Sandbox.Enabled {
		sb, err = newStripeSandbox(ctx, cfg, logger, now)
		if err != nil {
			closeDB(gdb)
			return nil, fmt.Errorf("stripe sandbox: %w", err)
		}
		cfg.Stripe.APIURL, cfg.Stripe.MeterEventsURL = sb.apiURL, sb.apiURL
		cfg.Catalog = withSandboxRedirects(cfg.Catalog, cfg.Stripe.Sandbox.URL)
		a.workers = append(a.workers, sandboxWorker{sb: sb})
		defer func() {
			if err != nil { // New failed: the sandbox will never run
				sb.close()
			}
		}()
	}

	// One Stripe client for every capability; nil without a key (checkout
	// then answers unavailable, webhooks still verify and store).
	var stripeClient stripeapi.Client
	if cfg.Stripe.SecretKey != "" {
		stripeClient, err = stripeapi.New(stripeapi.Config{
			SecretKey: cfg.Stripe.SecretKey, APIURL: cfg.Stripe.APIURL, MeterEventsURL: cfg.Stripe.MeterEventsURL, Logger: logger,
		})
		if err != nil {
			closeDB(gdb)
			return nil, fmt.Errorf("stripe client: %w", err)
		}
	}

	// Metering: intake always; delivery only with a Stripe key.
	var meterTurn func(context.Context) error
	var delivery *metering.Worker
	if stripeClient != nil {
		delivery = metering.NewWorker(metering.WorkerOptions{
			DB: gdb, Stripe: stripeClient, Catalog: cfg.Catalog, Config: cfg.Metering, Logger: logger, Now: now, Registry: reg,
		})
		// Reconciliation's Stripe requests wait their turn in the delivery
		// worker's share of the meter rate limit.
		meterTurn = delivery.Turn
	}
	usage := metering.New(metering.Options{
		DB: gdb, Stripe: stripeClient, Catalog: cfg.Catalog, Logger: logger, Now: now, UsageRetention: cfg.Retention.UsageEvents,
		MeterTurn: meterTurn, Registry: reg,
	})
	if delivery != nil {
		a.workers = append(a.workers, delivery)
		if cfg.Metering.ReconcileInterval > 0 {
			a.workers = append(a.workers, metering.NewReconciler(usage, cfg.Metering.ReconcileInterval, logger, reg))
		}
	} else {
		logger.Warn("TALLY_STRIPE_SECRET_KEY is not set: usage events are accepted but not delivered")
	}

	paymentsSvc := payments.New(payments.Options{
		DB: gdb, Stripe: stripeClient, Catalog: cfg.Catalog, Config: cfg.Checkout,
		Livemode: cfg.Stripe.Livemode(), RevokeFrom: cfg.Credits.RevokeFrom, Logger: logger, Now: now,
	})
	stripeHook := stripehook.New(stripehook.Options{
		DB: gdb, Payments: paymentsSvc, Secrets: cfg.Stripe.WebhookSecrets,
		MaxAttempts: cfg.Stripe.EventMaxAttempts, RetryInterval: cfg.Stripe.EventRetryInterval, Lease: cfg.Stripe.EventLease,
		Registry: reg, Logger: logger, Now: now, Stripe: stripeClient, Usage: usage, Meters: stripeMeters(cfg.Catalog),
		Livemode: cfg.Stripe.Livemode(),
	})
	a.workers = append(a.workers, stripehook.NewWorker(stripeHook))
	syncer := stripehook.NewSyncer(stripeHook, stripehook.SyncerOptions{
		PendingCheckAfter: cfg.Stripe.PendingCheckAfter, Interval: cfg.Stripe.SyncInterval, Registry: reg,
	})
	if stripeClient != nil {
		a.workers = append(a.workers, syncer)
	}
	a.workers = append(a.workers, newVerifier(gdb, logger, now, cfg.Stripe.VerifyInterval, reg))
	paymentsSvc.OnWaitOver(stripeHook.WakeWaiting)
	paymentsSvc.OnTopUpFailedUnrecorded(stripeHook.WakeWaitingOnPayment)

	// Every change that lowers a customer's credits may start its automatic
	// top-up, in the change's own transaction (payments writes the payment).
	wallet := credits.New(credits.Options{DB: gdb, Config: cfg.Credits, Logger: logger, Now: now, Registry: reg, TopUp: paymentsSvc.StartAutoTopUp})
	a.workers = append(a.workers, credits.NewSweeper(credits.SweeperOptions{DB: gdb, Config: cfg.Credits, Logger: logger, Now: now, TopUp: paymentsSvc.StartAutoTopUp}))
	a.workers = append(a.workers, payments.NewAutoTopUpWorker(paymentsSvc, 0))
	a.workers = append(a.workers, credits.NewForecastWatcher(wallet))

	deps := httpapi.Options{
		Config:    cfg,
		Logger:    logger,
		Now:       now,
		Registry:  reg,
		Ready:     a.ready,
		Customers: customers.New(customers.Options{DB: gdb, Now: now}),
		Events:    feed,

		Payments:   paymentsSvc,
		StripeHook: stripeHook,
		StripeSync: syncer,
		Metering:   usage,

		Credits: wallet,
		Verify:  func(ctx context.Context) (credits.VerifyReport, error) { return Verify(ctx, gdb) },
	}

	if sb != nil {
		deps.Sandbox = sb.web
	}

	metrics := promhttp.HandlerFor(reg, promhttp.HandlerOpts{})
	if cfg.MetricsAddr == "" {
		deps.Gatherer = reg
	} else {
		a.metrics = metrics
	}

	e, err := httpapi.New(deps)
	if err != nil {
		closeDB(gdb)
		return nil, err
	}
	a.handler = e
	a.workers = append(a.workers, events.NewPusher(events.PusherOptions{
		DB: gdb, URL: cfg.EventsWebhook.URL, Secret: cfg.EventsWebhook.Secret, Logger: logger, Now: now, Registry: reg,
	}))
	a.workers = append(a.workers, janitor{db: gdb, logger: logger, now: now, cfg: cfg.Retention,
		metering: deps.Metering, keepUnpushed: cfg.EventsWebhook.URL != ""})
	return a, nil
}

// Addr is the address the API is served on: the listener's that Options
// gave (its real port when bound to port 0), else Config.HTTPAddr.
func (a *App) Addr() string {
	if a.ln != nil {
		return a.ln.Addr().String()
	}
	return a.cfg.HTTPAddr
}

// MetricsAddr is Addr for /metrics: "" when it is served with the API.
func (a *App) MetricsAddr() string {
	if a.metricsLn != nil {
		return a.metricsLn.Addr().String()
	}
	return a.cfg.MetricsAddr
}

// Handler is the HTTP handler (for tests that serve it themselves).
func (a *App) Handler() http.Handler { return a.handler }

// DB is the database handle.
func (a *App) DB() *gorm.DB { return a.db }

func (a *App) ready(ctx context.Context) map[string]error {
	checks := map[string]error{"database": db.Ping(ctx, a.db)}
	if checks["database"] == nil {
		current, err := db.MigrationsCurrent(ctx, a.db)
		if err == nil && !current {
			err = errors.New("migrations pending: run `tally migrate`")
		}
		checks["migrations"] = err
	}
	return checks
}

// closeDB releases the pool on the way out, where its error changes nothing.
func closeDB(gdb *gorm.DB) { _ = db.Close(gdb) }

// Run serves HTTP on cfg.HTTPAddr (and /metrics on cfg.MetricsAddr when set)
// and runs the workers until ctx ends. Then it stops accepting connections,
// lets in-flight requests finish, stops the workers and waits for them, all
// within cfg.ShutdownTimeout, and closes the database.
func (a *App) Run(ctx context.Context) error {
	defer closeDB(a.db)
	ln := a.ln
	if ln == nil {
		var err error
		if ln, err = net.Listen("tcp", a.cfg.HTTPAddr); err != nil {
			if a.metricsLn != nil {
				a.metricsLn.Close()
			}
			return fmt.Errorf("listen on %s: %w", a.cfg.HTTPAddr, err)
		}
	}
	servers := []*http.Server{newServer(a.handler, max(defaultWriteTimeout, a.cfg.RequestTimeout+answerMargin))}
	listeners := []net.Listener{ln}
	if a.metrics != nil {
		mln := a.metricsLn
		if mln == nil {
			var err error
			if mln, err = net.Listen("tcp", a.cfg.MetricsAddr); err != nil {
				ln.Close()
				return fmt.Errorf("listen on %s: %w", a.cfg.MetricsAddr, err)
			}
		}
		servers = append(servers, newServer(a.metrics, defaultWriteTimeout))
		listeners = append(listeners, mln)
	}

	serveErr := make(chan error, len(servers))
	for i, srv := range servers {
		a.logger.Info("listening", "addr", listeners[i].Addr().String())
		go func() {
			if err := srv.Serve(listeners[i]); err != nil && !errors.Is(err, http.ErrServerClosed) {
				serveErr <- err
			}
		}()
	}
	workCtx, stopWork := context.WithCancel(context.WithoutCancel(ctx))
	var wg sync.WaitGroup
	// running names the workers still running, so that a shutdown that
	// runs out of time says which ones it left.
	var runningMu sync.Mutex
	running := map[string]int{}
	for _, w := range a.workers {
		wg.Add(1)
		runningMu.Lock()
		running[w.Name()]++
		runningMu.Unlock()
		go func() {
			defer wg.Done()
			if err := w.Run(workCtx); err != nil && !errors.Is(err, context.Canceled) {
				a.logger.Error("worker stopped", "worker", w.Name(), "error", err)
			}
			runningMu.Lock()
			if running[w.Name()]--; running[w.Name()] == 0 {
				delete(running, w.Name())
			}
			runningMu.Unlock()
		}()
	}

	var runErr error
	select {
	case <-ctx.Done():
		a.logger.Info("shutting down", "timeout", a.cfg.ShutdownTimeout.String())
	case runErr = <-serveErr:
		a.logger.Error("server failed", "error", runErr)
	}

	// A fresh context: the one that ended is what asked us to stop.
	shutdownCtx, cancel := context.WithTimeout(context.Background(), a.cfg.ShutdownTimeout)
	defer cancel()
	for _, srv := range servers {
		if err := srv.Shutdown(shutdownCtx); err != nil {
			a.logger.Error("http shutdown", "error", err)
			runErr = errors.Join(runErr, err)
		}
	}
	stopWork()
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-shutdownCtx.Done():
		runningMu.Lock()
		left := slices.Sorted(maps.Keys(running))
		runningMu.Unlock()
		runErr = errors.Join(runErr, fmt.Errorf("workers did not stop within the shutdown timeout: %s", strings.Join(left, ", ")))
	}
	a.logger.Info("stopped")
	return runErr
}

// defaultWriteTimeout is the servers' write timeout: how long a request
// may take to be answered in full before its connection is closed. The
// API's is longer when TALLY_REQUEST_TIMEOUT asks for it.
const defaultWriteTimeout = 60 * time.Second

// answerMargin is how much longer than TALLY_REQUEST_TIMEOUT the API's
// server lets a request write its answer: a request cut at its deadline
// still answers its 503 (httpapi's answerWithin). Work that runs on once
// its caller is gone (a webhook's processing, a checkout's Stripe calls, a
// consume's batch) keeps the default's time to answer, as before.
const answerMargin = 10 * time.Second

func newServer(h http.Handler, writeTimeout time.Duration) *http.Server {
	return &http.Server{
		Handler:           h,
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       30 * time.Second,
		WriteTimeout:      writeTimeout,
		IdleTimeout:       120 * time.Second,
		MaxHeaderBytes:    64 << 10,
	}
}

// stripeMeters are the Stripe meters of the catalog's plans that send
// usage to Stripe, each once.
func stripeMeters(c catalog.Catalog) []string {
	var out []string
	for _, p := range c.Plans {
		if p.Delivery != catalog.DeliveryShadow && p.StripeMeterID != "" && !slices.Contains(out, p.StripeMeterID) {
			out = append(out, p.StripeMeterID)
		}
	}
	return out
}
