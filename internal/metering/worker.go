package metering

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/time/rate"
	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/config"
	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/errs"
	"github.com/tallybilling/tally/internal/events"
	"github.com/tallybilling/tally/internal/stripeapi"
	"github.com/tallybilling/tally/internal/text"
)

// WorkerOptions tunes a Worker beyond its configuration: the clock, the
// metrics and the timings that are not settings (tests shorten them). Every
// zero field takes its default, set here and nowhere else.
type WorkerOptions struct {
	Logger *slog.Logger
	// Now is the clock for due times and leases; default time.Now.
	Now func() time.Time
	// Registerer receives the worker's metrics; nil keeps them unregistered.
	Registerer prometheus.Registerer
	// Name identifies this instance in claimed_by; default a fresh id.
	Name string
	// BackoffBase shapes the retry delay after a 5xx, timeout or network
	// failure: a uniformly random delay in [0, min(cfg.BackoffMax,
	// BackoffBase·2^(attempts-1))] ("full jitter"); default 2s.
	BackoffBase time.Duration
	// SendTimeout bounds one Stripe request, including one still in flight
	// when shutdown begins; default 20s.
	SendTimeout time.Duration
	// SessionRenewBefore is how long before its expiry a v2 meter event
	// session is replaced; default 1m.
	SessionRenewBefore time.Duration
	// Concurrency is how many customer+meter groups the v1 transport sends
	// at once; default RateLimit/4, at least 8 and at most 128. Events of
	// one customer and meter are always sent one after the other (Stripe
	// allows one concurrent call per pair).
	Concurrency int
	// RateLimitPause is how long sending pauses after a 429 without
	// Retry-After; default 1s.
	RateLimitPause time.Duration
	// AuthPause is how long sending pauses after Stripe refuses our key
	// (401, 403); default 1m. A wrong key is the operator's to fix, not the
	// events' fault, so it neither counts attempts nor dead-letters.
	AuthPause time.Duration
	// HeartbeatInterval is how often a running worker refreshes its row in
	// meter_workers and recounts the live workers it shares the rate limit
	// with; default 2s. A worker whose heartbeat is three intervals old no
	// longer counts, and one joining others waits two intervals and about
	// two seconds before sending.
	HeartbeatInterval time.Duration
}

// Worker delivers usage events to Stripe. Run one on every instance: claims
// are exclusive (FOR UPDATE SKIP LOCKED plus a lease), and a claim whose
// worker died expires and is taken over. The rate limit holds for all the
// running Workers on one database together (see share.go).
//
// Failures are retried by time, not by count: an event that failed
// retryably (5xx, timeout, network) is sent again after a capped, jittered
// backoff for as long as Stripe accepts its timestamp (DeliveryWindow), so
// an outage of hours or days loses nothing. An event whose timestamp leaves
// the window first, pending or waiting for its customer, is dead-lettered
// with DeadTooOld; one Stripe refuses is dead-lettered with
// DeadStripeRefused.
type Worker struct {
	db     *gorm.DB
	client stripeapi.Client
	cfg    config.MeteringConfig
	opts   WorkerOptions
	log    *slog.Logger
	now    func() time.Time
	m      *metrics

	limiter *rate.Limiter
	// waitMu lets one request at a time hold a reservation on limiter, so
	// a new share applies from the next request on.
	waitMu sync.Mutex
	seq    atomic.Uint64

	mu          sync.Mutex
	pausedUntil time.Time
	session     stripeapi.MeterEventSession
	gaugesAt    time.Time
	waitingAt   time.Time
	expiredAt   time.Time
	// The rate share (share.go): sharing while Run runs; the time of the
	// last successful heartbeat, of the first request allowed, of the
	// last request sent; the share and how many workers it was split by.
	sharing     bool
	beatOK      time.Time
	sendFrom    time.Time
	lastSend    time.Time
	share       float64
	liveWorkers int
}

// recordTimeout bounds writing one outcome, also during shutdown.
const recordTimeout = 10 * time.Second

// releaseLimit bounds how many waiting events one round releases, so a
// large backlog is moved in short statements.
const releaseLimit = 5000

// expireEvery is how often (by the worker's clock) a round looks for
// events whose timestamp left Stripe's window, and expireLimit how many it
// dead-letters at once. The look is one range scan of a small partial
// index (usage_events_undelivered_time).
const (
	expireEvery = time.Second
	expireLimit = 500
)

