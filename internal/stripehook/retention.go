package stripehook

import (
	"context"
	"time"

	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/db"
)

// PurgeSettled deletes at most size stored Stripe events received before
// olderThan whose processing is settled (processed or ignored), in one short
// statement, and returns how many it deleted; db.PurgeInBatches repeats it.
// Events still to be processed, failed or parked are never purged, whatever
// their age: they wait for the retry worker or an operator. Callers keep
// olderThan at least 35 days back (config.MinStripeEventRetention): until
// then Stripe may redeliver an event, and its stored id is what makes the
// redelivery a no-op. Errors: errs.Unavailable.
func PurgeSettled(ctx context.Context, gdb *gorm.DB, olderThan time.Time, size int) (int64, error) {
	// A MATERIALIZED CTE runs once: a subquery the planner rescanned would,
	// with SKIP LOCKED, pass over the rows already deleted and take more.
	res := gdb.WithContext(ctx).Exec(`
		WITH picked AS MATERIALIZED (
			SELECT id FROM stripe_events
			WHERE status IN ('processed', 'ignored') AND received_at < ?
			ORDER BY received_at LIMIT ? FOR UPDATE SKIP LOCKED)
		DELETE FROM stripe_events e USING picked WHERE e.id = picked.id`, olderThan, size)
	return res.RowsAffected, db.Translate(res.Error, nil)
}
