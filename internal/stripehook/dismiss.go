package stripehook

import (
	"context"
	"errors"
	"strings"
	"unicode/utf8"

	"gorm.io/gorm"
	"gorm.io/gorm/clause"

	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/errs"
	"github.com/tallybilling/tally/internal/events"
	"github.com/tallybilling/tally/internal/text"
)

// Dismiss records an operator's decision that a parked or failed event
// needs nothing more: it becomes dismissed (no longer retried, no longer
// counted as parked), with who decided (by: the admin key's name or hash
// prefix) and why, and a stripe_event.dismissed outbound event, in one
// transaction. An event already dismissed is answered as it is. A dismissed
// event may still be replayed, which processes it again.
//
// Errors: errs.Invalid (empty or oversized reason), errs.NotFound,
// errs.Conflict (the event is not parked or failed), errs.Unavailable.
func (h *Intake) Dismiss(ctx context.Context, id, by, reason string) (Stored, error) {
	reason = strings.TrimSpace(reason)
	if reason == "" || utf8.RuneCountInString(reason) > 1000 || text.Check(reason) != nil {
		return Stored{}, errs.InvalidField("/reason", "reason must be 1 to 1000 characters of printable text")
	}
	err := db.InTx(ctx, h.db, func(tx *gorm.DB) error {
		var r eventRow
		err := tx.WithContext(ctx).Omit("payload").Clauses(clause.Locking{Strength: "UPDATE"}).Where("id = ?", id).Take(&r).Error
		if errors.Is(err, gorm.ErrRecordNotFound) {
			return errEventNotStored(id)
		}
		if err != nil {
			return db.Translate(err, nil)
		}
		switch Status(r.Status) {
		case Dismissed:
			return nil
		case Parked, Failed:
		default:
			return errs.E(errs.Conflict, "Stripe event %s is %s; only a parked or failed event can be dismissed", id, r.Status)
		}
		err = tx.WithContext(ctx).Model(&eventRow{}).Where("id = ?", id).Updates(map[string]any{
			"status": string(Dismissed), "dismissed_by": by, "dismissed_reason": reason, "dismissed_at": h.now(),
			"next_attempt_at": nil,
		}).Error
		if err != nil {
			return db.Translate(err, nil)
		}
		return events.Append(ctx, tx, "", events.StripeEventDismissed{StripeEventID: id, StripeEventType: r.Type, DismissedBy: by, Reason: reason})
	})
	if err != nil {
		return Stored{}, err
	}
	h.logger.InfoContext(ctx, "stripe event dismissed", "event_id", id, "by", by, "reason", reason)
	return h.Get(ctx, id)
}
