package stripehook

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/errs"
	"github.com/tallybilling/tally/internal/payments"
	"github.com/tallybilling/tally/internal/stripeapi"
)

// HandledTypes are the Stripe event types dispatch acts on: what the
// endpoint must subscribe to, and what a catch-up lists (Stripe allows 20
// types in one listing; this is 20).
var HandledTypes = []string{
	"payment_intent.succeeded", "payment_intent.payment_failed", "payment_intent.canceled",
	"checkout.session.completed", "checkout.session.async_payment_succeeded",
	"checkout.session.async_payment_failed", "checkout.session.expired",
	"charge.refunded",
	"charge.dispute.created", "charge.dispute.updated", "charge.dispute.closed",
	"charge.dispute.funds_withdrawn", "charge.dispute.funds_reinstated",
	"customer.subscription.created", "customer.subscription.updated", "customer.subscription.deleted",
	"invoice.finalized", "invoice.paid", "invoice.voided", "invoice.marked_uncollectible",
}

// StripeRetention is how long Stripe keeps events to list.
const StripeRetention = 30 * 24 * time.Hour

// catchUpOverlap is how far before the newest stored event a catch-up
// starts listing by default: events are not stored in the order Stripe
// created them, so a missed one may be older than the newest stored.
const catchUpOverlap = time.Hour

// CatchUpResult counts what CatchUp found.
type CatchUpResult struct {
	Listed int
	New    int
}

// listedThrough names, in background_runs, a time on Stripe's clock no
// later than the first listing of the last catch-up that listed and
// stored every event of its window: every event Stripe created before it
// (less catchUpOverlap, for events Stripe lists late) is stored. It is
// the creation of the newest event the catch-up listed, less how long its
// listings took by tally's clock (a backlog of several listings, each
// stored and processed before the next, can take many minutes, and the
// newest event then came long after the first listing, which may have
// missed an event Stripe showed late). It is compared only with Stripe's
// creation times: tally's own clock may run ahead of Stripe's (a host
// without NTP), and a start taken from it would move the next window past
// events Stripe had not yet created by its clock; a duration on tally's
// clock is good on Stripe's. Tally's clock at the catch-up's start is
// kept instead when it is earlier (behind Stripe's).
const listedThrough = "stripe catch-up listed"

// reportsListedThrough names, in background_runs, how far the listings of
// the meters' error reports reached, as listedThrough does for the v1
// events (the same time, recorded with it): it moves only when every
// meter's listing completed, so a catch-up whose listing of reports
// failed (Stripe refusing GET /v2/core/events, say to a restricted key)
// leaves their window to the next, while the v1 catch-up's mark and the
// pending payments' lookups go on.
const reportsListedThrough = "stripe catch-up listed meter error reports"

// ReportsListingError is CatchUp's error when only the listing of meter
// error reports failed: the v1 events were listed, stored and marked.
type ReportsListingError struct{ Err error }

func (e *ReportsListingError) Error() string { return "list meter error reports: " + e.Err.Error() }
func (e *ReportsListingError) Unwrap() error { return e.Err }

// firstCatchUp is how far back a catch-up lists when none has completed
// yet: as long as Stripe retries a delivery.
const firstCatchUp = 72 * time.Hour

