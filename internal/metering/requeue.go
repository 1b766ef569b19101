package metering

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"time"

	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/errs"
)

// RequeueInput names the dead events to send again: some by identifier, or
// all of them; exactly one of the two. Force also requeues events that may
// already be at Stripe for longer than it dedupes identifiers (see Requeue).
type RequeueInput struct {
	Identifiers []string
	AllDead     bool
	Force       bool
}

// RequeueSkip says why Requeue left an event as it was.
type RequeueSkip string

// Why an event was not requeued (openapi.yaml RequeueSkipCode).
const (
	// SkipNotDead: no such event, or it is not dead.
	SkipNotDead RequeueSkip = "not_dead"
	// SkipTooOld: its timestamp is outside the window Stripe accepts
	// (DeliveryWindow); Stripe would refuse it, force or not.
	SkipTooOld RequeueSkip = "too_old"
	// SkipForceRequired: a send may have reached Stripe more than
	// RequeueWindow ago; a resend could be counted twice.
	SkipForceRequired RequeueSkip = "force_required"
)

// RequeueItem is the outcome for one identifier.
type RequeueItem struct {
	Identifier string
	Requeued   bool
	// Skip and Detail say why an event was not requeued.
	Skip   RequeueSkip
	Detail string
}

// RequeueResult answers a requeue. With identifiers, Results has one item
// per identifier given, in order; with AllDead, only the dead events left
// dead, at most MaxBatch of them in identifier order (Skipped counts all).
type RequeueResult struct {
	Requeued int64
	Skipped  int64
	Results  []RequeueItem
}

// RequeueWindow is how long after a send that may have reached Stripe an
// event may still be requeued without force. Stripe dedupes meter event
// identifiers only over about 24 hours: a dead event whose timed-out send
// did reach Stripe, sent again later than that, would be counted twice.
const RequeueWindow = 24 * time.Hour

