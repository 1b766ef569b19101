package main

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/payments"
	"github.com/tallybilling/tally/internal/stripeapi"
	"github.com/tallybilling/tally/internal/stripehook"
)

// syncCmd catches tally up with Stripe once, as the background sync and
// POST /v1/admin/stripe-sync do: missed events, then pending payments.
// It waits for nothing: while another replica syncs it exits 1 saying so.
func syncCmd(ctx context.Context, args []string, env environment) error {
	fs := newFlags("sync", "List Stripe's events of the handled types since --since (default: the creation, on Stripe's clock, of the\nnewest event the last catch-up that listed its whole window found, less how long its listings took, less an hour; 72h before any did) and store and process the missed ones, then look up at Stripe every payment pending for\nlonger than TALLY_PENDING_CHECK_AFTER and apply what Stripe shows (transitions with source sync).", env)
	since := fs.Duration("since", 0, "list events created this long ago and later (at most 720h, Stripe's 30 days); 0: from the newest event the last complete catch-up listed, less how long it listed, less an hour")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *since < 0 {
		return errors.New("sync: --since must not be negative")
	}
	cfg, logger, gdb, err := connect(ctx, env)
	if err != nil {
		return err
	}
	defer db.Close(gdb)
	if cfg.Stripe.SecretKey == "" {
		return errors.New("sync: TALLY_STRIPE_SECRET_KEY is not set")
	}
	client, err := stripeapi.New(stripeapi.Config{
		SecretKey: cfg.Stripe.SecretKey, APIURL: cfg.Stripe.APIURL, MeterEventsURL: cfg.Stripe.MeterEventsURL, Logger: logger,
	})
	if err != nil {
		return err
	}
	pay := payments.New(payments.Options{DB: gdb, Stripe: client, Catalog: cfg.Catalog, Config: cfg.Checkout,
		Livemode: cfg.Stripe.Livemode(), RevokeFrom: cfg.Credits.RevokeFrom, Logger: logger})
	hook := stripehook.New(stripehook.Options{DB: gdb, Payments: pay, Secrets: cfg.Stripe.WebhookSecrets,
		MaxAttempts: cfg.Stripe.EventMaxAttempts, RetryInterval: cfg.Stripe.EventRetryInterval, Lease: cfg.Stripe.EventLease, Logger: logger, Stripe: client})
	syncer := stripehook.NewSyncer(hook, stripehook.SyncerOptions{PendingCheckAfter: cfg.Stripe.PendingCheckAfter})
	var from time.Time
	if *since > 0 {
		from = time.Now().Add(-*since)
	}
	res, err := syncer.Sync(ctx, from)
	if err != nil {
		return fmt.Errorf("sync: %w", err)
	}
	fmt.Fprintf(env.stdout, "events listed %d, new %d; pending payments checked %d, changed %d\n",
		res.EventsListed, res.EventsNew, res.PaymentsChecked, res.PaymentsChanged)
	return nil
}