// NewWorker returns a Worker sending through client with cfg's transport,
// rate limit, batch size, backoff cap and poll interval. cfg comes from
// config, which holds their defaults: it panics when cfg does not validate
// (a zero setting in a hand-built MeteringConfig is a programming error).
func NewWorker(gdb *gorm.DB, client stripeapi.Client, cfg config.MeteringConfig, opts WorkerOptions) *Worker {
	if err := cfg.Validate(); err != nil {
		panic(fmt.Errorf("metering.NewWorker: %w", err))
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.Name == "" {
		opts.Name = db.NewID("wrk")
	}
	opts.BackoffBase = cmp.Or(opts.BackoffBase, 2*time.Second)
	opts.SendTimeout = cmp.Or(opts.SendTimeout, 20*time.Second)
	opts.SessionRenewBefore = cmp.Or(opts.SessionRenewBefore, time.Minute)
	if opts.Concurrency == 0 {
		// Enough requests in flight to reach the rate limit at ~250ms per
		// Stripe call, within bounds.
		opts.Concurrency = min(max(int(math.Ceil(cfg.RateLimit/4)), 8), 128)
	}
	opts.RateLimitPause = cmp.Or(opts.RateLimitPause, time.Second)
	opts.AuthPause = cmp.Or(opts.AuthPause, time.Minute)
	opts.HeartbeatInterval = cmp.Or(opts.HeartbeatInterval, defaultHeartbeatInterval)
	return &Worker{
		db:      gdb,
		client:  client,
		cfg:     cfg,
		opts:    opts,
		log:     opts.Logger.With("worker", "usage-delivery", "instance", opts.Name),
		now:     opts.Now,
		m:       newMetrics(opts.Registerer),
		limiter: rate.NewLimiter(paced(cfg.RateLimit), 1),
		share:   cfg.RateLimit,
	}
}

// lease is how long a claim made now lasts. It must outlive the sends it
// covers: the batch at this worker's current share of the rate limit, plus
// a request in flight on either side. Sends stop one SendTimeout before it
// ends, so no two instances ever send the same claim at once.
func (w *Worker) lease() time.Duration {
	w.mu.Lock()
	share := w.share
	w.mu.Unlock()
	batchTime := time.Duration(float64(w.cfg.BatchSize) / share * float64(time.Second+jitterMargin))
	return batchTime + 2*w.opts.SendTimeout + 10*time.Second
}

// jitterMargin is the slack paced leaves for network and scheduling jitter.
const jitterMargin = 100 * time.Millisecond

// paced is the request rate that keeps Stripe's count of arrivals in any
// one-second window at or below limit. Stripe counts arrivals; we control
// only departures. Spacing departures exactly 1/limit apart puts limit+1 of
// them exactly one second apart, so a request delayed by a millisecond on
// the way would make limit+1 arrive within one second. Spacing them
// (1s+jitterMargin)/limit apart tolerates that much jitter. With burst 1,
// the spacing holds even after idle time.
func paced(limit float64) rate.Limit {
	return rate.Every(time.Duration(float64(time.Second+jitterMargin) / limit))
}

// Name is the worker's name for logs.
func (w *Worker) Name() string { return "usage-delivery" }

// Run delivers until ctx ends, registered in meter_workers so the running
// workers share the rate limit. On cancellation it stops taking new work,
// lets the requests in flight finish (each within SendTimeout), records
// their outcomes, hands unsent claims back, deletes its meter_workers row
// (about a second after its last request) and returns nil.
func (w *Worker) Run(ctx context.Context) error {
	w.log.Info("usage delivery started", "transport", w.cfg.Transport, "rate_limit", w.cfg.RateLimit,
		"batch_size", w.cfg.BatchSize, "backoff_max", w.cfg.BackoffMax.String())
	leave := w.join(ctx)
	defer leave()
	for {
		n, err := w.RunOnce(ctx)
		if ctx.Err() != nil {
			w.log.Info("usage delivery stopped")
			return nil
		}
		if err != nil {
			w.log.Error("usage delivery round failed", "error", err)
		}
		wait := w.cfg.PollInterval
		if err == nil && n >= w.cfg.BatchSize {
			wait = 0 // more may be due right now
		}
		wait = max(wait, w.pauseLeft(), w.holdLeft())
		if wait > 0 {
			t := time.NewTimer(wait)
			select {
			case <-ctx.Done():
				t.Stop()
				w.log.Info("usage delivery stopped")
				return nil
			case <-t.C:
			}
		}
	}
}

// RunOnce is one round: dead-letter the events whose timestamp left
// Stripe's window (at most every expireEvery), release waiting events whose
// customer now has a Stripe customer, claim a batch of due events and send
// it. It returns how many events it claimed. Outside Run it sends at the
// share of the rate limit Run last had (the whole limit if Run never ran).
func (w *Worker) RunOnce(ctx context.Context) (int, error) {
	// The gauges are recounted whatever the steps before them did.
	err := w.expireTooOld(ctx)
	if err == nil {
		err = w.releaseWaiting(ctx)
	}
	w.refreshGauges(ctx)
	if err != nil {
		return 0, err
	}
	if w.pauseLeft() > 0 || w.holdLeft() > 0 {
		return 0, nil
	}
	now := w.now()
	c := &claim{token: fmt.Sprintf("%s#%d", w.opts.Name, w.seq.Add(1)), leaseEnd: now.Add(w.lease())}
	claimed, err := w.claim(ctx, c, now)
	if err != nil || len(claimed) == 0 {
		return 0, err
	}
	var ready, unlinked []claimedEvent
	for _, ev := range claimed {
		if ev.StripeCustomerID == nil || *ev.StripeCustomerID == "" {
			unlinked = append(unlinked, ev)
		} else {
			ready = append(ready, ev)
		}
	}
	if len(unlinked) > 0 {
		w.backToWaiting(ctx, c, unlinked)
	}
	if w.cfg.Transport == config.MeterTransportV2 {
		w.deliverStream(ctx, c, ready)
	} else {
		w.deliverEach(ctx, c, ready)
	}
	return len(claimed), nil
}

type claim struct {
	token    string
	leaseEnd time.Time
}

type claimedEvent struct {
	Identifier       string
	CustomerID       string
	Meter            string
	StripeEventName  string
	Value            int64
	OccurredAt       time.Time
	Attempts         int
	StripeCustomerID *string
}

func (ev claimedEvent) meterEvent() stripeapi.MeterEvent {
	return stripeapi.MeterEvent{
		EventName:        ev.StripeEventName,
		StripeCustomerID: *ev.StripeCustomerID,
		Identifier:       ev.Identifier,
		Value:            ev.Value,
		Timestamp:        ev.OccurredAt,
	}
}

// claim takes up to BatchSize due events in one short statement: rows
// another instance holds locked are skipped, and the lease is written as
// the next due time, so an abandoned claim becomes due again by itself.
// Events whose timestamp left Stripe's window are never claimed; the next
// expireTooOld dead-letters them. The first claim of an event with a linked
// customer stamps first_attempt_at (for operators; requeue goes by
// maybe_sent_at).
//
// The locking SELECTs of this file are MATERIALIZED CTEs: were the planner
// to run one again inside the statement (a rescan), SKIP LOCKED would pass
// over the rows this statement already changed and take the next ones,
// going past LIMIT.
func (w *Worker) claim(ctx context.Context, c *claim, now time.Time) ([]claimedEvent, error) {
	var out []claimedEvent
	err := w.db.WithContext(ctx).Raw(`
		WITH due AS MATERIALIZED (
			SELECT identifier FROM usage_events
			WHERE status = 'pending' AND next_attempt_at <= ? AND occurred_at > ?
			ORDER BY next_attempt_at
			LIMIT ?
			FOR UPDATE SKIP LOCKED
		)
		UPDATE usage_events u
		SET claimed_by = ?, lease_until = ?, next_attempt_at = ?, updated_at = ?,
			first_attempt_at = COALESCE(u.first_attempt_at,
				CASE WHEN c.stripe_customer_id IS NOT NULL THEN ?::timestamptz END)
		FROM due, customers c
		WHERE u.identifier = due.identifier AND c.id = u.customer_id
		RETURNING u.identifier, u.customer_id, u.meter, u.stripe_event_name, u.value, u.occurred_at,
			u.attempts, c.stripe_customer_id`,
		now, now.Add(-DeliveryWindow), w.cfg.BatchSize, c.token, c.leaseEnd, c.leaseEnd, now, now).Scan(&out).Error
	if err != nil {
		return nil, db.Translate(err, nil)
	}
	slices.SortFunc(out, func(a, b claimedEvent) int {
		return cmp.Or(a.OccurredAt.Compare(b.OccurredAt), cmp.Compare(a.Identifier, b.Identifier))
	})
	return out, nil
}

// releaseWaiting makes the waiting events of customers that now have a
// Stripe customer due.
func (w *Worker) releaseWaiting(ctx context.Context) error {
	now := w.now()
	err := w.db.WithContext(ctx).Exec(`
		WITH linked AS MATERIALIZED (
			SELECT e.identifier FROM usage_events e JOIN customers c ON c.id = e.customer_id
			WHERE e.status = 'waiting_customer' AND c.stripe_customer_id IS NOT NULL
			LIMIT ?
			FOR UPDATE OF e SKIP LOCKED)
		UPDATE usage_events u SET status = 'pending', next_attempt_at = ?, updated_at = ?
		FROM linked WHERE u.identifier = linked.identifier AND u.status = 'waiting_customer'`, releaseLimit, now, now).Error
	return db.Translate(err, nil)
}

// expireTooOld dead-letters, with DeadTooOld, up to expireLimit pending or
// waiting events whose timestamp left Stripe's window (none that another
// worker holds claimed), at most once every expireEvery.
func (w *Worker) expireTooOld(ctx context.Context) error {
	now := w.now()
	w.mu.Lock()
	if d := now.Sub(w.expiredAt); d >= 0 && d < expireEvery {
		w.mu.Unlock()
		return nil
	}
	w.expiredAt = now
	w.mu.Unlock()
	cut := now.Add(-DeliveryWindow)
	return w.settleRows(ctx, expireLimit, func(tx *gorm.DB) *gorm.DB {
		return tx.Raw(`
			WITH old AS MATERIALIZED (
				SELECT identifier FROM usage_events
				WHERE status IN ('pending', 'waiting_customer') AND occurred_at <= ?
				  AND (status = 'waiting_customer' OR claimed_by IS NULL OR lease_until < ?)
				ORDER BY occurred_at
				LIMIT ?
				FOR UPDATE SKIP LOCKED
			)
			UPDATE usage_events u SET status = 'dead', dead_code = 'too_old', next_attempt_at = ?,
				last_error = ? || COALESCE(u.last_error, '(none)'),
				lease_until = NULL, claimed_by = NULL, updated_at = ?
			FROM old WHERE u.identifier = old.identifier
			RETURNING `+settledColumns,
			cut, now, expireLimit, now, tooOldMessage, now)
	})
}

// tooOldMessage starts the last_error of an event dead-lettered too_old.
var tooOldMessage = fmt.Sprintf("too_old: not delivered while Stripe accepted its timestamp "+
	"(35 days, less the %s tally keeps to deliver it); it can no longer be billed through Stripe's meter. Last error: ", DeliveryMargin)

// refreshGauges recounts the backlog at most once a second, and the
// waiting events at most once every waitingCountEvery: waiting events can be
// many (usage of customers who never check out), and counting them is a
// scan, while their oldest timestamp, which the alert watches, is one
// index probe (usage_events_undelivered_time).
func (w *Worker) refreshGauges(ctx context.Context) {
	now := w.now()
	w.mu.Lock()
	if d := now.Sub(w.gaugesAt); d >= 0 && d < time.Second {
		w.mu.Unlock()
		return
	}
	w.gaugesAt = now
	countWaiting := now.Sub(w.waitingAt) >= waitingCountEvery || now.Before(w.waitingAt)
	if countWaiting {
		w.waitingAt = now
	}
	w.mu.Unlock()
	var counts struct {
		Pending, Dead int64
		OldestWaiting *time.Time
	}
	err := w.db.WithContext(ctx).Raw(`
		SELECT count(*) FILTER (WHERE status = 'pending') AS pending,
		       count(*) FILTER (WHERE status = 'dead') AS dead,
		       (SELECT min(occurred_at) FROM usage_events WHERE status = 'waiting_customer') AS oldest_waiting
		FROM usage_events WHERE status IN ('pending', 'dead')`).Scan(&counts).Error
	var waiting int64
	if err == nil && countWaiting {
		err = w.db.WithContext(ctx).Raw(`SELECT count(*) FROM usage_events WHERE status = 'waiting_customer'`).Scan(&waiting).Error
	}
	if err != nil {
		if ctx.Err() == nil {
			w.log.Warn("count usage backlog", "error", err)
		}
		return
	}
	w.m.pending.Set(float64(counts.Pending))
	w.m.dead.Set(float64(counts.Dead))
	if countWaiting {
		w.m.waiting.Set(float64(waiting))
	}
	oldest := 0.0
	if counts.OldestWaiting != nil {
		oldest = max(0, now.Sub(*counts.OldestWaiting).Seconds())
	}
	w.m.waitingOldest.Set(oldest)
}

// waitingCountEvery is how often the waiting events are counted.
const waitingCountEvery = 30 * time.Second

// pause stops all sending of this worker for d (or longer if already
// paused) and returns when it ends.
func (w *Worker) pause(d time.Duration) time.Time {
	w.mu.Lock()
	defer w.mu.Unlock()
	if until := w.now().Add(d); until.After(w.pausedUntil) {
		w.pausedUntil = until
	}
	return w.pausedUntil
}

func (w *Worker) pauseLeft() time.Duration {
	w.mu.Lock()
	defer w.mu.Unlock()
	return max(0, w.pausedUntil.Sub(w.now()))
}

// acquire waits for permission to send one request under claim c. When it
// may not (shutting down, paused by a 429, holding back for the rate share,
// the lease too close to its end) it returns false and when the unsent
// events should be due again.
func (w *Worker) acquire(ctx context.Context, c *claim) (bool, time.Time) {
	if ctx.Err() != nil {
		return false, w.now()
	}
	if p := max(w.pauseLeft(), w.holdLeft()); p > 0 {
		return false, w.now().Add(p)
	}
	if w.now().Add(w.opts.SendTimeout).After(c.leaseEnd) {
		return false, w.now()
	}
	w.waitMu.Lock()
	err := w.limiter.Wait(ctx)
	w.waitMu.Unlock()
	if err != nil {
		return false, w.now()
	}
	// A 429, or a failing heartbeat, may have come while this goroutine
	// waited for its turn.
	if p := max(w.pauseLeft(), w.holdLeft()); p > 0 {
		return false, w.now().Add(p)
	}
	w.mu.Lock()
	w.lastSend = time.Now()
	w.mu.Unlock()
	return true, time.Time{}
}

// deliverEach sends events one request each (v1), groups of one customer and
// meter one after the other, up to Concurrency groups at once.
func (w *Worker) deliverEach(ctx context.Context, c *claim, evs []claimedEvent) {
	var groups [][]claimedEvent
	index := map[string]int{}
	for _, ev := range evs {
		k := ev.CustomerID + "\x00" + ev.Meter
		i, ok := index[k]
		if !ok {
			i = len(groups)
			index[k] = i
			groups = append(groups, nil)
		}
		groups[i] = append(groups[i], ev)
	}
	work := make(chan []claimedEvent)
	var wg sync.WaitGroup
	for range min(w.opts.Concurrency, len(groups)) {
		wg.Go(func() {
			for g := range work {
				w.sendGroup(ctx, c, g)
			}
		})
	}
	for _, g := range groups {
		work <- g
	}
	close(work)
	wg.Wait()
}

// sendGroup sends the events of one customer and meter one after the other.
// Deliveries are recorded together when the group ends: should the process
// die first, the lease expires, the events are sent again and Stripe's
// duplicate answer records them then.
func (w *Worker) sendGroup(ctx context.Context, c *claim, g []claimedEvent) {
	var sent, dup []claimedEvent
	defer func() {
		w.delivered(ctx, sent, resultDelivered)
		w.delivered(ctx, dup, resultDuplicate)
	}()
	for i, ev := range g {
		if ok, retryAt := w.acquire(ctx, c); !ok {
			w.release(ctx, c, g[i:], retryAt)
			return
		}
		sctx, cancel := withTimeout(ctx, w.opts.SendTimeout)
		err := w.client.CreateMeterEvent(sctx, ev.meterEvent())
		cancel()
		switch {
		case err == nil:
			sent = append(sent, ev)
		case stripeapi.IsDuplicate(err):
			dup = append(dup, ev)
		default:
			w.settle(ctx, c, []claimedEvent{ev}, err)
		}
	}
}

// deliverStream sends events through the v2 meter event stream, up to
// stripeapi.MaxStreamEvents per request, one request at a time.
func (w *Worker) deliverStream(ctx context.Context, c *claim, evs []claimedEvent) {
	for start := 0; start < len(evs); start += stripeapi.MaxStreamEvents {
		end := min(start+stripeapi.MaxStreamEvents, len(evs))
		chunk := evs[start:end]
		if ok, retryAt := w.acquire(ctx, c); !ok {
			w.release(ctx, c, evs[start:], retryAt)
			return
		}
		err := w.sendStream(ctx, c, chunk)
		if len(chunk) > 1 && stripeapi.KindOf(err) == stripeapi.KindInvalid {
			// Stripe refuses the whole request for one bad event; the
			// others, of any customer, must not die with it.
			w.log.Warn("Stripe refused a meter event stream request; sending its events one at a time",
				"events", len(chunk), "error", err)
			if !w.streamOneByOne(ctx, c, chunk, evs[end:]) {
				return
			}
			continue
		}
		w.settle(ctx, c, chunk, err)
	}
}

// streamOneByOne sends each event of chunk in its own stream request, so
// only the ones Stripe refuses on their own are dead-lettered. Should it
// have to stop (shutdown, a 429 pause, the lease ending), it releases what
// is left of chunk and rest, and returns false.
func (w *Worker) streamOneByOne(ctx context.Context, c *claim, chunk, rest []claimedEvent) bool {
	var sent []claimedEvent
	defer func() { w.delivered(ctx, sent, resultDelivered) }()
	for i, ev := range chunk {
		if ok, retryAt := w.acquire(ctx, c); !ok {
			w.release(ctx, c, append(slices.Clone(chunk[i:]), rest...), retryAt)
			return false
		}
		err := w.sendStream(ctx, c, chunk[i:i+1])
		if err == nil {
			sent = append(sent, ev)
			continue
		}
		w.settle(ctx, c, []claimedEvent{ev}, err)
	}
	return true
}

func (w *Worker) sendStream(ctx context.Context, c *claim, chunk []claimedEvent) error {
	mes := make([]stripeapi.MeterEvent, len(chunk))
	for i, ev := range chunk {
		mes[i] = ev.meterEvent()
	}
	send := func(fresh bool) error {
		sess, err := w.streamSession(ctx, c, fresh)
		if err != nil {
			return err
		}
		sctx, cancel := withTimeout(ctx, w.opts.SendTimeout)
		defer cancel()
		return w.client.SendMeterEventStream(sctx, sess, mes)
	}
	err := send(false)
	if stripeapi.IsSessionExpired(err) || stripeapi.KindOf(err) == stripeapi.KindAuth {
		// The token died early (clock skew, revoked): a new session, the
		// same events. Should the key itself be refused, opening fails too
		// and the auth pause follows.
		err = send(true)
	}
	return err
}

// errReleased means the events were not sent and should go back as they are.
var errReleased = errors.New("metering: not sent")

// streamSession returns the cached v2 session, opening a new one when there
// is none, it ends within SessionRenewBefore, or fresh is asked for.
func (w *Worker) streamSession(ctx context.Context, c *claim, fresh bool) (stripeapi.MeterEventSession, error) {
	w.mu.Lock()
	sess := w.session
	w.mu.Unlock()
	if !fresh && sess.Token != "" && w.now().Add(w.opts.SessionRenewBefore).Before(sess.ExpiresAt) {
		return sess, nil
	}
	// Opening a session is a request too; it counts against the rate limit.
	if ok, _ := w.acquire(ctx, c); !ok {
		return stripeapi.MeterEventSession{}, errReleased
	}
	sctx, cancel := withTimeout(ctx, w.opts.SendTimeout)
	defer cancel()
	sess, err := w.client.OpenMeterEventSession(sctx)
	if err != nil {
		return stripeapi.MeterEventSession{}, err
	}
	w.mu.Lock()
	w.session = sess
	w.mu.Unlock()
	w.log.Debug("meter event session opened", "expires_at", sess.ExpiresAt)
	return sess, nil
}

// settle records the outcome of sending evs (one request) as err says.
func (w *Worker) settle(ctx context.Context, c *claim, evs []claimedEvent, err error) {
	if err == nil {
		w.delivered(ctx, evs, resultDelivered)
		return
	}
	if stripeapi.IsDuplicate(err) {
		w.delivered(ctx, evs, resultDuplicate)
		return
	}
	if errors.Is(err, errReleased) {
		w.release(ctx, c, evs, w.now().Add(w.pauseLeft()))
		return
	}
	msg := text.Truncate(err.Error(), 1000)
	se, isStripe := stripeapi.AsError(err)
	switch {
	case isStripe && se.Kind == stripeapi.KindRateLimited:
		d := se.RetryAfter
		if d <= 0 {
			d = w.opts.RateLimitPause
		}
		until := w.pause(d)
		w.log.Info("Stripe rate limited meter events; pausing", "for", d.String())
		w.m.deliveries.WithLabelValues(resultRateLimited).Add(float64(len(evs)))
		w.releaseWithError(ctx, c, evs, until, msg)
	case isStripe && se.Kind == stripeapi.KindAuth:
		until := w.pause(w.opts.AuthPause)
		w.log.Error("Stripe refused the API key for meter events; pausing delivery", "error", err, "for", w.opts.AuthPause.String())
		w.releaseWithError(ctx, c, evs, until, msg)
	case (isStripe && se.Retryable()) || (!isStripe && !errs.Is(err, errs.Invalid)):
		// Only an expired v2 session says for sure that Stripe took
		// nothing; a 5xx or a lost answer may hide events it kept.
		maybeSent := !(isStripe && se.Kind == stripeapi.KindSessionExpired)
		w.retry(ctx, c, evs, msg, maybeSent)
	default:
		w.dead(ctx, c, evs, msg)
	}
}

func identifiersJSON(evs []claimedEvent) string {
	ids := make([]string, len(evs))
	for i, ev := range evs {
		ids[i] = ev.Identifier
	}
	raw, _ := json.Marshal(ids)
	return string(raw)
}

// delivered marks evs delivered. It needs no lease: whichever instance sent
// it, Stripe has the event, and that is the truth to record.
func (w *Worker) delivered(ctx context.Context, evs []claimedEvent, result string) {
	if len(evs) == 0 {
		return
	}
	rctx, cancel := withTimeout(ctx, recordTimeout)
	defer cancel()
	now := w.now()
	err := w.db.WithContext(rctx).Exec(`
		UPDATE usage_events SET status = 'delivered', delivered_at = ?, attempts = attempts + 1,
			last_error = NULL, lease_until = NULL, claimed_by = NULL, updated_at = ?
		WHERE identifier IN (SELECT jsonb_array_elements_text(?::jsonb)) AND status = 'pending'`,
		now, now, identifiersJSON(evs)).Error
	if err != nil {
		// The lease runs out and the event is sent again; Stripe answers
		// that it has the identifier, and it is recorded then.
		w.log.Error("record delivered usage events", "error", err, "count", len(evs))
		return
	}
	w.m.deliveries.WithLabelValues(result).Add(float64(len(evs)))
}

// release hands unsent claimed events back, due at retryAt, without
// counting an attempt.
func (w *Worker) release(ctx context.Context, c *claim, evs []claimedEvent, retryAt time.Time) {
	w.releaseWithError(ctx, c, evs, retryAt, "")
}

func (w *Worker) releaseWithError(ctx context.Context, c *claim, evs []claimedEvent, retryAt time.Time, msg string) {
	if len(evs) == 0 {
		return
	}
	rctx, cancel := withTimeout(ctx, recordTimeout)
	defer cancel()
	err := w.db.WithContext(rctx).Exec(`
		UPDATE usage_events SET next_attempt_at = ?, lease_until = NULL, claimed_by = NULL,
			last_error = COALESCE(NULLIF(?, ''), last_error), updated_at = ?
		WHERE identifier IN (SELECT jsonb_array_elements_text(?::jsonb)) AND claimed_by = ? AND status = 'pending'`,
		retryAt, msg, w.now(), identifiersJSON(evs), c.token).Error
	if err != nil {
		w.log.Error("release usage events", "error", err, "count", len(evs))
	}
}

func (w *Worker) backToWaiting(ctx context.Context, c *claim, evs []claimedEvent) {
	rctx, cancel := withTimeout(ctx, recordTimeout)
	defer cancel()
	err := w.db.WithContext(rctx).Exec(`
		UPDATE usage_events SET status = 'waiting_customer', lease_until = NULL, claimed_by = NULL, updated_at = ?
		WHERE identifier IN (SELECT jsonb_array_elements_text(?::jsonb)) AND claimed_by = ? AND status = 'pending'`,
		w.now(), identifiersJSON(evs), c.token).Error
	if err != nil {
		w.log.Error("return usage events to waiting_customer", "error", err, "count", len(evs))
	}
}

type settledRow struct {
	Identifier string
	CustomerID string
	Meter      string
	Value      int64
	OccurredAt time.Time
	Status     string
	Attempts   int
	DeadCode   *string
	LastError  *string
}

const settledColumns = `u.identifier, u.customer_id, u.meter, u.value, u.occurred_at, u.status, u.attempts,
	u.dead_code, u.last_error`

// retry counts a failed attempt and schedules the next after a jittered
// backoff capped at BackoffMax, and never later than the end of Stripe's
// window for the event's timestamp; an event already past that end is
// dead-lettered too_old instead. maybeSent records that Stripe may have
// kept the event (see UsageEvent.MaybeSentAt).
func (w *Worker) retry(ctx context.Context, c *claim, evs []claimedEvent, msg string, maybeSent bool) {
	now := w.now()
	cut := now.Add(-DeliveryWindow)
	_ = w.settleRows(ctx, len(evs), func(tx *gorm.DB) *gorm.DB {
		// attempts on the right-hand side is the value before this update;
		// the exponent is bounded so power() never overflows.
		return tx.Raw(`
			UPDATE usage_events u SET attempts = attempts + 1,
				status = CASE WHEN occurred_at <= ? THEN 'dead' ELSE 'pending' END,
				dead_code = CASE WHEN occurred_at <= ? THEN 'too_old' END,
				last_error = CASE WHEN occurred_at <= ? THEN ? ELSE '' END || ?,
				maybe_sent_at = CASE WHEN ? THEN COALESCE(maybe_sent_at, ?) ELSE maybe_sent_at END,
				next_attempt_at = CASE WHEN occurred_at <= ? THEN ?::timestamptz
					ELSE least(occurred_at + make_interval(secs => ?),
						?::timestamptz + make_interval(secs => random() * least(?::float8, ?::float8 * power(2, least(attempts, 40))))) END,
				lease_until = NULL, claimed_by = NULL, updated_at = ?
			WHERE identifier IN (SELECT jsonb_array_elements_text(?::jsonb)) AND claimed_by = ? AND status = 'pending'
			RETURNING `+settledColumns,
			cut, cut, cut, tooOldMessage, msg, maybeSent, now, cut, now,
			DeliveryWindow.Seconds(), now, w.cfg.BackoffMax.Seconds(), w.opts.BackoffBase.Seconds(),
			now, identifiersJSON(evs), c.token)
	})
}

// dead dead-letters events Stripe refused for good.
func (w *Worker) dead(ctx context.Context, c *claim, evs []claimedEvent, msg string) {
	now := w.now()
	_ = w.settleRows(ctx, len(evs), func(tx *gorm.DB) *gorm.DB {
		return tx.Raw(`
			UPDATE usage_events u SET attempts = attempts + 1, status = 'dead', dead_code = 'stripe_refused',
				next_attempt_at = ?, last_error = ?, lease_until = NULL, claimed_by = NULL, updated_at = ?
			WHERE identifier IN (SELECT jsonb_array_elements_text(?::jsonb)) AND claimed_by = ? AND status = 'pending'
			RETURNING `+settledColumns,
			now, msg, now, identifiersJSON(evs), c.token)
	})
}

// settleRows runs update (at most n rows) in a transaction and appends
// usage.dead for every row it dead-lettered, in that same transaction.
// A failure is logged (and returned): the claim's lease runs out and the
// events are tried again.
func (w *Worker) settleRows(ctx context.Context, n int, update func(tx *gorm.DB) *gorm.DB) error {
	rctx, cancel := withTimeout(ctx, recordTimeout)
	defer cancel()
	var rows []settledRow
	err := db.InTx(rctx, w.db, func(tx *gorm.DB) error {
		rows = nil
		if err := update(tx).Scan(&rows).Error; err != nil {
			return err
		}
		for _, r := range rows {
			if r.Status != string(StatusDead) {
				continue
			}
			err := events.Append(rctx, tx, events.Event{Type: events.UsageDead, CustomerID: r.CustomerID, Data: map[string]any{
				"identifier": r.Identifier,
				"meter":      r.Meter,
				"value":      r.Value,
				"timestamp":  r.OccurredAt.UTC(),
				"attempts":   r.Attempts,
				"code":       deref(r.DeadCode),
				"last_error": deref(r.LastError),
			}})
			if err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		if ctx.Err() == nil {
			w.log.Error("record usage delivery failure", "error", err, "count", n)
		}
		return db.Translate(err, nil)
	}
	for _, r := range rows {
		if r.Status == string(StatusDead) {
			w.m.deliveries.WithLabelValues(resultDead).Inc()
			w.log.Warn("usage event dead-lettered", "identifier", r.Identifier, "customer_id", r.CustomerID,
				"code", deref(r.DeadCode), "attempts", r.Attempts, "error", deref(r.LastError))
		} else {
			w.m.deliveries.WithLabelValues(resultRetry).Inc()
		}
	}
	return nil
}

func deref(s *string) string {
	if s == nil {
		return ""
	}
	return *s
}
