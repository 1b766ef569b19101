package metering

import (
	"context"
	"fmt"
	"math"
	"time"

	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/errs"
	"github.com/tallybilling/tally/internal/stripeapi"
)

// Reconciliation compares, per customer, the usage we delivered to Stripe in
// [From, To) with Stripe's meter event summaries.
type Reconciliation struct {
	// ID is the stored run's.
	ID       string
	Meter    string
	From, To time.Time
	// Checked is how many customers were compared.
	Checked    int
	Mismatches []Mismatch
}

// Mismatch is one customer whose totals differ.
type Mismatch struct {
	CustomerID  string
	LocalTotal  int64
	StripeTotal int64
	// Difference is StripeTotal - LocalTotal: positive when Stripe counts
	// more than we sent.
	Difference int64
}

// Reconcile compares what we delivered on meter with Stripe's summaries over
// the window [from, to). Stripe aggregates in whole minutes, so a `to` in the
// future is first clamped to now, then both ends are floored to the minute.
// Ends of the window before the usage retention's horizon are then moved to
// UTC day boundaries (retention.go), where tally knows usage per day only;
// the answer's From and To are the window compared. The customers compared
// are all those with a Stripe customer and any event of the meter in the
// window (by the events' own timestamps), whatever its status, or a daily
// total of purged events: a customer whose events are all dead or pending
// may still be counted by Stripe (a send that timed out after Stripe kept
// it), and that is the drift this exists to find. The local total is the
// sum of the delivered events, purged ones included. Stripe aggregates asynchronously, so events
// delivered in the last minutes may show as a drift that goes away when run
// again.
//
// Summary requests are paced (summaryRate per Service) and a customer's
// request that fails retryably (429, 5xx, network) is tried again up to
// summaryAttempts times; should it still fail, the whole reconciliation
// fails naming that customer, never answering with the customers compared
// so far as if they were all.
//
// Errors: errs.Invalid (unknown meter, a window shorter than one whole
// minute, the zero time as from or to), errs.Unavailable (Stripe not configured, database or Stripe
// unreachable), errs.RateLimited, errs.PaymentProviderError.
func (s *Service) Reconcile(ctx context.Context, meter string, from, to time.Time) (Reconciliation, error) {
	rec, err := s.reconcile(ctx, meter, from, to, "")
	if err != nil {
		return Reconciliation{}, err
	}
	return rec, s.storeRun(ctx, &rec, runManual, "")
}

// reconcile compares meter over [from, to) for every customer, or for
// customerID alone.
func (s *Service) reconcile(ctx context.Context, meter string, from, to time.Time, customerID string) (Reconciliation, error) {
	plan, ok := s.catalog.PlanByMeter(meter)
	if !ok {
		return Reconciliation{}, errs.InvalidField("/meter", unknownMeter(s.catalog, meter))
	}
	if err := refuseZeroTime("/from", "from", from, "give the start of the window"); err != nil {
		return Reconciliation{}, err
	}
	if err := refuseZeroTime("/to", "to", to, "give the end of the window"); err != nil {
		return Reconciliation{}, err
	}
	if now := s.now(); to.After(now) {
		to = now
	}
	from, to = from.UTC().Truncate(time.Minute), to.UTC().Truncate(time.Minute)
	if from.Before(to) {
		from, to = s.window(from, to, s.now())
	}
	if !from.Before(to) {
		return Reconciliation{}, errs.E(errs.Invalid,
			"the window %s to %s holds no whole minute (Stripe summarises whole minutes; to is clamped to now)",
			from.Format(time.RFC3339), to.Format(time.RFC3339))
	}
	if s.stripe == nil {
		return Reconciliation{}, errs.E(errs.Unavailable, "Stripe is not configured (TALLY_STRIPE_SECRET_KEY)")
	}
	var rows []struct {
		CustomerID       string
		StripeCustomerID string
		Total            string
	}
	// What Stripe should hold: delivered events, and cancelled-after-
	// delivery ones whose adjustment has not gone yet. Events never sent
	// (historical, shadow, legacy period, cancelled before sending) count
	// 0 but still name their customer. Sums are numeric (see int64Total).
	err := s.db.WithContext(ctx).Raw(`
		WITH p AS NOT MATERIALIZED (SELECT ?::text AS meter, ?::timestamptz AS from_t, ?::timestamptz AS to_t, ?::text AS customer)
		SELECT x.customer_id, c.stripe_customer_id, COALESCE(sum(x.total), 0)::text AS total
		FROM (
			SELECT e.customer_id, CASE WHEN e.status = 'delivered' OR (e.status = 'cancel_pending' AND e.delivered_at IS NOT NULL)
				THEN e.value ELSE 0 END::numeric AS total
			FROM usage_events e, p WHERE e.meter = p.meter AND e.occurred_at >= p.from_t AND e.occurred_at < p.to_t
			  AND (p.customer = '' OR e.customer_id = p.customer)
			UNION ALL
			SELECT d.customer_id, d.total::numeric FROM usage_daily_totals d, p
			WHERE d.meter = p.meter AND d.day >= p.from_t AND d.day < p.to_t AND (p.customer = '' OR d.customer_id = p.customer)
		) x JOIN customers c ON c.id = x.customer_id
		WHERE c.stripe_customer_id IS NOT NULL
		GROUP BY x.customer_id, c.stripe_customer_id
		ORDER BY x.customer_id`, meter, from, to, customerID).Scan(&rows).Error
	if err != nil {
		return Reconciliation{}, db.Translate(err, nil)
	}
	if customerID != "" && len(rows) == 0 {
		// One customer asked for by name is compared even without usage
		// in tally: Stripe may hold some.
		var stripeID *string
		if err := s.db.WithContext(ctx).Raw(`SELECT stripe_customer_id FROM customers WHERE id = ?`, customerID).Scan(&stripeID).Error; err != nil {
			return Reconciliation{}, db.Translate(err, nil)
		}
		if stripeID != nil {
			rows = append(rows, struct {
				CustomerID       string
				StripeCustomerID string
				Total            string
			}{customerID, *stripeID, "0"})
		}
	}
	out := Reconciliation{Meter: meter, From: from, To: to, Mismatches: []Mismatch{}}
	for _, r := range rows {
		local, err := int64Total(r.Total, "customer "+r.CustomerID+"'s delivered usage on meter "+meter)
		if err != nil {
			return Reconciliation{}, err
		}
		sums, err := s.summaries(ctx, stripeapi.SummaryInput{
			MeterID: plan.StripeMeterID, StripeCustomerID: r.StripeCustomerID, Start: from, End: to,
		})
		if err != nil {
			return Reconciliation{}, summaryFailed(err, meter, r.CustomerID, r.StripeCustomerID, out.Checked, len(rows))
		}
		var stripeTotal float64
		for _, sm := range sums {
			stripeTotal += sm.AggregatedValue
		}
		// A float from outside: NaN, infinities and values past int64
		// have no whole-number reading; converting them is undefined.
		if math.IsNaN(stripeTotal) || math.IsInf(stripeTotal, 0) || math.Abs(stripeTotal) >= 1<<62 {
			return Reconciliation{}, errs.E(errs.PaymentProviderError,
				"reconciliation of meter %s: Stripe's summary for customer %s is %v, not a total tally can compare", meter, r.CustomerID, stripeTotal)
		}
		out.Checked++
		st := int64(math.Round(stripeTotal))
		if st != local {
			out.Mismatches = append(out.Mismatches, Mismatch{
				CustomerID: r.CustomerID, LocalTotal: local, StripeTotal: st, Difference: st - local,
			})
		}
	}
	return out, nil
}

