package metering

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"time"

	"gorm.io/gorm"
	"gorm.io/gorm/clause"

	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/errs"
	"github.com/tallybilling/tally/internal/stripeapi"
	"github.com/tallybilling/tally/internal/text"
)

// Cancelling usage events. An event that cannot have reached Stripe is
// cancelled at once. One that may have (delivered, being sent right now,
// or after a send whose answer was lost) becomes cancel_pending: the worker
// sends Stripe a meter event adjustment of type cancel under the idempotency
// key tally-cancel-<identifier>, with retries, and marks it cancelled once
// Stripe took it. Stripe cancels events only within 24 hours of receiving
// them; tally allows CancelWindow after delivered_at, which is after Stripe
// received it, leaving a margin for the adjustment's own retries.

// CancelWindow is how long after an event was delivered it may still be
// cancelled at Stripe.
const CancelWindow = 23 * time.Hour

// Cancel cancels the usage event identifier as the package comment says
// and returns it as it is afterwards. Cancelling a cancel_pending or
// cancelled event again changes nothing.
//
// Errors: errs.NotFound, errs.Conflict (delivered longer than CancelWindow
// ago: Stripe no longer cancels it), errs.Unavailable.
func (s *Service) Cancel(ctx context.Context, identifier string) (UsageEvent, error) {
	now := s.now()
	var out eventRow
	err := db.InTx(ctx, s.db, func(tx *gorm.DB) error {
		var r struct {
			Status      string
			DeliveredAt *time.Time
			MaybeSentAt *time.Time
			ClaimedBy   *string
		}
		err := tx.WithContext(ctx).Model(&eventRow{}).Select("status, delivered_at, maybe_sent_at, claimed_by").
			Clauses(clause.Locking{Strength: "UPDATE"}).Where("identifier = ?", identifier).Take(&r).Error
		if errors.Is(err, gorm.ErrRecordNotFound) {
			return errs.E(errs.NotFound, "usage event %q not found", identifier)
		}
		if err != nil {
			return err
		}
		next := StatusCancelled
		switch Status(r.Status) {
		case StatusCancelled, StatusCancelPending:
			return tx.WithContext(ctx).Where("identifier = ?", identifier).Take(&out).Error
		case StatusDelivered:
			if r.DeliveredAt != nil && now.Sub(*r.DeliveredAt) > CancelWindow {
				return errs.E(errs.Conflict, "usage event %q was delivered to Stripe at %s, more than %s ago; Stripe cancels meter events only "+
					"within 24 hours of receiving them, so it stays billed (correct it on the invoice instead)",
					identifier, r.DeliveredAt.UTC().Format(time.RFC3339), CancelWindow)
			}
			next = StatusCancelPending
		case StatusPending, StatusDead:
			// Claimed (maybe being sent right now), or sent before
			// without an answer: Stripe may have it.
			if r.ClaimedBy != nil || r.MaybeSentAt != nil {
				next = StatusCancelPending
			}
		}
		updates := map[string]any{"status": string(next), "cancelled_at": now, "updated_at": now, "next_attempt_at": now,
			"dead_code": nil, "last_error": nil}
		if next == StatusCancelled {
			updates["claimed_by"], updates["lease_until"] = nil, nil
		}
		if err := tx.WithContext(ctx).Model(&eventRow{}).Where("identifier = ?", identifier).Updates(updates).Error; err != nil {
			return err
		}
		return tx.WithContext(ctx).Where("identifier = ?", identifier).Take(&out).Error
	})
	if err != nil {
		return UsageEvent{}, db.Translate(err, nil)
	}
	return out.usageEvent(), nil
}

// cancelLimit is how many cancel_pending events one round adjusts at most.
const cancelLimit = 100

type cancelClaim struct {
	Identifier      string
	StripeEventName string
	Attempts        int
}

