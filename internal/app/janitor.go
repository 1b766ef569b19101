package app

import (
	"context"
	"log/slog"
	"time"

	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/config"
	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/events"
	"github.com/tallybilling/tally/internal/metering"
	"github.com/tallybilling/tally/internal/stripehook"
)

// janitor deletes, every cfg.Interval, what would otherwise grow without
// bound (see README.md, Retention): stored Stripe events, delivered usage
// events (kept on as daily totals), the outbound event feed and idempotency
// keys older than their retention. Each purge is a run of short statements
// of at most cfg.BatchSize rows that skip rows locked by others, so it never
// holds a long lock or a big transaction on the money paths, and every
// replica may run it at once.
type janitor struct {
	db       *gorm.DB
	logger   *slog.Logger
	now      func() time.Time
	cfg      config.RetentionConfig
	metering *metering.Service
	// keepUnpushed keeps feed events the webhook push has not delivered.
	keepUnpushed bool
}

func (j janitor) Name() string { return "retention-janitor" }

func (j janitor) Run(ctx context.Context) error {
	t := time.NewTicker(j.cfg.Interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
			j.purge(ctx)
		}
	}
}

// purge runs every purge once, each to its end.
func (j janitor) purge(ctx context.Context) {
	now := j.now()
	for _, p := range []struct {
		what  string
		batch db.PurgeBatch
	}{
		{"stripe_events", func(ctx context.Context, size int) (int64, error) {
			return stripehook.PurgeSettled(ctx, j.db, now.Add(-j.cfg.StripeEvents), size)
		}},
		{"usage_refusal_reports", func(ctx context.Context, size int) (int64, error) {
			return metering.PurgeRefusalReports(ctx, j.db, now.Add(-j.cfg.StripeEvents), size)
		}},
		{"usage_events", j.metering.PurgeDelivered},
		{"events", func(ctx context.Context, size int) (int64, error) {
			return events.Purge(ctx, j.db, now.Add(-j.cfg.Events), size, j.keepUnpushed)
		}},
		{"idempotency_keys", func(ctx context.Context, size int) (int64, error) {
			return db.PurgeIdempotencyKeys(ctx, j.db, now.Add(-j.cfg.IdempotencyKeys), size)
		}},
	} {
		n, err := db.PurgeInBatches(ctx, j.cfg.BatchSize, p.batch)
		if err != nil && ctx.Err() == nil {
			j.logger.Warn("retention purge failed; it runs again next interval", "table", p.what, "purged", n, "error", err)
		} else if n > 0 {
			j.logger.Info("retention purge", "table", p.what, "purged", n)
		}
		if ctx.Err() != nil {
			return
		}
	}
}