// CatchUp lists Stripe's events of HandledTypes created since since (zero:
// the creation of the newest event the last completed catch-up listed,
// less how long its listings took, or its start on tally's clock when
// earlier; never later than the newest stored event's; less an hour; when
// none has, 72 hours back, or the newest stored event's creation less an
// hour when that is older; never more than Stripe's 30 days), and stores
// and processes, oldest first, those not stored yet, exactly as a delivery
// would (source sync). The default window does not follow the events
// webhooks stored: a catch-up that failed (Stripe, or the database, went
// away) leaves its whole window to the next, whatever was delivered in
// between. Errors: errs.Unavailable (no Stripe key), Stripe's *Error,
// database errors.
func (h *Intake) CatchUp(ctx context.Context, since time.Time) (CatchUpResult, error) {
	var res CatchUpResult
	if h.stripe == nil {
		return res, errs.E(errs.Unavailable, "catching up needs a Stripe key (TALLY_STRIPE_SECRET_KEY)")
	}
	now := h.now()
	from, err := h.catchUpFrom(ctx, now)
	if err != nil {
		return res, err
	}
	defaultWindow := since.IsZero()
	if defaultWindow {
		since = from
	}
	if oldest := now.Add(-StripeRetention); since.Before(oldest) {
		since = oldest
	}
	if from.Before(now.Add(-StripeRetention)) {
		from = now.Add(-StripeRetention)
	}
	var newest time.Time // on Stripe's clock: the newest event listed
	began := h.now()     // the first listing (see listedThrough)
	for start := since; ; {
		listed, more, err := h.stripe.ListEvents(ctx, start, HandledTypes)
		if err != nil {
			return res, err
		}
		res.Listed += len(listed)
		for _, ev := range listed {
			if ev.Created.After(newest) {
				newest = ev.Created
			}
		}
		if err := h.storeListed(ctx, listed, &res); err != nil {
			return res, err
		}
		if !more || len(listed) == 0 {
			break
		}
		// A backlog longer than one listing: on from the newest stored
		// (the events of its second come again, and are found stored).
		next := listed[len(listed)-1].Created
		if !next.After(start) {
			return res, fmt.Errorf("stripehook: more than %d Stripe events were created at %s: the rest cannot be listed", len(listed), start.UTC().Format(time.RFC3339))
		}
		start = next
	}
	reportsErr := h.catchUpReports(ctx, since, from, defaultWindow, &res)
	if lerr := (*ReportsListingError)(nil); reportsErr != nil && !errors.As(reportsErr, &lerr) {
		return res, reportsErr // the database: the whole window is left to the next
	}
	if since.After(from) {
		// A window that began later than the default one (an operator's
		// --since) leaves a gap before it: the next default starts where
		// it did.
		return res, reportsErr
	}
	if newest.IsZero() {
		// Nothing listed: no time on Stripe's clock to move the window
		// to. The last mark still holds; the next window is no larger
		// than an hour of events before the newest one Stripe has.
		return res, reportsErr
	}
	// Every event listed is stored (processed, or left to the retry
	// worker): the next default catch-up may start from about when the
	// first listing was, by Stripe's clock, not tally's (see
	// listedThrough): the newest event listed, less how long the listings
	// took; or from this catch-up's start on tally's clock when that is
	// earlier (Stripe's clock ahead of tally's: the window reaches back as
	// far as it did before the mark was on Stripe's clock, and events
	// Stripe lists later than the overlap still come in).
	through := newest.Add(-max(0, h.now().Sub(began)))
	if now.Before(through) {
		through = now
	}
	marks := []string{listedThrough}
	if reportsErr == nil {
		marks = append(marks, reportsListedThrough)
	}
	for _, mark := range marks {
		err = h.db.WithContext(ctx).Exec(`INSERT INTO background_runs AS r (name, last_run_at) VALUES (?, ?)
			ON CONFLICT (name) DO UPDATE SET last_run_at = GREATEST(r.last_run_at, EXCLUDED.last_run_at)`, mark, through).Error
		if err != nil {
			return res, db.Translate(err, nil)
		}
	}
	return res, reportsErr
}

// catchUpReports lists and stores the meter error reports of a catch-up
// whose window starts at since (from: the default start): a default one
// starts no later than the reports' own mark (reportsListedThrough, less
// catchUpOverlap), which a failed listing left behind. It answers a
// *ReportsListingError when a listing failed, having pinned the reports'
// mark at the start of this window if there was none, so that the v1 mark
// moving on does not take the reports' window with it.
func (h *Intake) catchUpReports(ctx context.Context, since, from time.Time, defaultWindow bool, res *CatchUpResult) error {
	start := since
	if defaultWindow {
		var mark struct{ At *time.Time }
		err := h.db.WithContext(ctx).Raw(`SELECT last_run_at AS at FROM background_runs WHERE name = ?`, reportsListedThrough).Scan(&mark).Error
		if err != nil {
			return db.Translate(err, nil)
		}
		if mark.At != nil && mark.At.Add(-catchUpOverlap).Before(start) {
			start = mark.At.Add(-catchUpOverlap)
			if oldest := h.now().Add(-StripeRetention); start.Before(oldest) {
				start = oldest
			}
		}
	}
	lerr := h.catchUpMeterErrors(ctx, start, res)
	if lerr == nil {
		return nil
	}
	var stripeErr *stripeapi.Error
	if !errors.As(lerr, &stripeErr) {
		return lerr // the database: the whole catch-up failed
	}
	h.logger.WarnContext(ctx, "Stripe's meter error reports could not be listed; the next catch-up lists their window again", "error", lerr)
	pin := start
	if from.Before(pin) {
		pin = from
	}
	pin = pin.Add(catchUpOverlap)
	err := h.db.WithContext(ctx).Exec(`INSERT INTO background_runs (name, last_run_at) VALUES (?, ?) ON CONFLICT (name) DO NOTHING`,
		reportsListedThrough, pin).Error
	if err != nil {
		return db.Translate(err, nil)
	}
	return &ReportsListingError{Err: lerr}
}

