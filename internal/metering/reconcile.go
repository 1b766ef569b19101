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
		Total            int64
	}
	err := s.db.WithContext(ctx).Raw(`
		WITH p AS NOT MATERIALIZED (SELECT ?::text AS meter, ?::timestamptz AS from_t, ?::timestamptz AS to_t)
		SELECT x.customer_id, c.stripe_customer_id, COALESCE(sum(x.total), 0)::bigint AS total
		FROM (
			SELECT e.customer_id, CASE WHEN e.status = 'delivered' THEN e.value ELSE 0 END AS total
			FROM usage_events e, p WHERE e.meter = p.meter AND e.occurred_at >= p.from_t AND e.occurred_at < p.to_t
			UNION ALL
			SELECT d.customer_id, d.total FROM usage_daily_totals d, p
			WHERE d.meter = p.meter AND d.day >= p.from_t AND d.day < p.to_t
		) x JOIN customers c ON c.id = x.customer_id
		WHERE c.stripe_customer_id IS NOT NULL
		GROUP BY x.customer_id, c.stripe_customer_id
		ORDER BY x.customer_id`, meter, from, to).Scan(&rows).Error
	if err != nil {
		return Reconciliation{}, db.Translate(err, nil)
	}
	out := Reconciliation{Meter: meter, From: from, To: to, Mismatches: []Mismatch{}}
	for _, r := range rows {
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
		out.Checked++
		st := int64(math.Round(stripeTotal))
		if st != r.Total {
			out.Mismatches = append(out.Mismatches, Mismatch{
				CustomerID: r.CustomerID, LocalTotal: r.Total, StripeTotal: st, Difference: st - r.Total,
			})
		}
	}
	return out, nil
}

// summaryRate is how many summary requests per second one Service sends at
// most, across concurrent reconciliations: the default meter event rate
// (TALLY_METER_RATE_LIMIT), well below Stripe's read limits, so a
// reconciliation of many customers neither trips a 429 nor starves the
// other Stripe calls of this account.
const summaryRate = 20

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
