package app

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"slices"
	"strings"
	"time"

	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/catalog"
	"github.com/tallybilling/tally/internal/config"
	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/sandbox"
)

// stripeSandbox is the offline Stripe sandbox running inside tally
// (TALLY_STRIPE_SANDBOX): its account, persisted in the stripe_sandbox
// schema of tally's database, and its pages and API under /sandbox.
type stripeSandbox struct {
	account *sandbox.Account
	web     *sandbox.Web
	// api is the sandbox's Stripe API, served on its own loopback listener
	// (stripe-go wants /v1 and /v2 at the root of its base URL, and tally's
	// own /v1 is there): apiURL. tally's Stripe client talks to it over
	// HTTP, so every request takes the path it would take to Stripe.
	api      *sandbox.API
	listener net.Listener
	apiURL   string
	// db is the sandbox's own pool, apart from tally's: tally holds a
	// pooled connection while it waits for Stripe (the automatic top-up's
	// charge keeps its settings locked; the saves and take-backs waiting
	// for them hold one each), and a sandbox committing its answer
	// through that same pool waited for a connection that would be given
	// back only after the answer came (TestSandboxChargesWhileSavesHoldThePool).
	db *gorm.DB
}

// sandboxDBConns is the sandbox's pool: the account applies one operation
// at a time (its mutex), so it never uses more than one connection; the
// second serves the dashboard's reads while the first is in a commit.
const sandboxDBConns = 2

// newStripeSandbox builds the sandbox of cfg. Its webhooks go to tally's own
// /webhooks/stripe, signed with the first configured secret.
func newStripeSandbox(ctx context.Context, cfg config.Config, logger *slog.Logger, now func() time.Time) (sb *stripeSandbox, err error) {
	gdb, err := db.Open(ctx, cfg.DatabaseURL, sandboxDBConns, logger.With("component", "stripe-sandbox"))
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			_ = db.Close(gdb)
		}
	}()
	store, err := sandbox.OpenPostgresStore(ctx, gdb)
	if err != nil {
		return nil, err
	}
	base := strings.TrimSuffix(cfg.Stripe.Sandbox.URL, "/")
	meters := map[string]string{}
	for _, p := range cfg.Catalog.Plans {
		if p.StripeMeterID != "" {
			meters[p.StripeMeterID] = p.Meter
		}
	}
	acct, err := sandbox.New(ctx, sandbox.Options{
		SecretKey: cfg.Stripe.SecretKey,
		PublicURL: base,
		Webhook:   &sandbox.Endpoint{URL: base + "/webhooks/stripe", Secret: cfg.Stripe.WebhookSecrets[0]},
		Store:     store,
		Meters:    meters,
		// Enough for the dashboard's list of recent requests.
		MaxRecordedRequests: 200,
		Logger:              logger.With("component", "stripe-sandbox"),
		Now:                 now,
	})
	if err != nil {
		return nil, err
	}
	demo := sandbox.NewDemo(sandbox.DemoOptions{
		JWTSecret: cfg.JWT.HS256Secret, Issuer: cfg.JWT.Issuer, Audience: cfg.JWT.Audience,
		ServiceKey: cfg.Stripe.Sandbox.DemoKey, TallyURL: base, Now: now,
	})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("listen for the sandbox's Stripe API: %w", err)
	}
	api := sandbox.NewAPI(acct)
	apiURL := "http://" + ln.Addr().String()
	web := sandbox.NewWeb(sandbox.WebOptions{Account: acct, API: api, APIURL: apiURL, Demo: demo, Logger: logger})
	logger.Warn("the Stripe sandbox is on: tally talks to an emulated test-mode Stripe, not to Stripe",
		"dashboard", base+"/sandbox", "demo", base+"/sandbox/demo", "stripe_api", apiURL)
	return &stripeSandbox{account: acct, web: web, api: api, listener: ln, apiURL: apiURL, db: gdb}, nil
}

// close releases the API's listener and the pool of a sandbox that will
// never run.
func (s *stripeSandbox) close() {
	s.api.Close()
	_ = s.listener.Close()
	_ = db.Close(s.db)
}

// withSandboxRedirects lets Checkout send the buyer back to the demo app.
func withSandboxRedirects(cat catalog.Catalog, base string) catalog.Catalog {
	cat.RedirectURLPrefixes = append(slices.Clone(cat.RedirectURLPrefixes), strings.TrimSuffix(base, "/")+"/sandbox/demo")
	return cat
}

// sandboxWorker serves the sandbox's Stripe API, delivers its webhooks
// and expires its Checkout Sessions until ctx ends. Workers stop after the
// HTTP server has drained, so the API answers tally's last requests.
type sandboxWorker struct{ sb *stripeSandbox }

func (w sandboxWorker) Name() string { return "stripe-sandbox" }

func (w sandboxWorker) Run(ctx context.Context) error {
	srv := newServer(w.sb.api, defaultWriteTimeout)
	served := make(chan error, 1)
	go func() { served <- srv.Serve(w.sb.listener) }()
	err := w.sb.account.Run(ctx)
	shutdownCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	w.sb.api.Close() // hung requests (faults) end now
	if serr := srv.Shutdown(shutdownCtx); serr != nil {
		err = errors.Join(err, serr)
	}
	if serr := <-served; serr != nil && !errors.Is(serr, http.ErrServerClosed) {
		err = errors.Join(err, serr)
	}
	_ = db.Close(w.sb.db)
	if err != nil && ctx.Err() == nil {
		return fmt.Errorf("stripe sandbox: %w", err)
	}
	return ctx.Err()
}