// catchUpMeterErrors lists the meter error reports (thin v2 events,
// which /v1/events does not list) of each of tally's Stripe meters
// created since since, and stores and processes those not stored yet, as
// storeListed does: a report whose delivery was missed (tally down longer
// than Stripe retries, or no event destination set up for thin events)
// still dead-letters the events it names.
func (h *Intake) catchUpMeterErrors(ctx context.Context, since time.Time, res *CatchUpResult) error {
	if h.usage == nil {
		return nil
	}
	var failed error // the first meter Stripe would not list; the others are still listed
	for _, meter := range h.meters {
		listed, err := h.stripe.ListMeterErrorReports(ctx, meter, since)
		if err != nil {
			failed = cmp.Or(failed, err)
			continue
		}
		res.Listed += len(listed)
		if err := h.storeListed(ctx, listed, res); err != nil {
			return err
		}
	}
	return failed
}

// storeListed stores and processes, in order, the listed events not stored
// yet, as CatchUp does, counting them in res.New.
func (h *Intake) storeListed(ctx context.Context, listed []stripeapi.RawEvent, res *CatchUpResult) error {
	for _, raw := range listed {
		ev, err := ParseEvent(raw.Payload)
		if err != nil {
			h.logger.WarnContext(ctx, "a listed Stripe event does not parse", "event_id", raw.ID, "error", err)
			continue
		}
		stored, _, err := h.store(ctx, ev, raw.Payload, sourceSync, h.now())
		if err != nil {
			return err
		}
		if !stored {
			continue
		}
		res.New++
		h.logger.InfoContext(ctx, "a missed Stripe event was found by listing", "event_id", ev.ID, "type", ev.Type)
		// Within the lease store took, as a delivery's attempt: one that
		// outlived it would run beside the retry worker's claim of it.
		pctx, cancel := context.WithTimeout(ctx, h.attemptTimeout())
		_, _ = h.process(pctx, ev, 0, h.now())
		cancel()
	}
	return nil
}

// catchUpFrom is where a default catch-up at now starts listing.
func (h *Intake) catchUpFrom(ctx context.Context, now time.Time) (time.Time, error) {
	var mark struct{ At, Newest *time.Time }
	err := h.db.WithContext(ctx).Raw(`SELECT (SELECT last_run_at FROM background_runs WHERE name = ?) AS at,
		(SELECT max(stripe_created) FROM stripe_events) AS newest`, listedThrough).Scan(&mark).Error
	if err != nil {
		return time.Time{}, db.Translate(err, nil)
	}
	if mark.At != nil && !mark.At.IsZero() {
		at := *mark.At
		// Never past the newest event stored (Stripe's clock; every event
		// a mark was taken from is stored): a mark recorded on tally's
		// clock, ahead of Stripe's, by a version before listedThrough was
		// Stripe's time, would skip what Stripe creates until its clock
		// gets there.
		if mark.Newest != nil && !mark.Newest.IsZero() && mark.Newest.Before(at) {
			at = *mark.Newest
		}
		return at.Add(-catchUpOverlap), nil
	}
	// None completed yet (a new deployment, or one from before the mark
	// was kept): what Stripe may have given up delivering, and at least
	// what the newest stored event leaves out.
	from := now.Add(-firstCatchUp)
	var newest struct{ At *time.Time }
	err = h.db.WithContext(ctx).Model(&eventRow{}).Select("max(stripe_created) AS at").Scan(&newest).Error
	if err != nil {
		return time.Time{}, db.Translate(err, nil)
	}
	if newest.At != nil && !newest.At.IsZero() && newest.At.Add(-catchUpOverlap).Before(from) {
		from = newest.At.Add(-catchUpOverlap)
	}
	return from, nil
}

// SyncResult is what one Sync found and did.
type SyncResult struct {
	EventsListed    int
	EventsNew       int
	PaymentsChecked int
	PaymentsChanged int
}

// Syncer catches tally up with Stripe: missed events (CatchUp), then
// pending payments (payments.SyncPending), one replica at a time.
type Syncer struct {
	intake       *Intake
	payments     *payments.Service
	db           *gorm.DB
	pendingAfter time.Duration
	interval     time.Duration
	runs         *prometheus.CounterVec
	found        *prometheus.CounterVec
}

