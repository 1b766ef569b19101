package db_test

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/db/dbtest"
)

// Twenty callers of one job at once: the job runs for one at a time only,
// the others hear ran=false; once it ends the lock is free again, also
// after a run that failed.
func TestTryExclusiveRunsOneAtATime(t *testing.T) {
	t.Parallel()
	gdb := dbtest.New(t)
	ctx := context.Background()
	key := db.LockKey("test job")
	var running, most, ran atomic.Int32
	var wg sync.WaitGroup
	for range 20 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ok, err := db.TryExclusive(ctx, gdb, key, func(context.Context) error {
				n := running.Add(1)
				for m := most.Load(); n > m && !most.CompareAndSwap(m, n); m = most.Load() {
				}
				time.Sleep(50 * time.Millisecond)
				running.Add(-1)
				return nil
			})
			if err != nil {
				t.Error(err)
			}
			if ok {
				ran.Add(1)
			}
		}()
	}
	wg.Wait()
	if most.Load() != 1 || ran.Load() < 1 {
		t.Fatalf("at most %d ran at once, %d ran; want 1 at a time", most.Load(), ran.Load())
	}
	boom := errors.New("boom")
	if ok, err := db.TryExclusive(ctx, gdb, key, func(context.Context) error { return boom }); !ok || !errors.Is(err, boom) {
		t.Fatalf("a failing run: %v, %v", ok, err)
	}
	if ok, err := db.TryExclusive(ctx, gdb, key, func(context.Context) error { return nil }); !ok || err != nil {
		t.Fatalf("after a failed run the lock is not free: %v, %v", ok, err)
	}
}
