package metering

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"log/slog"
	"math/big"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/customers"
	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/errs"
)

// Stored reconciliation runs, the periodic reconciler, one customer's
// billing period reconciled whole, and the comparison with a legacy
// system's totals.

// Kinds of stored runs (usage_reconciliations.kind).
const (
	runScheduled = "scheduled"
	runManual    = "manual"
	runPeriod    = "period"
)

// Run is a stored reconciliation run.
type Run struct {
	Reconciliation
	Kind       string
	CustomerID string
	// Drift is the summed absolute difference of the mismatches.
	Drift     int64
	CreatedAt time.Time
}

type runRow struct {
	ID         string `gorm:"primaryKey"`
	Meter      string
	FromT      time.Time
	ToT        time.Time
	Kind       string
	CustomerID *string
	Checked    int
	Mismatches string
	Drift      string
	CreatedAt  time.Time
}

func (runRow) TableName() string { return "usage_reconciliations" }

type mismatchJSON struct {
	CustomerID  string `json:"customer_id"`
	LocalTotal  string `json:"local_total"`
	StripeTotal string `json:"stripe_total"`
	Difference  string `json:"difference"`
}

// drift is the summed absolute difference of rec's mismatches, as a big
// number: many differences near the int64 limit add up past it.
func drift(rec Reconciliation) *big.Int {
	d := new(big.Int)
	for _, m := range rec.Mismatches {
		x := big.NewInt(m.Difference)
		d.Add(d, x.Abs(x))
	}
	return d
}

// storeRun stores rec as a run of kind and sets its ID. A scheduled run of
// a window already stored (by another replica) is errDuplicateRun.
func (s *Service) storeRun(ctx context.Context, rec *Reconciliation, kind, customerID string) error {
	ms := make([]mismatchJSON, len(rec.Mismatches))
	for i, m := range rec.Mismatches {
		ms[i] = mismatchJSON{m.CustomerID, strconv.FormatInt(m.LocalTotal, 10), strconv.FormatInt(m.StripeTotal, 10), strconv.FormatInt(m.Difference, 10)}
	}
	raw, _ := json.Marshal(ms)
	row := runRow{ID: db.NewID("rcn"), Meter: rec.Meter, FromT: rec.From, ToT: rec.To, Kind: kind, Checked: rec.Checked,
		Mismatches: string(raw), Drift: drift(*rec).String(), CreatedAt: s.now()}
	if customerID != "" {
		row.CustomerID = &customerID
	}
	err := s.db.WithContext(ctx).Exec(`INSERT INTO usage_reconciliations (id, meter, from_t, to_t, kind, customer_id, checked, mismatches, drift, created_at)
		VALUES (?, ?, ?, ?, ?, ?, ?, ?::jsonb, ?::numeric, ?) ON CONFLICT DO NOTHING`,
		row.ID, row.Meter, row.FromT, row.ToT, row.Kind, row.CustomerID, row.Checked, row.Mismatches, row.Drift, row.CreatedAt).Error
	if err != nil {
		return db.Translate(err, nil)
	}
	rec.ID = row.ID
	return nil
}

func (r runRow) run() (Run, error) {
	var ms []mismatchJSON
	if err := json.Unmarshal([]byte(r.Mismatches), &ms); err != nil {
		return Run{}, fmt.Errorf("metering: stored reconciliation %s: %w", r.ID, err)
	}
	out := Run{Reconciliation: Reconciliation{ID: r.ID, Meter: r.Meter, From: r.FromT.UTC(), To: r.ToT.UTC(), Checked: r.Checked, Mismatches: []Mismatch{}},
		Kind: r.Kind, CreatedAt: r.CreatedAt.UTC()}
	if r.CustomerID != nil {
		out.CustomerID = *r.CustomerID
	}
	for _, m := range ms {
		l, _ := strconv.ParseInt(m.LocalTotal, 10, 64)
		st, _ := strconv.ParseInt(m.StripeTotal, 10, 64)
		d, _ := strconv.ParseInt(m.Difference, 10, 64)
		out.Mismatches = append(out.Mismatches, Mismatch{CustomerID: m.CustomerID, LocalTotal: l, StripeTotal: st, Difference: d})
	}
	d, err := int64Total(r.Drift, "the drift of reconciliation "+r.ID)
	if err != nil {
		d = 1<<63 - 1 // reported as the most a drift can show
	}
	out.Drift = d
	return out, nil
}

