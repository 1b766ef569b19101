package metering

import (
	"context"
	"fmt"
	"math/big"
	"time"

	"github.com/tallybilling/tally/internal/catalog"
	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/errs"
)

// The cut-over from a legacy usage system. A plan's live_from says from
// when tally's events are billed through Stripe: events timestamped before
// it are stored as legacy_period and never sent. With live_from:
// next_period, each customer's cut-over is the start of their next Stripe
// billing period, so the period running when tally takes over is billed
// whole by the legacy system and every later one whole by Stripe: none by
// both, none by neither. It is decided once per customer and meter, by the
// delivery worker just before it would send the customer's first event on
// the meter (resolveCutovers), from the customer's subscription to the
// plan's price, and stored in usage_cutovers; it never moves afterwards.

// cutoverRow is a row of usage_cutovers.
type cutoverRow struct {
	CustomerID string
	Meter      string
	LiveFrom   time.Time
	Source     string
	DecidedAt  time.Time
}

func (cutoverRow) TableName() string { return "usage_cutovers" }

// Cut-over sources (usage_cutovers.source).
const (
	cutoverFromSubscription   = "subscription"
	cutoverWithoutSubcription = "no_subscription"
)

// annotateLiveFrom fills in each meter's delivery and the customer's
// cut-over on it.
func (s *Service) annotateLiveFrom(ctx context.Context, customerID string, meters []MeterTotal) error {
	var rows []cutoverRow
	if err := s.db.WithContext(ctx).Where("customer_id = ?", customerID).Find(&rows).Error; err != nil {
		return db.Translate(err, nil)
	}
	decided := map[string]time.Time{}
	for _, r := range rows {
		decided[r.Meter] = r.LiveFrom.UTC()
	}
	for i := range meters {
		plan, ok := s.catalog.PlanByMeter(meters[i].Meter)
		if !ok {
			continue
		}
		meters[i].Delivery = plan.Delivery
		switch {
		case plan.LiveFromNextPeriod:
			if t, ok := decided[plan.Meter]; ok {
				meters[i].LiveFrom = &t
			} else {
				meters[i].LiveFromNextPeriod = true
			}
		case plan.LiveFrom != nil:
			t := *plan.LiveFrom
			meters[i].LiveFrom = &t
		}
	}
	return nil
}

// nextPeriodMeters are the meters whose plans cut over at each customer's
// next billing period.
func nextPeriodMeters(c catalog.Catalog) []string {
	out := []string{}
	for _, p := range c.Plans {
		if p.LiveFromNextPeriod && !p.Shadow() {
			out = append(out, p.Meter)
		}
	}
	return out
}

// int64Total reads a whole-number sum computed as numeric, and refuses one
// past the int64 range (what) rather than wrapping around.
func int64Total(text, what string) (int64, error) {
	n, ok := new(big.Int).SetString(text, 10)
	if !ok {
		return 0, fmt.Errorf("metering: %s: not a whole number: %q", what, text)
	}
	if !n.IsInt64() {
		return 0, errs.E(errs.Invalid, "%s adds up to %s, past the largest total tally reports (%d); ask for a shorter window", what, n, int64(1<<63-1))
	}
	return n.Int64(), nil
}
