package credits_test

import (
	"context"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/credits"
	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/db/dbtest"
	"github.com/tallybilling/tally/internal/errs"
)

// ledgerOutOfOrder counts pairs of one customer's ledger entries where the
// later entry (higher seq) carries an earlier created_at.
func ledgerOutOfOrder(t *testing.T, gdb *gorm.DB, customerID string) int64 {
	t.Helper()
	var n int64
	err := gdb.Raw(`SELECT count(*) FROM credit_ledger a JOIN credit_ledger b
		ON b.customer_id = a.customer_id AND b.seq > a.seq AND b.created_at < a.created_at
		WHERE a.customer_id = ?`, customerID).Scan(&n).Error
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// Many goroutines consume and grant for one customer at once, through the
// service and inside callers' transactions (as a purchase is granted), with
// the real clock and with clocks that disagree by up to a second (replicas
// whose clocks drift). Entries are listed by seq; their times must never go
// backwards along it.
func TestLedgerTimesFollowTheSequenceUnderConcurrency(t *testing.T) {
	t.Parallel()
	if testing.Short() {
		t.Skip("slow: many rounds or real seconds of pacing (skipped by -short; make test runs it)")
	}
	for _, c := range []struct {
		name  string
		clock func() time.Time
	}{
		{"real clock", time.Now},
		{"skewed clocks", func() time.Time {
			return time.Now().Add(time.Duration(rand.Int64N(int64(2*time.Second))) - time.Second)
		}},
	} {
		t.Run(c.name, func(t *testing.T) {
			gdb := dbtest.New(t)
			svc := credits.New(credits.Options{DB: gdb, Config: defaultCfg(), Now: c.clock, Logger: dbtest.Logger(t)})
			ctx := context.Background()
			in := credits.GrantInput{CustomerID: "tick", Amount: 1_000, Reason: "float", Source: credits.SourceService}
			if _, _, err := svc.Grant(ctx, in, key("tick", "float", in)); err != nil {
				t.Fatal(err)
			}
			const n = 90
			var wg sync.WaitGroup
			errc := make(chan error, n)
			for i := range n {
				wg.Add(1)
				go func() {
					defer wg.Done()
					var err error
					switch i % 3 {
					case 0:
						in := credits.ConsumeInput{CustomerID: "tick", Amount: 1, Reason: "call"}
						_, _, err = svc.Consume(ctx, in, key("tick", freshKey(), in))
					case 1:
						in := credits.GrantInput{CustomerID: "tick", Amount: 1, Reason: "bonus", Source: credits.SourceService}
						_, _, err = svc.Grant(ctx, in, key("tick", freshKey(), in))
					default:
						err = db.InTx(ctx, gdb, func(tx *gorm.DB) error {
							_, err := credits.Grant(ctx, tx, c.clock, credits.GrantInput{CustomerID: "tick", Amount: 1, Reason: "in a caller's tx", Source: credits.SourceService})
							return err
						})
					}
					errc <- err
				}()
			}
			wg.Wait()
			close(errc)
			for err := range errc {
				if err != nil {
					t.Fatal(err)
				}
			}
			if bad := ledgerOutOfOrder(t, gdb, "tick"); bad > 0 {
				t.Fatalf("%d pairs of ledger entries whose created_at goes backwards along seq", bad)
			}
			rep, err := credits.Verify(ctx, gdb)
			if err != nil || !rep.OK {
				t.Fatalf("verify: %v %+v", err, rep.Problems)
			}
		})
	}
}

// A consume that starts before a grant's expiry but gets the balance row
// only after it must not spend the expired credits: "now" is taken once the
// lock is held, for the expiry decision as for the entry's time.
func TestExpiryIsDecidedAfterTheLock(t *testing.T) {
	t.Parallel()
	f := newFixture(t, defaultCfg())
	start := f.clock.Now()
	expiry := start.Add(time.Minute)
	f.grant("late", 10, &expiry)

	holder := f.db.Begin()
	defer holder.Rollback()
	if err := holder.Exec(`SELECT 1 FROM credit_balances WHERE customer_id = 'late' FOR UPDATE`).Error; err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		_, err := f.consume("late", 5)
		done <- err
	}()
	waitForLockWaiter(t, f.db)
	f.clock.Set(expiry.Add(time.Second))
	if err := holder.Rollback().Error; err != nil {
		t.Fatal(err)
	}
	err := <-done
	if e, ok := errs.As(err); !ok || e.Code != errs.InsufficientCredits || e.Extra["balance"] != int64(0) {
		t.Fatalf("consume that got the lock after the expiry: %v, want insufficient_credits with balance 0", err)
	}
	// The sweeper records the expiry at its own time, after the grant.
	if _, err := f.sweep.SweepOnce(f.ctx); err != nil {
		t.Fatal(err)
	}
	entries := f.ledger("late")
	if len(entries) != 2 || entries[0].Kind != credits.KindExpire || entries[0].CreatedAt.Before(expiry) {
		t.Fatalf("ledger %+v, want the grant then its expiry stamped at or after %s", entries, expiry)
	}
	f.mustVerify()
}

// waitForLockWaiter waits until a session of the test database waits on a lock.
func waitForLockWaiter(t *testing.T, gdb *gorm.DB) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		var n int64
		if err := gdb.Raw(`SELECT count(*) FROM pg_stat_activity
			WHERE datname = current_database() AND wait_event_type = 'Lock'`).Scan(&n).Error; err != nil {
			t.Fatal(err)
		}
		if n > 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("no session waited on the balance row lock")
		}
		time.Sleep(10 * time.Millisecond)
	}
}
