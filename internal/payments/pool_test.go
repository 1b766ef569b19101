package payments_test

import (
	"context"
	"fmt"
	"net/http"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/config"
	"github.com/tallybilling/tally/internal/customers"
	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/db/dbtest"
	"github.com/tallybilling/tally/internal/payments"
)

// autoTopUpsDue sets up n customers with automatic top-up on, a saved card
// and a pending automatic top-up started the way a consume starts one
// (StartAutoTopUp in the consume's transaction), and has the fake Stripe
// charge every off-session PaymentIntent successfully. It returns the
// customers, in the order the worker charges them, and how many charges
// reached Stripe so far.
func autoTopUpsDue(t *testing.T, gdb *gorm.DB, svc *payments.Service, fake interface {
	SetFault(func(r *http.Request) (int, string, bool))
}, n int) ([]string, *atomic.Int64) {
	t.Helper()
	ctx := context.Background()
	now := time.Now()
	var ids []string
	for i := range n {
		c := fmt.Sprintf("pool-%02d", i)
		ids = append(ids, c)
		err := db.InTx(ctx, gdb, func(tx *gorm.DB) error {
			if _, err := customers.Ensure(ctx, tx, c, now); err != nil {
				return err
			}
			return tx.Exec(`INSERT INTO customer_payment_methods (customer_id, stripe_payment_method_id, stripe_customer_id, brand, last4, exp_month, exp_year, updated_at)
				VALUES (?, ?, ?, 'visa', '4242', 12, 2099, now())`, c, "pm_"+c, "cus_"+c).Error
		})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := svc.PutAutoTopUp(ctx, payments.AutoTopUpInput{CustomerID: c, Enabled: true, Threshold: 50, Item: "starter", Quantity: 1}); err != nil {
			t.Fatal(err)
		}
		if err := db.InTx(ctx, gdb, func(tx *gorm.DB) error { return svc.StartAutoTopUp(ctx, tx, c, 0, now) }); err != nil {
			t.Fatal(err)
		}
	}
	pi := new(atomic.Int64)
	fake.SetFault(func(r *http.Request) (int, string, bool) {
		if r.Method != http.MethodPost || r.URL.Path != "/v1/payment_intents" {
			return 0, "", false
		}
		return http.StatusOK, fmt.Sprintf(`{"id":"pi_pool_%d","object":"payment_intent","status":"succeeded","amount":1000,"amount_received":1000,"currency":"usd","livemode":false}`, pi.Add(1)), true
	})
	var pending int
	if err := gdb.Raw(`SELECT count(*) FROM payments WHERE method = 'auto_top_up' AND status = 'pending' AND payment_intent_id IS NULL`).Scan(&pending).Error; err != nil || pending != n {
		t.Fatalf("%d automatic top-ups due, want %d (%v)", pending, n, err)
	}
	return ids, pi
}

// chargeWithin runs ChargeDueAutoTopUps on the pool shrunk to the smallest
// tally runs with (config.MinDBOpenConns), beside what load starts once the
// pool is small, and fails unless it charges every due top-up within 20 s.
func chargeWithin(t *testing.T, gdb *gorm.DB, svc *payments.Service, due int, load func(ctx context.Context, stop <-chan struct{}) func() error) {
	t.Helper()
	sqlDB, err := gdb.DB()
	if err != nil {
		t.Fatal(err)
	}
	sqlDB.SetMaxOpenConns(config.MinDBOpenConns)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	stop := make(chan struct{})
	wait := load(ctx, stop)
	type result struct {
		n   int
		err error
	}
	done := make(chan result, 1)
	go func() {
		n, err := svc.ChargeDueAutoTopUps(ctx)
		done <- result{n, err}
	}()
	select {
	case r := <-done:
		if r.err != nil || r.n != due {
			t.Errorf("charged %d of %d automatic top-ups: %v", r.n, due, r.err)
		}
	case <-time.After(20 * time.Second):
		stats := sqlDB.Stats()
		cancel()
		<-done
		t.Errorf("the automatic top-up worker's round has not finished in 20 s on a pool of %d (%d in use, %d waits)",
			config.MinDBOpenConns, stats.InUse, stats.WaitCount)
	}
	close(stop)
	if err := wait(); err != nil && ctx.Err() == nil {
		t.Errorf("load beside the worker: %v", err)
	}
	if t.Failed() {
		return
	}
	var charged int
	if err := gdb.Raw(`SELECT count(*) FROM payments WHERE method = 'auto_top_up' AND payment_intent_id IS NOT NULL`).Scan(&charged).Error; err != nil || charged != due {
		t.Fatalf("%d automatic top-ups recorded a PaymentIntent, want %d (%v)", charged, due, err)
	}
}

// TestAutoTopUpChargeBesideTheLockKeepers: on the smallest pool, the
// three background jobs that keep a connection for their advisory lock
// while they work through the pool leave one connection to share, and the
// automatic top-up worker, a background job beside them, must charge on
// that one. It held its transaction's connection (and the payment's lock)
// while it read the saved card through the pool: it and the three each
// held one and waited for a fifth, for good.
func TestAutoTopUpChargeBesideTheLockKeepers(t *testing.T) {
	t.Parallel()
	gdb := dbtest.New(t)
	fake, stripe := fakeClient(t)
	svc := newService(t, gdb, stripe, config.ConfirmOnPaymentIntent)
	const due = 5
	_, _ = autoTopUpsDue(t, gdb, svc, fake, due)
	chargeWithin(t, gdb, svc, due, func(ctx context.Context, stop <-chan struct{}) func() error {
		return dbtest.LockKeepers(ctx, gdb, config.MinDBOpenConns-1, stop)
	})
}

// TestAutoTopUpChargeWhileSettingsAreSaved: a customer's automatic top-up
// settings are saved (PUT .../auto-top-up, eight at once, more than the
// pool has connections) while the worker charges the customer's top-up
// (five customers, one after another). A
// charge holds the settings (FOR SHARE) until Stripe has answered, so a
// save waits, keeping its pooled connection; the charge must need no
// other. It read the saved card through the pool: once the waiting saves
// held every other connection, the charge waited for one of theirs and
// they for its lock, until their callers gave up.
func TestAutoTopUpChargeWhileSettingsAreSaved(t *testing.T) {
	t.Parallel()
	gdb := dbtest.New(t)
	fake, stripe := fakeClient(t)
	svc := newService(t, gdb, stripe, config.ConfirmOnPaymentIntent)
	const due = 5
	ids, charged := autoTopUpsDue(t, gdb, svc, fake, due)
	chargeWithin(t, gdb, svc, due, func(ctx context.Context, stop <-chan struct{}) func() error {
		var wg sync.WaitGroup
		errc := make(chan error, 8)
		for range 8 {
			wg.Go(func() {
				for {
					select {
					case <-stop:
						return
					case <-ctx.Done():
						return
					default:
					}
					_, err := svc.PutAutoTopUp(ctx, payments.AutoTopUpInput{CustomerID: ids[min(int(charged.Load()), due-1)], Enabled: true, Threshold: 50, Item: "starter", Quantity: 1})
					if err != nil && ctx.Err() == nil {
						errc <- err
						return
					}
				}
			})
		}
		return func() error {
			wg.Wait()
			close(errc)
			return <-errc
		}
	})
}
