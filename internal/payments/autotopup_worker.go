package payments

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"gorm.io/gorm"
	"gorm.io/gorm/clause"

	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/stripeapi"
)

// DefaultAutoTopUpInterval is how often the worker looks for automatic
// top-ups to charge.
const DefaultAutoTopUpInterval = time.Second

// autoTopUpBatch bounds the top-ups one round charges.
const autoTopUpBatch = 20

// AutoTopUpWorker charges pending automatic top-ups off-session. Every
// replica may run one: each payment is claimed with FOR UPDATE SKIP LOCKED.
type AutoTopUpWorker struct {
	s        *Service
	interval time.Duration
	logger   *slog.Logger
}

// NewAutoTopUpWorker returns the worker over s; interval 0 means
// DefaultAutoTopUpInterval.
func NewAutoTopUpWorker(s *Service, interval time.Duration) *AutoTopUpWorker {
	if interval <= 0 {
		interval = DefaultAutoTopUpInterval
	}
	return &AutoTopUpWorker{s: s, interval: interval, logger: s.logger}
}

// Name identifies the worker in logs.
func (w *AutoTopUpWorker) Name() string { return "auto-top-up" }

// Run charges due top-ups every interval until ctx ends; a failed round is
// logged and retried at the next tick. It returns ctx's error.
func (w *AutoTopUpWorker) Run(ctx context.Context) error {
	t := time.NewTicker(w.interval)
	defer t.Stop()
	for {
		if _, err := w.s.ChargeDueAutoTopUps(ctx); err != nil && ctx.Err() == nil {
			w.logger.Error("automatic top-up round failed", "error", err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
	}
}

// ChargeDueAutoTopUps charges the pending automatic top-ups that have no
// PaymentIntent yet, oldest first, and returns how many it charged or
// failed. Safe to call from many goroutines and replicas at once.
func (s *Service) ChargeDueAutoTopUps(ctx context.Context) (int, error) {
	if s.stripe == nil {
		return 0, nil
	}
	var ids []string
	err := s.db.WithContext(ctx).Model(&paymentRow{}).
		Where("method = ? AND status = ? AND payment_intent_id IS NULL", string(MethodAutoTopUp), string(Pending)).
		Order("created_at").Limit(autoTopUpBatch).Pluck("id", &ids).Error
	if err != nil {
		return 0, db.Translate(err, nil)
	}
	n := 0
	var errs []error
	for _, id := range ids {
		done, err := s.chargeAutoTopUp(ctx, id)
		if err != nil {
			errs = append(errs, fmt.Errorf("automatic top-up %s: %w", id, err))
			continue
		}
		if done {
			n++
		}
	}
	return n, errors.Join(errs...)
}

// chargeAutoTopUp charges one pending automatic top-up, holding its row
// lock while Stripe is called, so that the payment_intent.succeeded
// Stripe sends meanwhile waits for the PaymentIntent to be recorded rather
// than finding the payment without one. The idempotency key is derived
// from the payment ("tally-offsession-<id>"): when the process dies after
// Stripe charged and before the commit, the next attempt gets the same
// PaymentIntent back and records it; the card is charged once.
//
// A refused card fails the payment (and counts a failure of automatic
// top-up); any other error leaves it pending for the next round.
func (s *Service) chargeAutoTopUp(ctx context.Context, id string) (bool, error) {
	done := false
	recorded, failedUnrecorded := "", false
	err := db.InTx(ctx, s.db, func(tx *gorm.DB) error {
		var r paymentRow
		err := tx.WithContext(ctx).Clauses(clause.Locking{Strength: "UPDATE", Options: "SKIP LOCKED"}).
			Where("id = ? AND method = ? AND status = ? AND payment_intent_id IS NULL", id, string(MethodAutoTopUp), string(Pending)).
			Take(&r).Error
		if errors.Is(err, gorm.ErrRecordNotFound) {
			return nil // charged, settled, or claimed by another worker
		}
		if err != nil {
			return db.Translate(err, nil)
		}
		p := r.payment()
		done = true
		// Turned off since it started, by tally (its payment was refunded
		// or disputed: the card's owner took a top-up back) or by the
		// customer (enabled false): the card is not charged, since its
		// owner withdrew consent before any charge was made (a customer's
		// off was once left to charge a top-up Stripe had been too down to
		// charge, whenever Stripe answered again:
		// TestAutoTopUpTurnedOffByTheCustomerStopsAnUnchargedTopUp). The
		// settings are read FOR SHARE and so stay locked while Stripe is
		// called: a refund, dispute or save turning them off waits for a
		// charge already on its way, and a charge never goes out after
		// they were turned off (it did, read without a lock, when the
		// refund committed while the request was in flight:
		// TestAutoTopUpRefundWaitsForTheChargeInFlight). Starting a top-up
		// (StartAutoTopUp) does not wait: its UPDATE matches no row while
		// one is in flight.
		var settings autoTopUpRow
		err = tx.WithContext(ctx).Clauses(clause.Locking{Strength: "SHARE"}).
			Where("customer_id = ?", p.CustomerID).Limit(1).Find(&settings).Error
		if err != nil {
			return db.Translate(err, nil)
		}
		// Failed below without a PaymentIntent: a success Stripe sent for
		// an earlier attempt whose answer was lost may wait for one
		// (failedUnrecorded, below).
		failedUnrecorded = true
		if settings.Status == AutoTopUpDisabled {
			return s.failLocked(ctx, tx, p, EventRef{}, "automatic top-up was turned off before it was charged: "+settings.DisabledReason)
		}
		if !settings.Enabled {
			return s.failLocked(ctx, tx, p, EventRef{}, "automatic top-up was turned off before it was charged: turned off by the customer")
		}
		// The card is read in tx, which keeps its connection until Stripe
		// answers: asked of the pool, it waited for a second connection,
		// and on a small pool the saves of these settings and the
		// take-backs waiting for the share lock, or the jobs that keep a
		// connection for their advisory lock, held every other
		// (TestAutoTopUpSettingsSavesDoNotStarveTheChargeInFlight,
		// TestAutoTopUpChargeWhileSettingsAreSaved,
		// TestAutoTopUpChargeBesideTheLockKeepers).
		card, err := savedPaymentMethod(ctx, tx, p.CustomerID)
		if err == nil && card.Expired(s.now()) {
			err = fmt.Errorf("the saved %s card ending %s expired at the end of %02d/%d", card.Brand, card.Last4, card.ExpMonth, card.ExpYear)
		}
		if err != nil {
			return s.failLocked(ctx, tx, p, EventRef{}, "no usable saved card: "+err.Error())
		}
		failedUnrecorded = false
		pi, err := s.stripe.ChargeOffSession(ctx, stripeapi.OffSessionInput{
			PaymentID: p.ID, TallyCustomerID: p.CustomerID, StripeCustomerID: card.StripeCustomerID,
			PaymentMethodID: card.PaymentMethodID, Amount: p.Amount, Currency: p.Currency,
			Description: fmt.Sprintf("automatic top-up: %d × %s", p.Quantity, p.Item),
		})
		if ce, ok := stripeapi.AsCardError(err); ok {
			if ce.PaymentIntentID != "" {
				if err := s.applyLinks(ctx, tx, p, map[string]string{"payment_intent_id": ce.PaymentIntentID, "stripe_customer_id": card.StripeCustomerID}); err != nil {
					return err
				}
			}
			reason := ce.Code
			if ce.DeclineCode != "" && ce.DeclineCode != ce.Code {
				reason += " (" + ce.DeclineCode + ")"
			}
			if ce.Message != "" {
				reason += ": " + ce.Message
			}
			return s.failLocked(ctx, tx, p, EventRef{}, reason)
		}
		if err != nil {
			done = false
			return err
		}
		recorded = pi.ID
		return s.applyLinks(ctx, tx, p, map[string]string{"payment_intent_id": pi.ID, "stripe_customer_id": card.StripeCustomerID})
	})
	if err == nil && recorded != "" && s.waitOver != nil {
		s.waitOver(ctx, recorded)
	}
	if err == nil && done && failedUnrecorded && s.failedUnrecorded != nil {
		// An earlier attempt may have charged the card and lost Stripe's
		// answer, and Stripe's success for it waits for a PaymentIntent
		// this failure will never record: a failed top-up without one now
		// takes that success (checkOffSession), so it is woken here rather
		// than at its next retry, up to an hour later, while the money sat
		// at Stripe uncredited
		// (TestAttackAutoTopUpSuccessWaitingWhenItsTopUpFailsUnrecorded).
		s.failedUnrecorded(ctx, id)
	}
	return done, err
}

// OnWaitOver sets what runs when something other than a webhook records
// what Stripe events may be waiting for, keyed as Waiting.For: the worker
// recording an automatic top-up's PaymentIntent (a success that overtook
// the record), or a sync confirming a payment (a refund or dispute that
// overtook its success, waiting or parked after its day). The app wakes
// those events, rather than leaving them to their backoff or, parked, to
// an operator. Call it before the workers start.
func (s *Service) OnWaitOver(f func(ctx context.Context, key string)) {
	s.waitOver = f
}

// OnTopUpFailedUnrecorded sets what runs when the worker failed an
// automatic top-up without recording a PaymentIntent (turned off, or no
// usable card, when it came back for it): Stripe events naming that
// payment may wait for the record, and the app wakes them. Call it before
// the workers start.
func (s *Service) OnTopUpFailedUnrecorded(f func(ctx context.Context, paymentID string)) {
	s.failedUnrecorded = f
}
