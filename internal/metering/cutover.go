package metering

import (
	"context"
	"fmt"
	"math/big"
	"strings"
	"time"

	"gorm.io/gorm"
	"gorm.io/gorm/clause"

	"github.com/tallybilling/tally/internal/catalog"
	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/errs"
	"github.com/tallybilling/tally/internal/stripeapi"
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

// pq is ss as a PostgreSQL text array literal, for ?::text[].
func pq(ss []string) string {
	var b strings.Builder
	b.WriteByte('{')
	for i, s := range ss {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteByte('"')
		b.WriteString(strings.NewReplacer(`\`, `\\`, `"`, `\"`).Replace(s))
		b.WriteByte('"')
	}
	b.WriteByte('}')
	return b.String()
}

// cutoverLimit is how many cut-overs one round decides at most.
const cutoverLimit = 20

// resolveCutovers decides the cut-over of the customers with events to send
// on a next_period plan and none decided yet: the end of the current
// period of their subscription to the plan's price, or, without one, now
// (no Stripe period could bill their earlier usage). Their events before
// it, pending or waiting, become legacy_period. Each subscription look-up
// is a Stripe request inside the shared rate limit.
func (w *Worker) resolveCutovers(ctx context.Context) error {
	if len(w.nextPeriod) == 0 {
		return nil
	}
	var pairs []struct {
		CustomerID       string
		Meter            string
		StripeCustomerID string
	}
	err := w.db.WithContext(ctx).Raw(`
		SELECT DISTINCT e.customer_id, e.meter, c.stripe_customer_id
		FROM usage_events e JOIN customers c ON c.id = e.customer_id
		WHERE e.status = 'pending' AND e.meter = ANY(?::text[]) AND c.stripe_customer_id IS NOT NULL
		  AND NOT EXISTS (SELECT 1 FROM usage_cutovers k WHERE k.customer_id = e.customer_id AND k.meter = e.meter)
		LIMIT ?`, pq(w.nextPeriod), cutoverLimit).Scan(&pairs).Error
	if err != nil || len(pairs) == 0 {
		return db.Translate(err, nil)
	}
	c := &claim{leaseEnd: w.now().Add(time.Hour)}
	for _, p := range pairs {
		plan, ok := w.opts.Catalog.PlanByMeter(p.Meter)
		if !ok {
			continue
		}
		if ok, _ := w.acquire(ctx, c); !ok {
			return nil
		}
		sctx, cancel := withTimeout(ctx, w.cfg.SendTimeout)
		period, found, err := w.client.BillingPeriod(sctx, p.StripeCustomerID, plan.StripePrice)
		cancel()
		if err != nil {
			if se, ok := stripeapi.AsError(err); ok && se.Kind == stripeapi.KindRateLimited {
				w.pause(max(se.RetryAfter, w.opts.RateLimitPause))
			}
			return err
		}
		now := w.now()
		row := cutoverRow{CustomerID: p.CustomerID, Meter: p.Meter, LiveFrom: now, Source: cutoverWithoutSubcription, DecidedAt: now}
		if found {
			row.LiveFrom, row.Source = period.End, cutoverFromSubscription
		}
		err = db.InTx(ctx, w.db, func(tx *gorm.DB) error {
			if err := tx.WithContext(ctx).Clauses(clause.OnConflict{DoNothing: true}).Create(&row).Error; err != nil {
				return err
			}
			return tx.WithContext(ctx).Exec(`
				UPDATE usage_events e SET status = 'legacy_period', next_attempt_at = ?, updated_at = ?
				FROM usage_cutovers k
				WHERE k.customer_id = ? AND k.meter = ? AND e.customer_id = k.customer_id AND e.meter = k.meter
				  AND e.status IN ('pending', 'waiting_customer') AND e.claimed_by IS NULL AND e.occurred_at < k.live_from`,
				now, now, p.CustomerID, p.Meter).Error
		})
		if err != nil {
			return err
		}
		w.log.Info("usage cut-over decided", "customer_id", p.CustomerID, "meter", p.Meter, "live_from", row.LiveFrom, "source", row.Source)
	}
	return nil
}