// RunPage is a page of stored runs; Next is "" on the last page.
type RunPage struct {
	Runs []Run
	Next string
}

type runCursor struct {
	CreatedAt time.Time `json:"c"`
	ID        string    `json:"i"`
}

// ListRuns pages through stored runs, newest first, of one meter or all
// (meter ""). Errors: errs.Invalid (limit, cursor), errs.Unavailable.
func (s *Service) ListRuns(ctx context.Context, meter, cursor string, limit int) (RunPage, error) {
	if err := db.CheckPageSize(limit); err != nil {
		return RunPage{}, err
	}
	q := s.db.WithContext(ctx).Model(&runRow{})
	if meter != "" {
		q = q.Where("meter = ?", meter)
	}
	if cursor != "" {
		var c runCursor
		raw, err := base64.RawURLEncoding.DecodeString(cursor)
		if err != nil || json.Unmarshal(raw, &c) != nil || c.ID == "" {
			return RunPage{}, errs.InvalidField("cursor", "malformed cursor; pass back a next_cursor returned by this list")
		}
		q = q.Where("(created_at, id) < (?, ?)", c.CreatedAt, c.ID)
	}
	var rows []runRow
	if err := q.Order("created_at DESC, id DESC").Limit(limit + 1).Find(&rows).Error; err != nil {
		return RunPage{}, db.Translate(err, nil)
	}
	page := RunPage{Runs: []Run{}}
	for i, r := range rows {
		if i == limit {
			raw, _ := json.Marshal(runCursor{CreatedAt: rows[i-1].CreatedAt, ID: rows[i-1].ID})
			page.Next = base64.RawURLEncoding.EncodeToString(raw)
			break
		}
		run, err := r.run()
		if err != nil {
			return RunPage{}, err
		}
		page.Runs = append(page.Runs, run)
	}
	return page, nil
}

// Billing periods a customer's reconciliation may cover.
const (
	PeriodCurrent  = "current"
	PeriodPrevious = "previous"
)

// ReconcilePeriod reconciles one customer's current or previous Stripe
// billing period on meter, as their subscription to the meter's plan says
// (the previous period is the one before it as Stripe counts periods:
// previousPeriod), and stores the run.
//
// Errors: errs.Invalid (unknown meter or period), errs.NotFound (unknown
// customer), errs.Conflict (no Stripe customer or no subscription to the
// plan), errs.Unavailable, errs.RateLimited, errs.PaymentProviderError.
func (s *Service) ReconcilePeriod(ctx context.Context, meter, customerID, period string) (Reconciliation, error) {
	plan, ok := s.catalog.PlanByMeter(meter)
	if !ok {
		return Reconciliation{}, errs.InvalidField("/meter", unknownMeter(s.catalog, meter))
	}
	if period != PeriodCurrent && period != PeriodPrevious {
		return Reconciliation{}, errs.InvalidField("/period", "period must be current or previous")
	}
	if s.stripe == nil {
		return Reconciliation{}, errs.E(errs.Unavailable, "Stripe is not configured (TALLY_STRIPE_SECRET_KEY)")
	}
	c, err := customers.Get(ctx, s.db, customerID)
	if err != nil {
		return Reconciliation{}, err
	}
	if c.StripeCustomerID == "" {
		return Reconciliation{}, errs.E(errs.Conflict, "customer %s has no Stripe customer, so no Stripe billing period", customerID)
	}
	if s.turn != nil {
		if err := s.turn(ctx); err != nil {
			return Reconciliation{}, errs.Wrap(err, errs.Unavailable, "waiting for a turn in the meter rate limit")
		}
	}
	p, found, err := s.stripe.BillingPeriod(ctx, c.StripeCustomerID, plan.StripePrice)
	if err != nil {
		return Reconciliation{}, err
	}
	if !found {
		return Reconciliation{}, errs.E(errs.Conflict, "customer %s has no active subscription to %s (plan %s)", customerID, plan.StripePrice, plan.ID)
	}
	from, to := p.Start, p.End
	if period == PeriodPrevious {
		from, to = previousPeriod(p.Start, p.End)
	}
	rec, err := s.reconcile(ctx, meter, from, to, customerID)
	if err != nil {
		return Reconciliation{}, err
	}
	return rec, s.storeRun(ctx, &rec, runPeriod, customerID)
}

