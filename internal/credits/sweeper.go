package credits

import (
	"context"
	"log/slog"
	"time"

	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/config"
	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/events"
)

// sweepBatch bounds the rows one sweeper transaction handles, so a large
// backlog never means one long transaction or many held locks.
const sweepBatch = 200

// Sweeper is the background worker that releases holds past their
// expires_at, records expiries (an expire entry for what is left of each
// grant past its expiry instant, less what holds keep) and sends
// credits.expiring once per grant ahead of its expiry. Every replica may run
// one: grants are claimed with FOR UPDATE SKIP LOCKED and each customer's
// expiries are written under its balance row's lock, so an expiry is
// recorded once however many sweepers race.
type Sweeper struct {
	db     *gorm.DB
	cfg    config.CreditsConfig
	now    func() time.Time
	logger *slog.Logger
	topUp  TopUpFunc
}

// SweeperOptions are what NewSweeper needs; the fields mean what they mean
// in Options.
type SweeperOptions struct {
	DB     *gorm.DB
	Config config.CreditsConfig
	Logger *slog.Logger
	Now    func() time.Time
	// TopUp: as Options.TopUp, for what expiries leave below a threshold.
	TopUp TopUpFunc
}

// NewSweeper returns the worker. It panics when o.Config does not
// validate, as New does.
func NewSweeper(o SweeperOptions) *Sweeper {
	mustValidate("credits.NewSweeper", o.Config)
	return &Sweeper{db: o.DB, cfg: o.Config, now: clockOr(o.Now), logger: loggerOr(o.Logger), topUp: o.TopUp}
}

// Name identifies the worker in logs.
func (w *Sweeper) Name() string { return "credits-sweeper" }

// Run sweeps every cfg.SweepInterval until ctx ends; a failed round is
// logged and retried at the next tick. It returns ctx's error.
func (w *Sweeper) Run(ctx context.Context) error {
	t := time.NewTicker(w.cfg.SweepInterval)
	defer t.Stop()
	for {
		if n, err := w.SweepOnce(ctx); err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			w.logger.Error("credits sweep failed", "error", err)
		} else if n > 0 {
			w.logger.Info("credits expired", "grants_and_holds", n)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
	}
}

// SweepOnce sends the due credits.expiring notices, releases every hold
// past its expires_at and records every expiry due now, and returns how
// many grants it expired plus holds it released. Safe to call from many
// goroutines and replicas at once.
func (w *Sweeper) SweepOnce(ctx context.Context) (int, error) {
	if err := w.notifyExpiring(ctx); err != nil {
		return 0, err
	}
	total := 0
	// Bounded rounds: a grant skipped because another transaction held it
	// is picked up at the next tick rather than spun on here.
	for range 100 {
		// Customers with a grant's unheld credits past expiry, or a hold
		// past its expires_at.
		var customerIDs []string
		now := w.now()
		err := w.db.WithContext(ctx).Raw(sweepDueSQL, now, sweepBatch, now, sweepBatch, sweepBatch).Scan(&customerIDs).Error
		if err != nil {
			return total, db.Translate(err, nil)
		}
		expired := 0
		for _, id := range customerIDs {
			n, err := w.expireCustomer(ctx, id)
			if err != nil {
				return total, err
			}
			expired += n
		}
		total += expired
		if len(customerIDs) < sweepBatch || expired == 0 {
			break
		}
	}
	return total, nil
}

func (w *Sweeper) expireCustomer(ctx context.Context, customerID string) (int, error) {
	threshold := w.cfg.DefaultLowBalanceThreshold
	n := 0
	err := db.InTx(ctx, w.db, func(tx *gorm.DB) error {
		n = 0
		// lockAccount expires what is due itself when the row's expiry bound
		// has passed; call expireDue directly so a stale bound cannot hide a
		// due grant from the sweeper.
		a, found, err := lockAccountNoExpiry(ctx, tx, customerID, w.now, &threshold)
		if err != nil || !found {
			return err
		}
		a.topUp = w.topUp
		// Asked of the holds themselves, as expireDue asks the grants, so
		// a stale bound cannot hide an overdue hold. Both run afterLowering
		// (thresholds, automatic top-up) for what they lowered.
		released, expired, err := a.releaseOverdueHolds(ctx, tx)
		if err != nil {
			return err
		}
		n += released + expired
		expired, err = a.expireDue(ctx, tx, true)
		n += expired
		return err
	})
	return n, err
}

// lockAccountNoExpiry locks the balance row without the expiry pass of
// lockAccount.
func lockAccountNoExpiry(ctx context.Context, tx *gorm.DB, customerID string, clock func() time.Time, defaultThreshold *int64) (*account, bool, error) {
	return lockAccountAt(ctx, tx, customerID, clock, defaultThreshold, false)
}

