package dbtest

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/db"
)

// LockKeepers starts n jobs on gdb that use its pool as tally's background
// jobs behind an advisory lock do (db.TryExclusive: the invariant check,
// the usage reconciliation, the Stripe sync): each keeps one pooled
// connection for its session lock while it runs statements through the
// pool, one at a time, until stop is closed or ctx ends. It returns once
// every job holds its lock, so that n of the pool's connections are taken
// from then on, and gives a function that waits for the jobs to end and
// returns the first error (ctx's when it ended them).
func LockKeepers(ctx context.Context, gdb *gorm.DB, n int, stop <-chan struct{}) (wait func() error) {
	var wg sync.WaitGroup
	errc := make(chan error, n)
	held := make(chan struct{}, n)
	for i := range n {
		wg.Go(func() {
			ran, err := db.TryExclusive(ctx, gdb, db.LockKey(fmt.Sprintf("dbtest lock keeper %d", i)), func(ctx context.Context) error {
				held <- struct{}{}
				for {
					select {
					case <-stop:
						return nil
					case <-ctx.Done():
						return ctx.Err()
					default:
					}
					var one int
					if err := gdb.WithContext(ctx).Raw(`SELECT 1`).Scan(&one).Error; err != nil {
						return err
					}
				}
			})
			if err == nil && !ran {
				err = fmt.Errorf("lock keeper %d: the lock was taken", i)
			}
			if !ran {
				held <- struct{}{}
			}
			errc <- err
		})
	}
	for range n {
		select {
		case <-held:
		case <-ctx.Done():
		}
	}
	return func() error {
		wg.Wait()
		close(errc)
		var all []error
		for err := range errc {
			all = append(all, err)
		}
		return errors.Join(all...)
	}
}
