package payments

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"gorm.io/gorm"
	"gorm.io/gorm/clause"

	"github.com/tallybilling/tally/internal/catalog"
	"github.com/tallybilling/tally/internal/customers"
	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/errs"
	"github.com/tallybilling/tally/internal/events"
)

// Automatic top-up: when a change that lowers a customer's credits (a
// consume, an expiry, a revoke) leaves the available balance below the
// customer's threshold, credits calls StartAutoTopUp inside that change's
// transaction, which writes a pending payment with method auto_top_up. The
// AutoTopUpWorker charges it off-session on the saved card; like every
// purchase, it is credited only by payment_intent.succeeded through the
// confirmation guard, exactly once. A refused charge fails the payment and
// emits credits.auto_top_up_failed; after DefaultAutoTopUpMaxFailures
// failures in a row automatic top-up disables itself
// (credits.auto_top_up_disabled).
//
// At most one automatic top-up is in flight per customer: the settings row
// names it (in_flight_payment_id), claimed by a conditional UPDATE, and a
// unique index on pending auto_top_up payments backs that up. So a storm of
// consumes crossing the threshold together starts one.

// DefaultAutoTopUpMaxFailures is how many automatic top-ups may fail in a
// row before it disables itself.
const DefaultAutoTopUpMaxFailures = 3

// AutoTopUp statuses, as the API shows them.
const (
	AutoTopUpActive             = "active"
	AutoTopUpDisabled           = "disabled"
	AutoTopUpNeedsPaymentMethod = "needs_payment_method"
)

// AutoTopUpInput configures a customer's automatic top-up.
type AutoTopUpInput struct {
	CustomerID string
	Enabled    bool
	// Threshold: a top-up starts when a change leaves fewer available
	// credits than this (1 or more).
	Threshold int64
	// Item is the credit pack bought, Quantity (0 means 1) times.
	Item     string
	Quantity int64
	// MonthlyLimit caps the top-ups started per calendar month (UTC); nil: none.
	MonthlyLimit *int
}

// AutoTopUp is a customer's automatic top-up settings and state.
type AutoTopUp struct {
	CustomerID   string
	Enabled      bool
	Threshold    int64
	Item         string
	Quantity     int64
	MonthlyLimit *int
	// Status is AutoTopUpActive, AutoTopUpDisabled (turned off, by the
	// customer or after repeated failures: DisabledReason says which) or
	// AutoTopUpNeedsPaymentMethod (no saved card, or it has expired).
	Status              string
	ConsecutiveFailures int
	DisabledReason      string
	// InFlightPaymentID is the pending automatic top-up, if any.
	InFlightPaymentID string
	// MonthCount is how many top-ups started this calendar month.
	MonthCount int
	UpdatedAt  time.Time
}

// autoTopUpRow is a row of auto_top_up_settings.
type autoTopUpRow struct {
	CustomerID          string
	Enabled             bool
	Threshold           int64
	Item                string
	Quantity            int64
	MonthlyLimit        *int
	Status              string
	ConsecutiveFailures int
	DisabledReason      string
	InFlightPaymentID   string
	MonthStart          *time.Time
	MonthCount          int
	UpdatedAt           time.Time `gorm:"autoUpdateTime:false"`
}

func (autoTopUpRow) TableName() string { return "auto_top_up_settings" }

// Validate checks the input against the catalog. Errors: errs.Invalid
// naming the field, errs.Unprocessable for a quantity over the limits.
func (s *Service) validateAutoTopUp(in *AutoTopUpInput) error {
	if err := customers.ValidateID(in.CustomerID); err != nil {
		return err
	}
	if in.Threshold < 1 || in.Threshold > catalog.MaxCreditsPerMove {
		return errs.InvalidField("/threshold", fmt.Sprintf("threshold must be a whole number from 1 to %d", int64(catalog.MaxCreditsPerMove)))
	}
	if in.MonthlyLimit != nil && (*in.MonthlyLimit < 1 || *in.MonthlyLimit > 1000) {
		return errs.InvalidField("/monthly_limit", "monthly_limit must be from 1 to 1000, or absent for no limit")
	}
	if _, ok := s.catalog.Pack(in.Item); !ok {
		return errs.InvalidField("/item", fmt.Sprintf("%q is not a credit pack of the catalog", in.Item))
	}
	if _, err := s.resolveItem(in.CustomerID, in.Item, &in.Quantity); err != nil {
		return err
	}
	return nil
}