// sendCancels claims the due cancel_pending events that no send holds and
// sends each its adjustment, inside the rate limit. It returns how many it
// claimed.
func (w *Worker) sendCancels(ctx context.Context) (int, error) {
	now := w.now()
	c := &claim{token: fmt.Sprintf("%s#c%d", w.opts.Name, w.seq.Add(1)), leaseEnd: now.Add(w.lease())}
	var rows []cancelClaim
	err := w.db.WithContext(ctx).Raw(`
		WITH due AS MATERIALIZED (
			SELECT identifier FROM usage_events
			WHERE status = 'cancel_pending' AND next_attempt_at <= ? AND (claimed_by IS NULL OR lease_until < ?)
			ORDER BY next_attempt_at
			LIMIT ?
			FOR UPDATE SKIP LOCKED
		)
		UPDATE usage_events u SET claimed_by = ?, lease_until = ?, updated_at = ?
		FROM due WHERE u.identifier = due.identifier
		RETURNING u.identifier, u.stripe_event_name, u.attempts`, now, now, cancelLimit, c.token, c.leaseEnd, now).Scan(&rows).Error
	if err != nil || len(rows) == 0 {
		return 0, db.Translate(err, nil)
	}
	for i, r := range rows {
		if ok, retryAt := w.acquire(ctx, c); !ok {
			for _, left := range rows[i:] {
				w.settleCancel(ctx, c, left, retryAt, "", false)
			}
			break
		}
		sctx, cancel := withTimeout(ctx, w.cfg.SendTimeout)
		err := w.client.CancelMeterEvent(sctx, r.StripeEventName, r.Identifier)
		cancel()
		if err == nil {
			w.settleCancel(ctx, c, r, time.Time{}, "", true)
			w.m.cancels.WithLabelValues("cancelled").Inc()
			continue
		}
		msg := text.Truncate(err.Error(), 1000)
		retryAt := w.now().Add(w.backoff(r.Attempts + 1))
		se, isStripe := stripeapi.AsError(err)
		switch {
		case isStripe && se.Kind == stripeapi.KindRateLimited:
			retryAt = w.pause(max(se.RetryAfter, w.opts.RateLimitPause))
			w.m.cancels.WithLabelValues("rate_limited").Inc()
		case isStripe && !se.Retryable():
			// Refused (Stripe's window passed, say): an operator's to look
			// at; tried again rarely, in case the refusal was passing.
			retryAt = w.now().Add(w.cfg.BackoffMax)
			w.log.Error("Stripe refused a meter event adjustment; the event stays cancel_pending", "identifier", r.Identifier, "error", err)
			w.m.cancels.WithLabelValues("refused").Inc()
		default:
			w.m.cancels.WithLabelValues("retry").Inc()
		}
		w.settleCancel(ctx, c, r, retryAt, msg, false)
	}
	return len(rows), nil
}

// backoff is the jittered delay before attempt n+1 (full jitter, capped).
func (w *Worker) backoff(n int) time.Duration {
	d := w.cfg.BackoffBase << min(max(n-1, 0), 30)
	if d <= 0 || d > w.cfg.BackoffMax {
		d = w.cfg.BackoffMax
	}
	return time.Duration(float64(d) * jitter())
}

// settleCancel records one adjustment's outcome: cancelled when done, else
// due again at retryAt with msg as the last error.
func (w *Worker) settleCancel(ctx context.Context, c *claim, r cancelClaim, retryAt time.Time, msg string, done bool) {
	rctx, cancel := withTimeout(ctx, recordTimeout)
	defer cancel()
	q := w.db.WithContext(rctx).Model(&eventRow{}).Where("identifier = ? AND status = 'cancel_pending' AND claimed_by = ?", r.Identifier, c.token)
	now := w.now()
	var err error
	if done {
		err = q.Updates(map[string]any{"status": string(StatusCancelled), "claimed_by": nil, "lease_until": nil,
			"last_error": nil, "attempts": gorm.Expr("attempts + 1"), "updated_at": now}).Error
	} else {
		attempts := gorm.Expr("attempts")
		if msg != "" {
			attempts = gorm.Expr("attempts + 1")
		}
		err = q.Updates(map[string]any{"claimed_by": nil, "lease_until": nil, "next_attempt_at": retryAt, "attempts": attempts,
			"last_error": gorm.Expr("COALESCE(NULLIF(?, ''), last_error)", msg), "updated_at": now}).Error
	}
	if err != nil {
		w.log.Error("record a meter event adjustment's outcome; the lease runs out and it is sent again", "identifier", r.Identifier, "error", err)
	}
}

// clearCancelClaims hands back the claims on events of evs that were
// cancelled while this worker was sending them (now cancel_pending), so
// their adjustment goes without waiting for the lease to end. sent records
// that Stripe took them (delivered_at).
func (w *Worker) clearCancelClaims(ctx context.Context, evs []claimedEvent, sent bool) {
	if len(evs) == 0 {
		return
	}
	rctx, cancel := withTimeout(ctx, recordTimeout)
	defer cancel()
	now := w.now()
	updates := map[string]any{"claimed_by": nil, "lease_until": nil, "next_attempt_at": now, "updated_at": now}
	if sent {
		updates["delivered_at"] = gorm.Expr("COALESCE(delivered_at, ?::timestamptz)", now)
	}
	err := w.db.WithContext(rctx).Model(&eventRow{}).
		Where("identifier IN (SELECT jsonb_array_elements_text(?::jsonb)) AND status = 'cancel_pending' AND claimed_by IS NOT NULL", identifiersJSON(evs)).
		Updates(updates).Error
	if err != nil {
		w.log.Warn("hand back cancelled events' claims; their leases run out instead", "error", err)
	}
}

// jitter is a uniform factor in [0, 1) for full-jitter backoff.
func jitter() float64 { return rand.Float64() }
