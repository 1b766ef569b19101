package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"text/tabwriter"
	"time"

	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/httpapi"
	"github.com/tallybilling/tally/internal/metering"
	"github.com/tallybilling/tally/internal/stripeapi"
)

// reconcile compares the usage tally delivered on one meter with Stripe's
// meter event summaries, per customer, and exits 2 when any differ, so a
// cron job or CI check can alert on drift.
func reconcile(ctx context.Context, args []string, env environment) error {
	fs := newFlags("reconcile", "Compare usage delivered to Stripe with Stripe's meter event summaries, per customer.\nExits 2 when any customer differs. The window is floored to whole minutes; a future --to is clamped to now.\nEnds older than the usage retention (TALLY_RETENTION_USAGE_EVENTS) move to UTC day boundaries.", env)
	meter := fs.String("meter", "", "the meter event name, as in the catalog (required)")
	fromFlag := fs.String("from", "", "window start, RFC 3339 (required)")
	toFlag := fs.String("to", "", "window end, RFC 3339 (default: now)")
	asJSON := fs.Bool("json", false, "print the report as JSON (the shape of POST /v1/admin/reconciliations)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *meter == "" || *fromFlag == "" {
		fs.Usage()
		return errors.New("reconcile: --meter and --from are required")
	}
	from, err := time.Parse(time.RFC3339, *fromFlag)
	if err != nil {
		return fmt.Errorf("reconcile: --from: %w", err)
	}
	to := time.Now()
	if *toFlag != "" {
		if to, err = time.Parse(time.RFC3339, *toFlag); err != nil {
			return fmt.Errorf("reconcile: --to: %w", err)
		}
	}
	cfg, logger, gdb, err := connect(ctx, env)
	if err != nil {
		return err
	}
	defer db.Close(gdb)
	if cfg.Stripe.SecretKey == "" {
		return errors.New("reconcile: TALLY_STRIPE_SECRET_KEY is not set")
	}
	client, err := stripeapi.New(stripeapi.Config{
		SecretKey: cfg.Stripe.SecretKey, APIURL: cfg.Stripe.APIURL, MeterEventsURL: cfg.Stripe.MeterEventsURL, Logger: logger,
	})
	if err != nil {
		return err
	}

	svc := metering.New(metering.Options{DB: gdb, Stripe: client, Catalog: cfg.Catalog, UsageRetention: cfg.Retention.UsageEvents})
	rec, err := svc.Reconcile(ctx, *meter, from, to)
	if err != nil {
		return err
	}
	if *asJSON {
		err = printReconciliationJSON(env, rec)
	} else {
		err = printReconciliation(env, rec)
	}
	if err != nil {
		return err
	}
	if n := len(rec.Mismatches); n > 0 {
		return exitError{code: 2, err: fmt.Errorf("%d of %d customers differ from Stripe on meter %s", n, rec.Checked, rec.Meter)}
	}
	return nil
}

func printReconciliation(env environment, rec metering.Reconciliation) error {
	fmt.Fprintf(env.stdout, "meter %s, %s to %s: %d customers checked, %d differ\n",
		rec.Meter, rec.From.Format(time.RFC3339), rec.To.Format(time.RFC3339), rec.Checked, len(rec.Mismatches))
	if len(rec.Mismatches) == 0 {
		return nil
	}
	tw := tabwriter.NewWriter(env.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "CUSTOMER\tLOCAL\tSTRIPE\tDIFFERENCE")
	for _, m := range rec.Mismatches {
		fmt.Fprintf(tw, "%s\t%d\t%d\t%+d\n", m.CustomerID, m.LocalTotal, m.StripeTotal, m.Difference)
	}
	return tw.Flush()
}

// printReconciliationJSON prints the body of POST
// /v1/admin/reconciliations, so a script reads one shape.
func printReconciliationJSON(env environment, rec metering.Reconciliation) error {
	enc := json.NewEncoder(env.stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(httpapi.ToAPIReconciliation(rec))
}