// PutAutoTopUp saves a customer's automatic top-up settings. Enabling it
// (again) clears a disabled status and the failure count, so the product
// can bring a user whose card kept failing back once they fixed it. It
// starts nothing by itself: the next change that lowers the balance below
// the threshold does.
//
// Errors: errs.Invalid, errs.Unprocessable, errs.NotFound (unknown
// customer), errs.Unavailable.
func (s *Service) PutAutoTopUp(ctx context.Context, in AutoTopUpInput) (AutoTopUp, error) {
	if err := s.validateAutoTopUp(&in); err != nil {
		return AutoTopUp{}, err
	}
	err := db.InTx(ctx, s.db, func(tx *gorm.DB) error {
		if _, err := customers.Get(ctx, tx, in.CustomerID); err != nil {
			return err
		}
		now := s.now()
		set := map[string]any{
			"enabled": in.Enabled, "threshold": in.Threshold, "item": in.Item, "quantity": in.Quantity,
			"monthly_limit": in.MonthlyLimit, "updated_at": now,
		}
		if in.Enabled {
			set["status"], set["consecutive_failures"], set["disabled_reason"] = AutoTopUpActive, 0, nil
		}
		updates := make([]string, 0, len(set))
		for k := range set {
			updates = append(updates, k)
		}
		row := map[string]any{"customer_id": in.CustomerID}
		for k, v := range set {
			row[k] = v
		}
		return db.Translate(tx.WithContext(ctx).Model(&autoTopUpRow{}).Clauses(clause.OnConflict{
			Columns: []clause.Column{{Name: "customer_id"}}, DoUpdates: clause.AssignmentColumns(updates),
		}).Create(row).Error, nil)
	})
	if err != nil {
		return AutoTopUp{}, err
	}
	return s.GetAutoTopUp(ctx, in.CustomerID)
}

// GetAutoTopUp returns a customer's automatic top-up settings.
// Errors: errs.NotFound (unknown customer, or never configured), errs.Unavailable.
func (s *Service) GetAutoTopUp(ctx context.Context, customerID string) (AutoTopUp, error) {
	if _, err := customers.Get(ctx, s.db, customerID); err != nil {
		return AutoTopUp{}, err
	}
	var r autoTopUpRow
	err := s.db.WithContext(ctx).Where("customer_id = ?", customerID).Take(&r).Error
	if errors.Is(err, gorm.ErrRecordNotFound) {
		return AutoTopUp{}, errs.E(errs.NotFound, "customer %s has no automatic top-up configured", customerID)
	}
	if err != nil {
		return AutoTopUp{}, db.Translate(err, nil)
	}
	out := AutoTopUp{
		CustomerID: r.CustomerID, Enabled: r.Enabled, Threshold: r.Threshold, Item: r.Item, Quantity: r.Quantity,
		MonthlyLimit: r.MonthlyLimit, Status: r.Status, ConsecutiveFailures: r.ConsecutiveFailures,
		DisabledReason: r.DisabledReason, InFlightPaymentID: r.InFlightPaymentID, UpdatedAt: r.UpdatedAt,
	}
	now := s.now().UTC()
	if r.MonthStart != nil && r.MonthStart.Equal(monthStart(now)) {
		out.MonthCount = r.MonthCount
	}
	switch {
	case !r.Enabled:
		out.Status = AutoTopUpDisabled
		if out.DisabledReason == "" {
			out.DisabledReason = "turned off"
		}
	case r.Status == AutoTopUpDisabled:
	default:
		card, err := s.SavedPaymentMethod(ctx, customerID)
		if err != nil && !errs.Is(err, errs.NotFound) {
			return AutoTopUp{}, err
		}
		if err != nil || card.Expired(now) {
			out.Status = AutoTopUpNeedsPaymentMethod
		}
	}
	return out, nil
}

// monthStart is the first instant of t's calendar month, UTC.
func monthStart(t time.Time) time.Time {
	t = t.UTC()
	return time.Date(t.Year(), t.Month(), 1, 0, 0, 0, 0, time.UTC)
}

