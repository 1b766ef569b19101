package db

import (
	"context"
	"time"
)

// PurgeBatch deletes at most size expired rows of one kind in one short
// statement and returns how many it deleted.
type PurgeBatch func(ctx context.Context, size int) (int64, error)

// purgePause is the breath between two full batches, so a large backlog is
// purged as a trickle of short statements rather than a burst that would
// compete with the money paths for I/O and locks.
const purgePause = 20 * time.Millisecond

// PurgeInBatches calls batch with size until a call deletes fewer than size
// rows, and returns how many were deleted in all. Each call is its own short
// statement, so a purge never holds many row locks or one long transaction,
// and purges running on several instances at once share the work (every
// batch skips rows locked by another). ctx ending stops it between batches
// with ctx's error.
func PurgeInBatches(ctx context.Context, size int, batch PurgeBatch) (int64, error) {
	var total int64
	for {
		n, err := batch(ctx, size)
		total += n
		if err != nil || n < int64(size) {
			return total, err
		}
		t := time.NewTimer(purgePause)
		select {
		case <-ctx.Done():
			t.Stop()
			return total, ctx.Err()
		case <-t.C:
		}
	}
}
