package metering

import (
	"context"
	"math"
	"slices"
	"time"

	"gorm.io/gorm"
	"gorm.io/gorm/clause"
)

// The meter event rate limit is the cluster's, because Stripe counts the
// requests of the account, not of one instance. Every running Worker keeps a
// row in meter_workers fresh and paces itself at its share of the limit
// among the live rows. Shares are whole requests per second that add up to
// at most the limit, so the per-worker pacing guarantees of paced add up to
// the cluster's (fractional shares of different workers would each round up
// within one second: three workers at 20/3 could send 7+7+7).
//
// What keeps the sum under the limit while workers come and go:
//   - A worker's share never grows when another joins, and never shrinks
//     when one leaves (shareOf), so a worker acting on a view that is a
//     superset of the workers really sending never takes more than its part.
//   - A worker that finds others already registered waits joinDelay before
//     its first request: by then every sending worker has counted it (each
//     sends only within staleAfter of a heartbeat that recounted), its last
//     request reserved at the old rate has gone, and so has the one-second
//     window that request falls in.
//   - A worker whose own heartbeat is older than staleAfter stops sending
//     before the others could drop its row from their count (liveWindow).
//   - A worker that stops keeps its row until its last request has left
//     the one-second window, so the others raise their share only then.
//
// With more live workers than requests per second in the limit, each gets
// an even fractional share, and the per-second bound holds only on average.

// defaultHeartbeatInterval is how often a worker refreshes its row and
// recounts the live workers.
const defaultHeartbeatInterval = 2 * time.Second

// liveWindow is how old a heartbeat may be for its worker to count.
func (w *Worker) liveWindow() time.Duration { return 3 * w.opts.HeartbeatInterval }

// staleAfter is how old this worker's own last heartbeat may be for it to
// keep sending; one interval short of liveWindow.
func (w *Worker) staleAfter() time.Duration { return 2 * w.opts.HeartbeatInterval }

// joinDelay is how long a worker joining others waits before its first
// request: every sending worker recounts within staleAfter, then sends at
// most one more request reserved at its old share (at most a second apart,
// shares being at least one request per second), whose one-second window
// must pass too.
func (w *Worker) joinDelay() time.Duration {
	return w.staleAfter() + 2*(time.Second+jitterMargin)
}

// shareOf is self's share of limit requests per second among the live
// workers ids (sorted, containing self). The whole requests of the limit are
// split evenly, the remainder going one each to the first workers by id, so
// the shares add up to the limit. A lone worker keeps the limit as it is.
func shareOf(limit float64, ids []string, self string) float64 {
	n := len(ids)
	if n <= 1 {
		return limit
	}
	budget := int(math.Floor(limit))
	if budget < n {
		return limit / float64(n)
	}
	share := budget / n
	if slices.Index(ids, self) < budget%n {
		share++
	}
	return float64(share)
}

// RateShare is the meter event requests per second this worker currently
// allows itself: TALLY_METER_RATE_LIMIT split between the live workers while
// Run runs, the whole limit before its first heartbeat.
func (w *Worker) RateShare() float64 {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.share
}

// heartbeat beats every HeartbeatInterval until ctx ends.
func (w *Worker) heartbeat(ctx context.Context) {
	t := time.NewTicker(w.opts.HeartbeatInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			w.beat(ctx)
		}
	}
}

// meterWorkerRow is a row of meter_workers: a delivery worker alive at its
// last heartbeat, by the database's clock.
type meterWorkerRow struct {
	ID          string `gorm:"primaryKey"`
	HeartbeatAt time.Time
}

func (meterWorkerRow) TableName() string { return "meter_workers" }

// beat refreshes this worker's row, recounts the live workers and sets the
// limiter to this worker's share. Timestamps are the database's, so the
// instances' clocks need not agree.
func (w *Worker) beat(ctx context.Context) {
	start := time.Now()
	window := w.liveWindow().Seconds()
	var live []string
	err := w.db.WithContext(ctx).Model(&meterWorkerRow{}).
		Clauses(clause.OnConflict{Columns: []clause.Column{{Name: "id"}}, DoUpdates: clause.AssignmentColumns([]string{"heartbeat_at"})}).
		Create(map[string]any{"id": w.opts.Name, "heartbeat_at": gorm.Expr("now()")}).Error
	if err == nil {
		// A statement of its own, after ours committed: of two workers
		// registering at once, at least the later one sees the other.
		err = w.db.WithContext(ctx).Model(&meterWorkerRow{}).Where("heartbeat_at > now() - make_interval(secs => ?)", window).Order("id").Pluck("id", &live).Error
	}
	if err != nil {
		if ctx.Err() == nil {
			w.log.Warn("meter worker heartbeat failed; sending stops if it stays failed", "error", err)
		}
		return
	}
	if !slices.Contains(live, w.opts.Name) {
		live = append(live, w.opts.Name)
		slices.Sort(live)
	}
	share := shareOf(w.cfg.RateLimit, live, w.opts.Name)
	w.limiter.SetLimit(paced(share))

	w.mu.Lock()
	if w.beatOK.IsZero() || start.Sub(w.beatOK) > w.staleAfter() {
		// Joining, or back after a gap the others may have counted us out in.
		w.sendFrom = time.Now()
		if len(live) > 1 {
			w.sendFrom = w.sendFrom.Add(w.joinDelay())
		}
	}
	w.beatOK = start
	changed := share != w.share || len(live) != w.liveWorkers
	w.share, w.liveWorkers = share, len(live)
	w.mu.Unlock()
	if changed {
		w.log.Info("meter event rate limit shared", "live_workers", len(live), "rate_limit", w.cfg.RateLimit, "share", share)
	}

	// Rows of crashed workers no longer count; drop them.
	err = w.db.WithContext(ctx).Where("heartbeat_at <= now() - make_interval(secs => ?)", window).Delete(&meterWorkerRow{}).Error
	if err != nil && ctx.Err() == nil {
		w.log.Warn("delete stale meter workers", "error", err)
	}
}

// holdLeft is how long this worker must not send for the rate share's sake:
// it is joining, or its own heartbeat is too old to be sure the others count
// it. Outside Run there is nobody to share with, and no hold.
func (w *Worker) holdLeft() time.Duration {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.sharing {
		return 0
	}
	now := time.Now()
	if w.beatOK.IsZero() || now.Sub(w.beatOK) > w.staleAfter() {
		return w.opts.HeartbeatInterval
	}
	return max(0, w.sendFrom.Sub(now))
}

// join registers this worker and keeps its heartbeat going until the
// returned leave is called. leave stops the heartbeat and deletes the row
// once this worker's last request has left Stripe's one-second window.
func (w *Worker) join(ctx context.Context) (leave func()) {
	w.mu.Lock()
	w.sharing = true
	w.mu.Unlock()
	w.beat(ctx)
	hctx, stop := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		w.heartbeat(hctx)
	}()
	return func() {
		stop()
		<-done
		w.mu.Lock()
		w.sharing, w.beatOK, w.sendFrom = false, time.Time{}, time.Time{}
		lastSend := w.lastSend
		w.mu.Unlock()
		if d := time.Until(lastSend.Add(time.Second + jitterMargin)); d > 0 {
			time.Sleep(d)
		}
		dctx, cancel := withTimeout(ctx, recordTimeout)
		defer cancel()
		if err := w.db.WithContext(dctx).Where("id = ?", w.opts.Name).Delete(&meterWorkerRow{}).Error; err != nil {
			w.log.Warn("delete meter worker row; it ages out instead", "error", err)
		}
	}
}