// StartAutoTopUp is credits' TopUpFunc: called inside the transaction of a
// change that left customerID with available credits below its threshold,
// it claims the customer's settings row (enabled, active, none in flight,
// under the month's limit, a saved card that has not expired; checked and
// set by one conditional UPDATE, so concurrent callers start one) and
// writes the pending auto_top_up payment the worker charges. When nothing
// may start it writes nothing.
func (s *Service) StartAutoTopUp(ctx context.Context, tx *gorm.DB, customerID string, available int64, now time.Time) error {
	month := monthStart(now)
	paymentID := db.NewID("pay")
	var claimed []struct {
		Item      string
		Quantity  int64
		Threshold int64
	}
	err := tx.WithContext(ctx).Raw(`
		UPDATE auto_top_up_settings t
		SET in_flight_payment_id = ?,
		    month_count = CASE WHEN t.month_start = ?::date THEN t.month_count + 1 ELSE 1 END,
		    month_start = ?::date, updated_at = ?
		FROM customer_payment_methods m
		WHERE t.customer_id = ? AND m.customer_id = t.customer_id
		  AND t.enabled AND t.status = 'active' AND t.in_flight_payment_id IS NULL AND ? < t.threshold
		  AND make_date(m.exp_year, m.exp_month, 1) + interval '1 month' > ?::date
		  AND (t.monthly_limit IS NULL OR t.month_start IS DISTINCT FROM ?::date OR t.month_count < t.monthly_limit)
		RETURNING t.item, t.quantity, t.threshold`,
		paymentID, month, month, now, customerID, available, now.UTC().Format(time.DateOnly), month).Scan(&claimed).Error
	if err != nil || len(claimed) == 0 {
		return db.Translate(err, nil)
	}
	c := claimed[0]
	quantity := c.Quantity
	it, err := s.resolveItem(customerID, c.Item, &quantity)
	if err != nil {
		// The pack left the catalog (or its price outgrew the quantity)
		// since the settings were saved: turn automatic top-up off rather
		// than fail the consume that crossed the threshold.
		reason := "the configured item can no longer be bought: " + err.Error()
		s.logger.WarnContext(ctx, "automatic top-up disabled", "customer_id", customerID, "reason", reason)
		if err := s.disableAutoTopUp(ctx, tx, customerID, reason, now); err != nil {
			return err
		}
		return nil
	}
	// Confirmed by its PaymentIntent, which tally creates off-session: no
	// Checkout strategy (confirm_on) applies.
	p := newPayment{id: paymentID, customerID: customerID, item: c.Item, quantity: quantity, it: it, method: MethodAutoTopUp,
		livemode: s.livemode, now: now,
		reason: fmt.Sprintf("automatic top-up: %d credits available, below the threshold of %d", available, c.Threshold)}
	res := tx.WithContext(ctx).Model(&paymentRow{}).Clauses(clause.OnConflict{DoNothing: true}).Create(p.row())
	if res.Error != nil {
		return db.Translate(res.Error, nil)
	}
	if res.RowsAffected == 0 {
		// A pending automatic top-up exists that the settings did not name:
		// name it, so the worker and the webhooks settle the settings.
		return db.Translate(tx.WithContext(ctx).Exec(`UPDATE auto_top_up_settings SET in_flight_payment_id =
			(SELECT id FROM payments WHERE customer_id = ? AND method = 'auto_top_up' AND status = 'pending')
			WHERE customer_id = ?`, customerID, customerID).Error, nil)
	}
	return insertFirstTransition(ctx, tx, p)
}

// disableAutoTopUp turns a customer's automatic top-up off for reason,
// inside tx, with credits.auto_top_up_disabled; settings already off keep
// their first reason, and no event.
func (s *Service) disableAutoTopUp(ctx context.Context, tx *gorm.DB, customerID, reason string, now time.Time) error {
	res := tx.WithContext(ctx).Model(&autoTopUpRow{}).Where("customer_id = ? AND status <> ?", customerID, AutoTopUpDisabled).Updates(map[string]any{
		"status": AutoTopUpDisabled, "disabled_reason": reason, "in_flight_payment_id": nil, "updated_at": now,
	})
	if res.Error != nil || res.RowsAffected == 0 {
		return db.Translate(res.Error, nil)
	}
	return events.Append(ctx, tx, customerID, events.CreditsAutoTopUpDisabled{CustomerID: customerID, Reason: reason})
}

