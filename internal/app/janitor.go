package app

import (
	"context"
	"log/slog"
	"time"

	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/db"
)

// idempotencyJanitor deletes idempotency keys well past their 24 h replay
// window, so the table stays the size of a day or two of traffic. Keys past
// the window are already ignored; this only reclaims space, so running it on
// every replica at once is harmless.
type idempotencyJanitor struct {
	db       *gorm.DB
	logger   *slog.Logger
	now      func() time.Time
	interval time.Duration
}

func (j idempotencyJanitor) Name() string { return "idempotency-janitor" }

func (j idempotencyJanitor) Run(ctx context.Context) error {
	t := time.NewTicker(j.interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
			n, err := db.PurgeIdempotencyKeys(ctx, j.db, j.now().Add(-2*db.IdempotencyRetention))
			if err != nil && ctx.Err() == nil {
				j.logger.Warn("purge idempotency keys", "error", err)
			} else if n > 0 {
				j.logger.Info("purged idempotency keys", "count", n)
			}
		}
	}
}
