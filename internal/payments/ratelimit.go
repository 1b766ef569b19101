package payments

import (
	"context"
	"errors"
	"fmt"
	"time"

	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/errs"
)

// rateWindow is the period TALLY_CHECKOUT_RATE_LIMIT counts checkouts over.
const rateWindow = time.Minute

// allowCheckout spends one of the customer's checkouts, or refuses it with
// rate_limited and the wait until one is allowed again. The limit is the
// generic cell rate algorithm on one row per customer: each checkout moves
// the customer's "theoretical arrival time" (tat) one interval (a minute /
// limit) past max(tat, now), and is allowed while that stays within a
// minute from now. So a customer may start `limit` checkouts at once, then
// one per interval, and a refused request spends nothing. The row lives in
// the database, so the limit holds across every replica together.
// Errors: errs.RateLimited (with RetryAfter), errs.Unavailable.
func (s *Service) allowCheckout(ctx context.Context, customerID string) error {
	limit := s.checkout.RateLimit
	if limit <= 0 {
		return nil
	}
	interval := rateWindow / time.Duration(limit)
	now := s.now()
	// One statement, so concurrent checkouts of a customer queue on its row.
	// The checkout moves tat to max(tat, now) + interval, that is
	// max(tat + interval, now + interval) (the value a first checkout
	// inserts); it is allowed while that is within a minute from now, which
	// for a tat in the past always holds, and otherwise means tat <= now +
	// a minute - interval. A refused checkout updates nothing and returns no
	// row. It stays SQL: gorm's builder has no conditional upsert.
	var tats []time.Time
	err := s.db.WithContext(ctx).Raw(`INSERT INTO checkout_rate_limits AS l (customer_id, tat) VALUES (?, ?)
		ON CONFLICT (customer_id) DO UPDATE SET tat = GREATEST(l.tat + make_interval(secs => ?), EXCLUDED.tat)
		WHERE l.tat <= ?
		RETURNING tat`,
		customerID, now.Add(interval), interval.Seconds(), now.Add(rateWindow-interval)).Scan(&tats).Error
	if err != nil {
		return db.Translate(err, nil)
	}
	if len(tats) > 0 {
		return nil
	}
	var r rateLimitRow
	err = s.db.WithContext(ctx).Where("customer_id = ?", customerID).Take(&r).Error
	if errors.Is(err, gorm.ErrRecordNotFound) {
		// The refusal above found the row, and nothing deletes one.
		return fmt.Errorf("payments: the checkout rate limit row of customer %s vanished after refusing a checkout", customerID)
	}
	if err != nil {
		return db.Translate(err, nil)
	}
	tat := r.Tat
	// The next checkout is allowed once now + a minute reaches max(tat, now) + interval.
	wait := max(tat.Sub(now), 0) + interval - rateWindow
	return &errs.Error{
		Code:       errs.RateLimited,
		Message:    fmt.Sprintf("too many checkouts for customer %s; at most %d a minute", customerID, limit),
		RetryAfter: max(wait, time.Nanosecond),
	}
}