// autoTopUpSucceeded settles the settings after p, an automatic top-up,
// succeeded (inside the confirmation's transaction): nothing in flight, the
// failure count back to 0.
func (s *Service) autoTopUpSucceeded(ctx context.Context, tx *gorm.DB, p Payment) error {
	return db.Translate(tx.WithContext(ctx).Model(&autoTopUpRow{}).
		Where("customer_id = ? AND (in_flight_payment_id = ? OR in_flight_payment_id IS NULL)", p.CustomerID, p.ID).
		Updates(map[string]any{"in_flight_payment_id": nil, "consecutive_failures": 0, "updated_at": s.now()}).Error, nil)
}

// autoTopUpFailed settles the settings after p, an automatic top-up, moved
// to failed (inside that transaction): nothing in flight, one more failure
// in a row, credits.auto_top_up_failed, and past the limit the settings
// disable themselves. A top-up failed because the settings were off by
// then (their owner turned them off, or a refund or dispute did) is no
// failure of the card, and the count stays: it had made an owner's "off"
// read as the last of three failures in a row.
func (s *Service) autoTopUpFailed(ctx context.Context, tx *gorm.DB, p Payment, reason string) error {
	now := s.now()
	var counts []struct{ ConsecutiveFailures int }
	err := tx.WithContext(ctx).Raw(`UPDATE auto_top_up_settings
		SET in_flight_payment_id = NULL, updated_at = ?,
			consecutive_failures = consecutive_failures + CASE WHEN enabled AND status <> ? THEN 1 ELSE 0 END
		WHERE customer_id = ? AND (in_flight_payment_id = ? OR in_flight_payment_id IS NULL)
		RETURNING consecutive_failures`, now, AutoTopUpDisabled, p.CustomerID, p.ID).Scan(&counts).Error
	if err != nil {
		return db.Translate(err, nil)
	}
	n := 0
	if len(counts) > 0 {
		n = counts[0].ConsecutiveFailures
	}
	if err := events.Append(ctx, tx, p.CustomerID, events.CreditsAutoTopUpFailed{
		CustomerID: p.CustomerID, PaymentID: p.ID, Reason: reason, ConsecutiveFailures: n,
	}); err != nil {
		return err
	}
	if n >= s.topUpMaxFailures {
		return s.disableAutoTopUp(ctx, tx, p.CustomerID,
			fmt.Sprintf("%d automatic top-ups failed in a row; the last: %s", n, strings.TrimSpace(reason)), now)
	}
	return nil
}

// checkOffSession is the validation chain of an automatic top-up's
// confirmation: the PaymentIntent must be the one the worker recorded
// (tally created it, off-session, on the saved card), and it must have
// collected the payment's amount in its currency. A success that arrives
// before the worker recorded its PaymentIntent (the worker died between
// Stripe's answer and its commit) waits, not counted against the retry
// budget: the worker's retry records it, under the same idempotency key,
// and then wakes the event (see OnWaitOver).
//
// A top-up the worker failed without a PaymentIntent (turned off, or no
// usable card, when it came back for it) will record none: when Stripe
// says all the same that a PaymentIntent for it (its metadata names the
// payment and its customer) succeeded, an earlier attempt did charge the
// card and its answer was lost. That money arrived for this payment and
// is credited, as a retried card of a failed Checkout is, rather than
// waiting for ever while the card stays charged
// (TestAutoTopUpChargedButLostThenTurnedOffIsStillCredited).
func checkOffSession(p Payment, c confirmation) error {
	if p.PaymentIntentID == "" && p.Status != Failed {
		return waiting(p.ID, c.paymentIntentID, "automatic top-up %s has not recorded its PaymentIntent %s yet", p.ID, c.paymentIntentID)
	}
	if p.PaymentIntentID == "" && c.customerID != p.CustomerID {
		return reject("PaymentIntent %s does not name customer %s of failed automatic top-up %s in its metadata", c.paymentIntentID, p.CustomerID, p.ID)
	}
	if p.PaymentIntentID != "" && p.PaymentIntentID != c.paymentIntentID {
		return reject("PaymentIntent %s is not the one tally created for automatic top-up %s (%s)", c.paymentIntentID, p.ID, p.PaymentIntentID)
	}
	if !strings.EqualFold(c.currency, p.Currency) {
		return reject("currency %q does not match automatic top-up %s (%q)", c.currency, p.ID, p.Currency)
	}
	if c.amountReceived != p.Amount {
		return reject("amount_received %d does not match the amount %d of automatic top-up %s", c.amountReceived, p.Amount, p.ID)
	}
	return nil
}
