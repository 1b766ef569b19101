package metering

import (
	"cmp"
	"context"
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

	"github.com/tallybilling/tally/internal/catalog"
	"github.com/tallybilling/tally/internal/config"
	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/stripeapi"
)

// WorkerOptions are what NewWorker needs: the database, the Stripe client
// and the delivery settings, then the clock, the metrics and the timings
// that are not settings (tests shorten them). Every zero field after Config
// takes its default, set here and nowhere else.
type WorkerOptions struct {
	DB     *gorm.DB
	Stripe stripeapi.Client
	// Catalog names the plans: which meters cut over at each customer's
	// next billing period, and their prices.
	Catalog catalog.Catalog
	// Config holds the transport, rate limit, batch size, backoff, poll
	// interval and send timeout (which sizes the claims' lease); it comes
	// from config, which holds their defaults.
	Config config.MeteringConfig

	// Logger is nil to discard the logs.
	Logger *slog.Logger
	// Now is the clock for due times and leases; default time.Now.
	Now func() time.Time
	// Registry receives the worker's metrics; nil keeps them unregistered.
	Registry prometheus.Registerer
	// Name identifies this instance in claimed_by; default a fresh id.
	Name string
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
	// MaxRetryAfter is the longest pause a 429's Retry-After makes;
	// default TALLY_METER_BACKOFF_MAX, and at least 1m. Stripe asks for
	// seconds; an answer asking for a day (a proxy's, a bad day's) must not
	// stop all delivery for that day.
	MaxRetryAfter time.Duration
	// AuthPause is how long sending pauses after Stripe refuses our key
	// (401, 403) or refuses to open a v2 meter event session; default 1m.
	// Either is the operator's to fix, not the events' fault, so it neither
	// counts attempts nor dead-letters.
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
// DeadStripeRefused, unless its timestamp is still ahead of this clock
// (then it is tried again at its timestamp: see dead). Through the v2
// stream, which answers before Stripe validates, an event is not sent before
// its timestamp (see holdEarly).
type Worker struct {
	db     *gorm.DB
	client stripeapi.Client
	cfg    config.MeteringConfig
	opts   WorkerOptions
	log    *slog.Logger
	now    func() time.Time
	m      *metrics
	// nextPeriod are the meters whose plans cut over at each customer's
	// next billing period.
	nextPeriod []string

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

// releaseLimit bounds how many waiting events one round releases, so a
// large backlog is moved in short statements.
const releaseLimit = 5000

// NewWorker returns a Worker sending through opts.Stripe with
// opts.Config's transport, rate limit, batch size, backoff cap and poll
// interval. It panics when opts.Config does not validate (a zero setting in
// a hand-built MeteringConfig is a programming error).
func NewWorker(opts WorkerOptions) *Worker {
	cfg := opts.Config
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
	opts.SessionRenewBefore = cmp.Or(opts.SessionRenewBefore, time.Minute)
	if opts.Concurrency == 0 {
		// Enough requests in flight to reach the rate limit at ~250ms per
		// Stripe call, within bounds.
		opts.Concurrency = min(max(int(math.Ceil(cfg.RateLimit/4)), 8), 128)
	}
	opts.RateLimitPause = cmp.Or(opts.RateLimitPause, time.Second)
	opts.MaxRetryAfter = cmp.Or(opts.MaxRetryAfter, max(cfg.BackoffMax, time.Minute))
	opts.AuthPause = cmp.Or(opts.AuthPause, time.Minute)
	opts.HeartbeatInterval = cmp.Or(opts.HeartbeatInterval, defaultHeartbeatInterval)
	return &Worker{
		db:      opts.DB,
		client:  opts.Stripe,
		cfg:     cfg,
		opts:    opts,
		log:     opts.Logger.With("worker", "usage-delivery", "instance", opts.Name),
		now:     opts.Now,
		m:       newMetrics(opts.Registry),
		limiter: rate.NewLimiter(paced(cfg.RateLimit), 1),
		share:   cfg.RateLimit,

		nextPeriod: nextPeriodMeters(opts.Catalog),
	}
}

// lease is how long a claim made now lasts. It must outlive the sends it
// covers: the batch at this worker's current share of the rate limit, plus
// a request in flight on either side and half a SendTimeout of slack for
// recording the outcomes. Sends stop one SendTimeout before it ends, so no
// two instances ever send the same claim at once. At the defaults (100
// events at 20/s, 20s) it is about 56s; tests that kill a worker shorten
// it through TALLY_METER_SEND_TIMEOUT.
func (w *Worker) lease() time.Duration {
	w.mu.Lock()
	share := w.share
	w.mu.Unlock()
	batchTime := time.Duration(float64(w.cfg.BatchSize) / share * float64(time.Second+jitterMargin))
	return batchTime + 2*w.cfg.SendTimeout + w.cfg.SendTimeout/2
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
	if err := w.resolveCutovers(ctx); err != nil {
		w.log.Warn("decide usage cut-overs; the events wait for the next round", "error", err)
	}
	cancels, err := w.sendCancels(ctx)
	if err != nil {
		w.log.Warn("send meter event adjustments", "error", err)
	}
	now := w.now()
	c := &claim{token: fmt.Sprintf("%s#%d", w.opts.Name, w.seq.Add(1)), leaseEnd: now.Add(w.lease())}
	claimed, err := w.claim(ctx, c, now)
	if err != nil || len(claimed) == 0 {
		return cancels, err
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
		ready = w.holdEarly(ctx, c, ready, now)
		w.deliverStream(ctx, c, ready)
	} else {
		w.deliverEach(ctx, c, ready)
	}
	return len(claimed) + cancels, nil
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
	CreatedAt        time.Time
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
// The worker's locking SELECTs (here and in outcomes.go) are MATERIALIZED
// CTEs: were the planner to run one again inside the statement (a rescan),
// SKIP LOCKED would pass over the rows this statement already changed and
// take the next ones, going past LIMIT.
func (w *Worker) claim(ctx context.Context, c *claim, now time.Time) ([]claimedEvent, error) {
	var out []claimedEvent
	err := w.db.WithContext(ctx).Raw(`
		WITH due AS MATERIALIZED (
			SELECT identifier FROM usage_events
			WHERE status = 'pending' AND next_attempt_at <= ? AND occurred_at > ?
			  -- On a plan cutting over at the next period, an event waits
			  -- for its customer's cut-over to be decided (resolveCutovers).
			  AND (meter <> ALL(?::text[]) OR EXISTS (SELECT 1 FROM usage_cutovers k
				WHERE k.customer_id = usage_events.customer_id AND k.meter = usage_events.meter))
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
			u.attempts, c.stripe_customer_id, u.created_at`,
		now, now.Add(-DeliveryWindow), pq(w.nextPeriod), w.cfg.BatchSize, c.token, c.leaseEnd, c.leaseEnd, now, now).Scan(&out).Error
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
		UPDATE usage_events u SET status = CASE WHEN u.occurred_at < (SELECT k.live_from FROM usage_cutovers k
				WHERE k.customer_id = u.customer_id AND k.meter = u.meter) THEN 'legacy_period' ELSE 'pending' END,
			next_attempt_at = ?, updated_at = ?
		FROM linked
		WHERE u.identifier = linked.identifier AND u.status = 'waiting_customer'`, releaseLimit, now, now).Error
	return db.Translate(err, nil)
}