// notifyExpiring appends credits.expiring for grants with credits left
// whose expiry comes within a notice horizon, once per grant and horizon.
// With several horizons (720h, 168h, 24h) each covers the span up to the
// next shorter one: a grant is told once as it enters each span, and a
// grant created inside a short span gets that notice only, not every
// longer one at once. The longest horizon is recorded on the grant
// (expiring_notified_at, as with a single horizon), the others in
// credit_expiry_notices.
func (w *Sweeper) notifyExpiring(ctx context.Context) error {
	horizons := w.cfg.ExpiringNotices
	if len(horizons) == 0 {
		horizons = []time.Duration{w.cfg.ExpiringNotice}
	}
	for i, h := range horizons {
		if h <= 0 {
			continue
		}
		var shorter time.Duration // the span is (now + shorter, now + h]
		if i+1 < len(horizons) {
			shorter = horizons[i+1]
		}
		if err := w.notifyWithin(ctx, h, shorter, i == 0); err != nil {
			return err
		}
	}
	return nil
}

// sweepDueSQL finds customers with a grant's unheld credits past expiry,
// or a hold past its expires_at. remaining > 0 (implied by remaining >
// held) lets the planner use credit_grants_expiring; without it every
// sweep scanned every grant. Parameters: now, batch, now, batch, batch.
const sweepDueSQL = `SELECT customer_id FROM (
		(SELECT DISTINCT customer_id FROM credit_grants WHERE remaining > 0 AND remaining > held AND expires_at <= ? LIMIT ?)
		UNION
		(SELECT DISTINCT customer_id FROM credit_holds WHERE status = 'active' AND expires_at <= ? LIMIT ?)) due
	LIMIT ?`

// claimOnGrant and claimInTable claim due notices of one horizon:
// SKIP LOCKED, so sweepers on several replicas share them and none is sent
// twice. Parameters: now (sent time), now + shorter, now + horizon, batch.
const claimOnGrant = `UPDATE credit_grants SET expiring_notified_at = ?
	WHERE id IN (
		SELECT id FROM credit_grants
		WHERE remaining > 0 AND expiring_notified_at IS NULL
		  AND expires_at > ? AND expires_at <= ?
		ORDER BY expires_at
		LIMIT ?
		FOR UPDATE SKIP LOCKED)
	RETURNING id, customer_id, remaining, expires_at`

const claimInTable = `WITH due AS (
		SELECT g.id, g.customer_id, g.remaining, g.expires_at FROM credit_grants g
		WHERE g.remaining > 0 AND g.expires_at > ? AND g.expires_at <= ?
		  AND NOT EXISTS (SELECT 1 FROM credit_expiry_notices n WHERE n.grant_id = g.id AND n.notice_seconds = ?)
		ORDER BY g.expires_at
		LIMIT ?
		FOR UPDATE OF g SKIP LOCKED
	), sent AS (
		INSERT INTO credit_expiry_notices (grant_id, notice_seconds, sent_at)
		SELECT id, ?, ? FROM due ON CONFLICT DO NOTHING RETURNING grant_id
	)
	SELECT due.* FROM due JOIN sent ON sent.grant_id = due.id`

func (w *Sweeper) notifyWithin(ctx context.Context, horizon, shorter time.Duration, longest bool) error {
	for {
		n := 0
		err := db.InTx(ctx, w.db, func(tx *gorm.DB) error {
			now := w.now()
			type due struct {
				ID         string
				CustomerID string
				Remaining  int64
				ExpiresAt  time.Time
			}
			var grants []due
			var err error
			if longest {
				err = tx.WithContext(ctx).Raw(claimOnGrant, now, now.Add(shorter), now.Add(horizon), sweepBatch).Scan(&grants).Error
			} else {
				secs := int64(horizon / time.Second)
				err = tx.WithContext(ctx).Raw(claimInTable, now.Add(shorter), now.Add(horizon), secs, sweepBatch, secs, now).Scan(&grants).Error
			}
			if err != nil {
				return err
			}
			n = len(grants)
			for _, g := range grants {
				if err := events.Append(ctx, tx, g.CustomerID, events.CreditsExpiring{
					CustomerID: g.CustomerID, GrantID: g.ID, Remaining: g.Remaining, ExpiresAt: g.ExpiresAt.UTC(),
					NoticeSeconds: int64(horizon / time.Second),
				}); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			return err
		}
		if n < sweepBatch {
			return nil
		}
	}
}
