package credits_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/tallybilling/tally/internal/config"
	"github.com/tallybilling/tally/internal/credits"
	"github.com/tallybilling/tally/internal/db/dbtest"
)

// TestForecastWatcherBesideTheLockKeepers: on the smallest pool tally runs
// with (config.MinDBOpenConns), the three background jobs that keep a
// connection for their advisory lock while they work through the pool
// leave one connection to share, and the forecast watcher, a background
// job beside them, must finish its round on that one. It held its
// transaction's connection while it read each customer's consumption
// history through the pool: it and the three each held one and waited for
// a fifth, for good (background jobs have no deadline).
func TestForecastWatcherBesideTheLockKeepers(t *testing.T) {
	t.Parallel()
	f := newFixture(t, defaultCfg())
	const customers = 30
	for i := range customers {
		f.grant(fmt.Sprintf("fw-%02d", i), 100, nil)
	}
	sqlDB, err := f.db.DB()
	if err != nil {
		t.Fatal(err)
	}
	sqlDB.SetMaxOpenConns(config.MinDBOpenConns)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	stop := make(chan struct{})
	keepers := dbtest.LockKeepers(ctx, f.db, config.MinDBOpenConns-1, stop)
	done := make(chan error, 1)
	go func() {
		_, err := credits.NewForecastWatcher(f.svc).CheckOnce(ctx)
		done <- err
	}()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("forecast round: %v", err)
		}
	case <-time.After(20 * time.Second):
		stats := sqlDB.Stats()
		cancel()
		<-done
		t.Errorf("the forecast watcher's round has not finished in 20 s beside %d lock-keeping jobs on a pool of %d (%d in use, %d waits)",
			config.MinDBOpenConns-1, config.MinDBOpenConns, stats.InUse, stats.WaitCount)
	}
	close(stop)
	if err := keepers(); err != nil && ctx.Err() == nil {
		t.Errorf("lock keepers: %v", err)
	}
	if t.Failed() {
		return
	}
	if n := f.count(`SELECT count(*) FROM credit_forecast_state`); n != customers {
		t.Fatalf("%d customers checked, want %d", n, customers)
	}
}
