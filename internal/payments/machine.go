package payments

import (
	"context"
	"slices"

	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/db"
)

// transitions is the payment state machine, the one table every status
// change goes through. A retried card in the same Checkout Session may
// succeed after a failure; a second decline leaves a failed payment failed;
// a further partial refund keeps a refunded payment refunded. Nothing ever
// leaves succeeded except a refund, so a stale payment_failed can never
// undo a success.
var transitions = map[Status][]Status{
	Pending:   {Succeeded, Failed},
	Failed:    {Succeeded, Failed},
	Succeeded: {Refunded},
	Refunded:  {Refunded},
}

// Allowed reports whether the state machine lets a payment move from one
// status to another.
func Allowed(from, to Status) bool {
	return slices.Contains(transitions[from], to)
}

// EventRef names the Stripe event behind a change, for the transition record.
type EventRef struct {
	ID   string
	Type string
	// Created is Stripe's event creation time (unix seconds).
	Created int64
}

// transition records the move of p to `to` inside tx (p's row locked by the
// caller) and reports whether the state machine allowed it. A refused move
// is recorded with applied=false and changes nothing else; an allowed one is
// recorded and the caller then writes the payment's new columns.
func transition(ctx context.Context, tx *gorm.DB, p Payment, to Status, ev EventRef, reason string) (bool, error) {
	ok := Allowed(p.Status, to)
	err := tx.WithContext(ctx).Exec(`INSERT INTO payment_transitions
		(payment_id, from_status, to_status, applied, stripe_event_id, stripe_event_type, reason)
		VALUES (?, ?, ?, ?, NULLIF(?, ''), NULLIF(?, ''), NULLIF(?, ''))`,
		p.ID, string(p.Status), string(to), ok, ev.ID, ev.Type, reason).Error
	if err != nil {
		return false, db.Translate(err, nil)
	}
	return ok, nil
}
