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
// The customers compared are those with a Stripe customer and delivered
// events of the meter in the window (by the events' own timestamps);
// pending, waiting and dead events are not in Stripe and so not counted.
// Stripe aggregates asynchronously, so events delivered in the last minutes
// may show as a drift that goes away when run again.
//
// Errors: errs.Invalid (unknown meter, a window shorter than one whole
// minute), errs.Unavailable (Stripe not configured, database or Stripe
// unreachable), errs.RateLimited, errs.PaymentProviderError.
func (s *Service) Reconcile(ctx context.Context, meter string, from, to time.Time) (Reconciliation, error) {
	plan, ok := s.catalog.PlanByMeter(meter)
	if !ok {
		return Reconciliation{}, errs.InvalidField("/meter", unknownMeter(s.catalog, meter))
	}
	if now := s.now(); to.After(now) {
		to = now
	}
	from, to = from.UTC().Truncate(time.Minute), to.UTC().Truncate(time.Minute)
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
		SELECT u.customer_id, c.stripe_customer_id, sum(u.value)::bigint AS total
		FROM usage_events u JOIN customers c ON c.id = u.customer_id
		WHERE u.meter = ? AND u.status = 'delivered' AND u.occurred_at >= ? AND u.occurred_at < ?
		  AND c.stripe_customer_id IS NOT NULL
		GROUP BY u.customer_id, c.stripe_customer_id
		ORDER BY u.customer_id`, meter, from, to).Scan(&rows).Error
	if err != nil {
		return Reconciliation{}, db.Translate(err, nil)
	}
	out := Reconciliation{Meter: meter, From: from, To: to, Mismatches: []Mismatch{}}
	for _, r := range rows {
		sums, err := s.stripe.MeterEventSummaries(ctx, stripeapi.SummaryInput{
			MeterID: plan.StripeMeterID, StripeCustomerID: r.StripeCustomerID, Start: from, End: to,
		})
		if err != nil {
			return Reconciliation{}, fmt.Errorf("metering: summaries of %s: %w", r.CustomerID, err)
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
