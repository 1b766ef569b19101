package events

import (
	"context"
	"time"

	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/db"
)

// Purge deletes at most size events created before olderThan, oldest first,
// in one short statement, and returns how many it deleted;
// db.PurgeInBatches repeats it. A poller whose cursor points at a deleted
// event goes on from the next one (the cursor is a position, not a row), so
// only a consumer that stopped reading for longer than the retention misses
// events. When keepUnpushed (the webhook push is configured), events the
// push has not delivered yet are kept whatever their age, and so is any
// event not yet visible in the feed. Errors: errs.Unavailable.
func Purge(ctx context.Context, gdb *gorm.DB, olderThan time.Time, size int, keepUnpushed bool) (int64, error) {
	// A MATERIALIZED CTE runs once: a subquery the planner rescanned would,
	// with SKIP LOCKED, pass over the rows already deleted and take more.
	res := gdb.WithContext(ctx).Exec(`
		WITH picked AS MATERIALIZED (
			SELECT e.id FROM events e
			WHERE e.created_at < ?
			  AND e.txid < pg_snapshot_xmin(pg_current_snapshot())
			  AND (NOT ? OR (e.txid, e.id) <= (SELECT cursor_txid, cursor_id FROM event_push_state WHERE id = 1))
			ORDER BY e.created_at LIMIT ? FOR UPDATE SKIP LOCKED)
		DELETE FROM events e USING picked WHERE e.id = picked.id`, olderThan, keepUnpushed, size)
	return res.RowsAffected, db.Translate(res.Error, nil)
}