// Requeue moves dead events back to pending (or to waiting_customer if the
// customer has no Stripe customer) with their attempts reset, due now.
//
// Any dead event whose timestamp is still inside Stripe's window
// (DeliveryWindow) can be requeued, whatever it died of. Two kinds are left
// dead and reported per identifier: those outside the window (SkipTooOld:
// Stripe would refuse them), and, unless Force, those a send of which may
// have reached Stripe (a timeout, a network failure or a 5xx) more than
// RequeueWindow ago (SkipForceRequired): Stripe may hold them and no longer
// dedupe their identifier. Whether it does is for an operator to check
// (reconciliation shows the drift) before forcing. Events that are not dead
// are left alone (SkipNotDead).
//
// Errors: errs.Invalid unless exactly one of Identifiers and AllDead is
// given, errs.Unavailable.
func (s *Service) Requeue(ctx context.Context, in RequeueInput) (RequeueResult, error) {
	if (len(in.Identifiers) > 0) == in.AllDead {
		return RequeueResult{}, errs.E(errs.Invalid, "give either identifiers or all_dead: true, not both and not neither")
	}
	if len(in.Identifiers) > MaxBatch {
		return RequeueResult{}, errs.InvalidField("/identifiers", fmt.Sprintf("at most %d identifiers at once", MaxBatch))
	}
	for _, id := range in.Identifiers {
		if id == "" || strings.ContainsRune(id, 0) {
			return RequeueResult{}, errs.InvalidField("/identifiers", "identifiers must be non-empty text")
		}
	}
	ids, _ := json.Marshal(in.Identifiers)
	now := s.now()
	tooOld := now.Add(-DeliveryWindow)
	forceCut := now.Add(-RequeueWindow)
	var requeued []string
	var left []leftDead
	var skippedTotal int64
	err := db.InTx(ctx, s.db, func(tx *gorm.DB) error {
		requeued, left, skippedTotal = nil, nil, 0
		err := tx.Raw(`
			UPDATE usage_events u SET
				status = CASE WHEN c.stripe_customer_id IS NULL THEN 'waiting_customer' ELSE 'pending' END,
				attempts = 0, dead_code = NULL, next_attempt_at = ?, last_error = NULL,
				lease_until = NULL, claimed_by = NULL, updated_at = ?
			FROM customers c
			WHERE c.id = u.customer_id AND u.status = 'dead' AND u.occurred_at > ?
			  AND (? OR u.maybe_sent_at IS NULL OR u.maybe_sent_at >= ?)
			  AND (? OR u.identifier IN (SELECT jsonb_array_elements_text(?::jsonb)))
			RETURNING u.identifier`,
			now, now, tooOld, in.Force, forceCut, in.AllDead, string(ids)).Scan(&requeued).Error
		if err != nil {
			return err
		}
		if in.AllDead {
			dead := func() *gorm.DB { return tx.Model(&eventRow{}).Where("status = ?", string(StatusDead)) }
			if err := dead().Count(&skippedTotal).Error; err != nil {
				return err
			}
			return dead().Order("identifier").Limit(MaxBatch).Find(&left).Error
		}
		return tx.Raw(`SELECT identifier, customer_id, status, occurred_at, maybe_sent_at FROM usage_events
			WHERE identifier IN (SELECT jsonb_array_elements_text(?::jsonb))`, string(ids)).Scan(&left).Error
	})
	if err != nil {
		return RequeueResult{}, db.Translate(err, nil)
	}

	out := RequeueResult{Requeued: int64(len(requeued)), Skipped: skippedTotal}
	isRequeued := make(map[string]bool, len(requeued))
	for _, id := range requeued {
		isRequeued[id] = true
	}
	byID := make(map[string]leftDead, len(left))
	for _, r := range left {
		byID[r.Identifier] = r
	}
	explain := func(id string) RequeueItem {
		if isRequeued[id] {
			return RequeueItem{Identifier: id, Requeued: true}
		}
		r, ok := byID[id]
		switch {
		case !ok:
			return RequeueItem{Identifier: id, Skip: SkipNotDead, Detail: "no usage event has this identifier"}
		case r.Status != string(StatusDead):
			return RequeueItem{Identifier: id, Skip: SkipNotDead, Detail: fmt.Sprintf("the event is %s, not dead", r.Status)}
		case !r.OccurredAt.After(tooOld):
			return RequeueItem{Identifier: id, Skip: SkipTooOld, Detail: fmt.Sprintf(
				"its timestamp %s is outside what Stripe accepts (35 days, less the %s tally keeps to deliver it); it can no longer be sent",
				r.OccurredAt.UTC().Format(time.RFC3339), DeliveryMargin)}
		case r.MaybeSentAt == nil || in.Force:
			// Dead-lettered between this requeue's two statements.
			return RequeueItem{Identifier: id, Skip: SkipNotDead, Detail: "the event was dead-lettered while this requeue ran; requeue it again"}
		default:
			s.log.Warn("dead usage event not requeued: a send may have reached Stripe over 24 hours ago, a resend could be counted twice",
				"identifier", r.Identifier, "customer_id", r.CustomerID, "maybe_sent_at", r.MaybeSentAt)
			return RequeueItem{Identifier: id, Skip: SkipForceRequired, Detail: fmt.Sprintf(
				"a send at %s may have reached Stripe (a timeout or a 5xx), more than 24 hours ago, and Stripe dedupes identifiers "+
					"only over about 24 hours, so a resend could be counted twice; check Stripe first (reconciliation) and requeue with force: true "+
					"if it does not have the event", r.MaybeSentAt.UTC().Format(time.RFC3339))}
		}
	}
	if in.AllDead {
		for _, r := range left {
			out.Results = append(out.Results, explain(r.Identifier))
		}
		return out, nil
	}
	for _, id := range in.Identifiers {
		item := explain(id)
		if !item.Requeued {
			out.Skipped++
		}
		out.Results = append(out.Results, item)
	}
	return out, nil
}

// leftDead is an event a requeue looked at and did not move.
type leftDead struct {
	Identifier  string
	CustomerID  string
	Status      string
	OccurredAt  time.Time
	MaybeSentAt *time.Time
}