// previousPeriod is the billing period before [start, end), as Stripe
// counts billing periods (UTC). A period of whole months (one, or every n
// up to a year) keeps its anchor day, which Stripe moves to the last day
// of a shorter month: an anchor of the 31st bills January 31, February 28,
// March 31, April 30, so the period before [March 31, April 30) is
// [February 28, March 31). Stepping a month back from start alone (March
// 31 less a month is "February 31", March 3), or as long as the current
// period (March 1), missed or added days at every end of a short month.
// The anchor day is the later of the two ends' days: of two adjacent
// months at most one is shorter than the anchor. Any other period is
// taken to be as long as the current one.
func previousPeriod(start, end time.Time) (time.Time, time.Time) {
	start, end = start.UTC(), end.UTC()
	anchor := max(start.Day(), end.Day())
	for n := 1; n <= 12; n++ {
		if addMonthsOnAnchor(start, n, anchor).Equal(end) {
			return addMonthsOnAnchor(start, -n, anchor), start
		}
	}
	return start.Add(-end.Sub(start)), start
}

// addMonthsOnAnchor is t moved n calendar months (UTC), on the anchor day
// of that month or its last day when the month is shorter, at t's time of
// day.
func addMonthsOnAnchor(t time.Time, n, anchor int) time.Time {
	first := time.Date(t.Year(), t.Month()+time.Month(n), 1, t.Hour(), t.Minute(), t.Second(), t.Nanosecond(), time.UTC)
	last := first.AddDate(0, 1, -1).Day()
	return first.AddDate(0, 0, min(anchor, last)-1)
}

// Turn waits for one request's turn in this worker's share of the meter
// rate limit, as a send does, so what else calls Stripe on the meter's
// behalf (reconciliation) counts in the same limit. Errors: ctx's.
func (w *Worker) Turn(ctx context.Context) error {
	for {
		if p := max(w.pauseLeft(), w.holdLeft()); p > 0 {
			t := time.NewTimer(p)
			select {
			case <-ctx.Done():
				t.Stop()
				return ctx.Err()
			case <-t.C:
			}
			continue
		}
		w.waitMu.Lock()
		err := w.limiter.Wait(ctx)
		w.waitMu.Unlock()
		if err != nil {
			return err
		}
		w.mu.Lock()
		w.lastSend = time.Now()
		w.mu.Unlock()
		return nil
	}
}

// ReconcileSettle is how long after a window ends the reconciler waits
// before comparing it: Stripe aggregates meter events asynchronously, so
// the last minutes' summaries are not final yet.
const ReconcileSettle = 10 * time.Minute

// Reconciler reconciles every meter every Interval, over the last closed
// window of that length (aligned to multiples of Interval since the Unix
// epoch) that ended at least ReconcileSettle ago, and stores each run. One
// replica at a time runs (a PostgreSQL advisory lock); a window already
// stored is not run again. Every replica publishes tally_usage_drift and
// tally_usage_drift_streak from the stored runs.
type Reconciler struct {
	svc      *Service
	gdb      *gorm.DB
	interval time.Duration
	log      *slog.Logger
	drift    *prometheus.GaugeVec
	streak   *prometheus.GaugeVec
}

// NewReconciler returns the reconciler of svc, registering its gauges on
// reg (nil: unregistered).
func NewReconciler(svc *Service, interval time.Duration, logger *slog.Logger, reg prometheus.Registerer) *Reconciler {
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	r := &Reconciler{svc: svc, gdb: svc.db, interval: interval, log: logger.With("worker", "usage-reconciler"),
		drift: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "tally_usage_drift",
			Help: "The summed absolute difference between tally's delivered usage and Stripe's summaries in the latest scheduled reconciliation, per meter.",
		}, []string{"meter"}),
		streak: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "tally_usage_drift_streak",
			Help: "How many of the latest scheduled reconciliation runs in a row found drift, per meter (0, 1 or 2: two is what the alert waits for).",
		}, []string{"meter"}),
	}
	if reg != nil {
		r.drift = register(reg, r.drift)
		r.streak = register(reg, r.streak)
	}
	return r
}