// summaryRate is how many summary requests per second one Service sends at
// most, across concurrent reconciliations: a quarter of the default meter
// event rate (TALLY_METER_RATE_LIMIT). Each request also waits its turn in
// the delivery worker's share of that limit (Options.MeterTurn), so
// reconciliation counts in it and leaves delivery most of it.
const summaryRate = 5

// summaryAttempts is how often one customer's summary is asked for before
// the reconciliation gives up.
const summaryAttempts = 4

// summaryBackoff is the wait before the second attempt; it doubles after.
// A Retry-After from Stripe replaces it, up to summaryMaxWait.
const (
	summaryBackoff = 250 * time.Millisecond
	summaryMaxWait = 10 * time.Second
)

// summaries asks Stripe for one customer's summaries at the paced rate,
// trying again after a retryable failure.
func (s *Service) summaries(ctx context.Context, in stripeapi.SummaryInput) ([]stripeapi.Summary, error) {
	wait := summaryBackoff
	for attempt := 1; ; attempt++ {
		if err := s.summaryLimiter.Wait(ctx); err != nil {
			return nil, errs.Wrap(err, errs.Unavailable, "waiting for the Stripe request pace")
		}
		if s.turn != nil {
			if err := s.turn(ctx); err != nil {
				return nil, errs.Wrap(err, errs.Unavailable, "waiting for a turn in the meter rate limit")
			}
		}
		sums, err := s.stripe.MeterEventSummaries(ctx, in)
		se, isStripe := stripeapi.AsError(err)
		if err == nil || !isStripe || !se.Retryable() || attempt == summaryAttempts {
			if err != nil && attempt > 1 {
				err = fmt.Errorf("after %d attempts: %w", attempt, err)
			}
			return sums, err
		}
		d := wait
		if se.RetryAfter > 0 {
			d = min(se.RetryAfter, summaryMaxWait)
		}
		t := time.NewTimer(d)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, errs.Wrap(ctx.Err(), errs.Unavailable, "reconciliation cancelled: %v", err)
		case <-t.C:
		}
		wait *= 2
	}
}

// summaryFailed is the error of a reconciliation that could not compare
// customerID: it names the customer and keeps the Stripe error's code and
// extras and Retry-After, so the caller sees why and when to retry.
func summaryFailed(err error, meter, customerID, stripeCustomerID string, checked, total int) error {
	code, cause, extra, retryAfter := errs.Unavailable, err.Error(), map[string]any(nil), time.Duration(0)
	if inner, ok := errs.As(err); ok {
		code, cause, extra, retryAfter = inner.Code, inner.Message, inner.Extra, inner.RetryAfter
	}
	return &errs.Error{
		Code: code,
		Message: fmt.Sprintf("reconciliation of meter %s failed at customer %s (Stripe customer %s) after %d of %d customers; no partial report: %s",
			meter, customerID, stripeCustomerID, checked, total, cause),
		Extra:      extra,
		RetryAfter: retryAfter,
		Err:        err,
	}
}