// SyncerOptions configure NewSyncer.
type SyncerOptions struct {
	// PendingCheckAfter is how long a payment stays pending before a sync
	// looks it up (TALLY_PENDING_CHECK_AFTER); Interval the background
	// period (TALLY_STRIPE_SYNC_INTERVAL, 0: no background sync).
	PendingCheckAfter time.Duration
	Interval          time.Duration
	Registry          prometheus.Registerer
}

// NewSyncer builds the Syncer of h and registers its metrics: the sync
// runs by result and the age of the oldest pending payment.
func NewSyncer(h *Intake, o SyncerOptions) *Syncer {
	s := &Syncer{intake: h, payments: h.payments, db: h.db, pendingAfter: o.PendingCheckAfter, interval: o.Interval,
		runs: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tally_stripe_sync_runs_total", Help: "Syncs with Stripe (missed events, pending payments), by result: ok, error, skipped (another replica was syncing).",
		}, []string{"result"}),
		found: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tally_stripe_sync_found_total",
			Help: "Drift from Stripe that syncs caught up with: events never delivered (what=events_new), pending payments Stripe had settled (what=payments_changed).",
		}, []string{"what"})}
	for _, r := range []string{"ok", "error", "skipped"} {
		s.runs.WithLabelValues(r)
	}
	for _, w := range []string{"events_new", "payments_changed"} {
		s.found.WithLabelValues(w)
	}
	if o.Registry != nil {
		o.Registry.MustRegister(s.runs, s.found, prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "tally_payments_pending_oldest_seconds",
			Help: "Age of the oldest pending Checkout or top-up payment (0 when none is pending); pay-by-invoice payments wait on their terms and are left out.",
		}, s.pendingAge))
	}
	return s
}

func (s *Syncer) pendingAge() float64 {
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	t, err := s.payments.OldestPending(ctx)
	if err != nil {
		return -1
	}
	if t.IsZero() {
		return 0
	}
	return max(0, s.intake.now().Sub(t).Seconds())
}

// syncLock keys the advisory lock that lets one replica sync at a time.
var syncLock = db.LockKey("stripe sync")

// Sync runs one catch-up: missed events since since (zero: see CatchUp),
// then the pending payments. Errors: errs.Conflict when another replica
// is syncing; otherwise as CatchUp and SyncPending.
func (s *Syncer) Sync(ctx context.Context, since time.Time) (SyncResult, error) {
	var res SyncResult
	ran, err := db.TryExclusive(ctx, s.db, syncLock, func(ctx context.Context) error {
		ev, err := s.intake.CatchUp(ctx, since)
		res.EventsListed, res.EventsNew = ev.Listed, ev.New
		// Only the reports could not be listed: the pending payments are
		// still looked up, and the sync then fails with that error.
		var reportsErr *ReportsListingError
		if err != nil && !errors.As(err, &reportsErr) {
			return fmt.Errorf("list missed events: %w", err)
		}
		// Stripe listed its events: those that met it down are retried now
		// rather than at a backoff an outage grew to an hour.
		s.intake.wakeStripeUnreachable(ctx)
		pr, err := s.payments.SyncPending(ctx, s.pendingAfter)
		res.PaymentsChecked, res.PaymentsChanged = pr.Checked, pr.Changed
		if err != nil {
			return fmt.Errorf("look up pending payments: %w", err)
		}
		if reportsErr != nil {
			return reportsErr
		}
		return nil
	})
	switch {
	case !ran && err == nil:
		s.runs.WithLabelValues("skipped").Inc()
		return res, errs.E(errs.Conflict, "another sync with Stripe is running")
	case err != nil:
		s.runs.WithLabelValues("error").Inc()
		return res, err
	}
	s.runs.WithLabelValues("ok").Inc()
	s.found.WithLabelValues("events_new").Add(float64(res.EventsNew))
	s.found.WithLabelValues("payments_changed").Add(float64(res.PaymentsChanged))
	s.intake.logger.InfoContext(ctx, "synced with Stripe", "events_listed", res.EventsListed, "events_new", res.EventsNew,
		"payments_checked", res.PaymentsChecked, "payments_changed", res.PaymentsChanged)
	return res, nil
}

// Name names the worker in logs.
func (s *Syncer) Name() string { return "stripe-sync" }

// Run syncs every Interval until ctx ends (never when Interval is 0).
func (s *Syncer) Run(ctx context.Context) error {
	if s.interval <= 0 {
		<-ctx.Done()
		return ctx.Err()
	}
	t := time.NewTicker(s.interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
		if _, err := s.Sync(ctx, time.Time{}); err != nil && !errs.Is(err, errs.Conflict) && ctx.Err() == nil {
			s.intake.logger.WarnContext(ctx, "sync with Stripe failed", "error", err)
		}
	}
}