// Name is the worker's name for logs.
func (r *Reconciler) Name() string { return "usage-reconciler" }

// Run reconciles every interval until ctx ends.
func (r *Reconciler) Run(ctx context.Context) error {
	r.log.Info("usage reconciliation started", "interval", r.interval.String())
	// Looking often is cheap (a count per meter): a window is run soon
	// after it settles, once.
	t := time.NewTicker(min(r.interval, 10*time.Second))
	defer t.Stop()
	for {
		if err := r.RunOnce(ctx); err != nil && ctx.Err() == nil {
			r.log.Error("usage reconciliation failed; tried again next round", "error", err)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

// Window is the window a scheduled run at now covers.
func (r *Reconciler) Window(now time.Time) (time.Time, time.Time) {
	iv := int64(r.interval / time.Second)
	end := now.Add(-ReconcileSettle).Unix() / iv * iv
	return time.Unix(end-iv, 0).UTC(), time.Unix(end, 0).UTC()
}

// RunOnce runs the scheduled reconciliation of every meter whose current
// window is not stored yet, unless another replica is running it, then
// refreshes the gauges.
func (r *Reconciler) RunOnce(ctx context.Context) error {
	defer r.refreshGauges(ctx)
	sqlDB, err := r.gdb.DB()
	if err != nil {
		return err
	}
	conn, err := sqlDB.Conn(ctx)
	if err != nil {
		return db.Translate(err, nil)
	}
	defer conn.Close()
	key := lockKey("tally:usage-reconciler")
	var got bool
	if err := conn.QueryRowContext(ctx, `SELECT pg_try_advisory_lock($1)`, key).Scan(&got); err != nil {
		return db.Translate(err, nil)
	}
	if !got {
		return nil
	}
	defer func() {
		uctx, cancel := withTimeout(ctx, recordTimeout)
		defer cancel()
		_, _ = conn.ExecContext(uctx, `SELECT pg_advisory_unlock($1)`, key)
	}()
	from, to := r.Window(r.svc.now())
	var errsOut []error
	for _, p := range r.svc.catalog.Plans {
		if p.Shadow() {
			continue
		}
		var n int64
		if err := r.gdb.WithContext(ctx).Model(&runRow{}).Where("kind = ? AND meter = ? AND from_t = ?", runScheduled, p.Meter, from).Count(&n).Error; err != nil {
			return db.Translate(err, nil)
		}
		if n > 0 {
			continue
		}
		rec, err := r.svc.reconcile(ctx, p.Meter, from, to, "")
		if err != nil {
			errsOut = append(errsOut, fmt.Errorf("meter %s: %w", p.Meter, err))
			continue
		}
		if err := r.svc.storeRun(ctx, &rec, runScheduled, ""); err != nil {
			return err
		}
		r.log.Info("usage reconciled", "meter", p.Meter, "from", rec.From, "to", rec.To, "checked", rec.Checked, "mismatches", len(rec.Mismatches))
	}
	return errors.Join(errsOut...)
}

// refreshGauges sets the drift gauges from the latest two scheduled runs
// of each meter.
func (r *Reconciler) refreshGauges(ctx context.Context) {
	for _, p := range r.svc.catalog.Plans {
		var drifts []string
		err := r.gdb.WithContext(ctx).Model(&runRow{}).Where("kind = ? AND meter = ?", runScheduled, p.Meter).
			Order("from_t DESC").Limit(2).Pluck("drift::text", &drifts).Error
		if err != nil {
			if ctx.Err() == nil {
				r.log.Warn("read reconciliation runs for the drift gauges", "error", err)
			}
			return
		}
		latest, streak := 0.0, 0
		for i, d := range drifts {
			f, _ := new(big.Float).SetString(d)
			v := 0.0
			if f != nil {
				v, _ = f.Float64()
			}
			if i == 0 {
				latest = v
			}
			if v <= 0 {
				break
			}
			streak++
		}
		r.drift.WithLabelValues(p.Meter).Set(latest)
		r.streak.WithLabelValues(p.Meter).Set(float64(streak))
	}
}

func lockKey(name string) int64 {
	h := fnv.New64a()
	_, _ = h.Write([]byte(name))
	return int64(h.Sum64())
}

// LegacyTotal is one customer's total in a legacy system.
type LegacyTotal struct {
	CustomerID string
	Total      int64
}

// Comparison is tally's totals against a legacy system's over [From, To).
type Comparison struct {
	Meter      string
	From, To   time.Time
	Compared   int
	Mismatches []ComparisonMismatch
}

// ComparisonMismatch is one customer whose totals differ.
type ComparisonMismatch struct {
	CustomerID  string
	TallyTotal  int64
	LegacyTotal int64
	// Difference is TallyTotal - LegacyTotal.
	Difference int64
}

// MaxLegacyTotals is how many legacy totals one comparison takes.
const MaxLegacyTotals = 100_000

// Compare compares tally's totals on meter over [from, to) (every counted
// event: delivered, queued, historical, shadow and legacy-period ones,
// daily totals of purged ones) with legacy, per customer: those in either
// list, a customer missing from one counting 0 there.
//
// Errors: errs.Invalid (unknown meter, from not before to, a customer
// twice or a negative total in legacy, too many), errs.Unavailable.
func (s *Service) Compare(ctx context.Context, meter string, from, to time.Time, legacy []LegacyTotal) (Comparison, error) {
	if _, ok := s.catalog.PlanByMeter(meter); !ok {
		return Comparison{}, errs.InvalidField("/meter", unknownMeter(s.catalog, meter))
	}
	if !from.Before(to) {
		return Comparison{}, errs.InvalidField("/from", "from must be before to")
	}
	if len(legacy) > MaxLegacyTotals {
		return Comparison{}, errs.InvalidField("/legacy", fmt.Sprintf("at most %d legacy totals at once", MaxLegacyTotals))
	}
	want := make(map[string]int64, len(legacy))
	for i, l := range legacy {
		if err := customers.ValidateID(l.CustomerID); err != nil {
			return Comparison{}, errs.InvalidField(fmt.Sprintf("/legacy/%d/customer_id", i), "customer_id must be 1 to 255 characters of A-Za-z0-9_.:@-")
		}
		if l.Total < 0 {
			return Comparison{}, errs.InvalidField(fmt.Sprintf("/legacy/%d/total", i), "a total must not be negative")
		}
		if _, dup := want[l.CustomerID]; dup {
			return Comparison{}, errs.InvalidField(fmt.Sprintf("/legacy/%d/customer_id", i), fmt.Sprintf("customer %s is listed twice", l.CustomerID))
		}
		want[l.CustomerID] = l.Total
	}
	from, to = s.window(from.UTC(), to.UTC(), s.now())
	var rows []struct {
		CustomerID string
		Total      string
	}
	err := s.db.WithContext(ctx).Raw(`
		WITH p AS NOT MATERIALIZED (SELECT ?::text AS meter, ?::timestamptz AS from_t, ?::timestamptz AS to_t)
		SELECT customer_id, sum(total)::text AS total FROM (
			SELECT e.customer_id, e.value::numeric AS total FROM usage_events e, p
			WHERE e.meter = p.meter AND e.occurred_at >= p.from_t AND e.occurred_at < p.to_t AND e.status IN `+countedStatuses+`
			UNION ALL
			SELECT d.customer_id, d.total::numeric FROM usage_daily_totals d, p
			WHERE d.meter = p.meter AND d.day >= p.from_t AND d.day < p.to_t
		) u GROUP BY customer_id ORDER BY customer_id`, meter, from, to).Scan(&rows).Error
	if err != nil {
		return Comparison{}, db.Translate(err, nil)
	}
	out := Comparison{Meter: meter, From: from, To: to, Mismatches: []ComparisonMismatch{}}
	seen := map[string]bool{}
	add := func(id string, tally int64) {
		seen[id] = true
		out.Compared++
		if l := want[id]; l != tally {
			out.Mismatches = append(out.Mismatches, ComparisonMismatch{CustomerID: id, TallyTotal: tally, LegacyTotal: l, Difference: tally - l})
		}
	}
	for _, r := range rows {
		t, err := int64Total(r.Total, "customer "+r.CustomerID+"'s usage on meter "+meter)
		if err != nil {
			return Comparison{}, err
		}
		add(r.CustomerID, t)
	}
	for _, l := range legacy {
		if !seen[l.CustomerID] {
			add(l.CustomerID, 0)
		}
	}
	return out, nil
}
