package payments

import (
	"context"
	"errors"
	"slices"

	"gorm.io/gorm"
	"gorm.io/gorm/clause"

	"github.com/tallybilling/tally/internal/db"
)

// transitions is the payment state machine, the one table every status
// change goes through. A retried card in the same Checkout Session may
// succeed after a failure; a second decline leaves a failed payment failed;
// a further partial refund keeps a refunded payment refunded. Nothing ever
// leaves succeeded except a refund or a dispute, so a stale payment_failed
// can never undo a success.
//
// A chargeback moves a paid payment to disputed; a dispute first seen
// already lost moves it straight to dispute_lost. A dispute won returns it
// to what it was before (succeeded or refunded); a refund that arrives
// while it is disputed or lost (refunded earlier at Stripe, delivered
// late) keeps that state.
var transitions = map[Status][]Status{
	Pending:     {Succeeded, Failed},
	Failed:      {Succeeded, Failed},
	Succeeded:   {Refunded, Disputed, DisputeLost},
	Refunded:    {Refunded, Disputed, DisputeLost},
	Disputed:    {Disputed, DisputeLost, Succeeded, Refunded},
	DisputeLost: {DisputeLost},
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
	// Source is where the change comes from when it is not a webhook's
	// event: SourceSync for what a sync with Stripe found. Empty means a
	// webhook (with an ID) or the API (without).
	Source string
	// Inline, when set, stores the event in the transaction that applies
	// it (see InlineStore); nil when the event is stored already.
	Inline *InlineStore
}

// The sources of a transition (payment_transitions.source).
const (
	SourceAPI      = "api"
	SourceWebhook  = "webhook"
	SourceSync     = "sync"
	SourceOperator = "operator"
)

// source is where the change ev stands for comes from.
func (ev EventRef) source() string {
	switch {
	case ev.Source != "":
		return ev.Source
	case ev.ID != "":
		return SourceWebhook
	}
	return SourceAPI
}

// errEventApplied says the Stripe event is already in the payment's
// history: a redelivery or a replay, which changes nothing.
var errEventApplied = errors.New("payments: the event was already applied to the payment")

// transition records the move of p to `to` inside tx (p's row locked by the
// caller) and reports whether the state machine allowed it. A refused move
// is recorded with applied=false and changes nothing else; an allowed one is
// recorded and the caller then writes the payment's new columns.
// Errors: errEventApplied (ev is already in p's history), errs.Unavailable.
func transition(ctx context.Context, tx *gorm.DB, p Payment, to Status, ev EventRef, reason string) (bool, error) {
	ok := Allowed(p.Status, to)
	return ok, record(ctx, tx, p, to, ok, ev, reason)
}

// record writes one line of p's history. The unique index on (payment_id,
// stripe_event_id) keeps an event in it once; a second time is
// errEventApplied, so the caller's transaction rolls back to a no-op.
func record(ctx context.Context, tx *gorm.DB, p Payment, to Status, applied bool, ev EventRef, reason string) error {
	// created_at is left to the database's clock.
	res := tx.WithContext(ctx).Model(&transitionRow{}).Clauses(clause.OnConflict{
		Columns:     []clause.Column{{Name: "payment_id"}, {Name: "stripe_event_id"}},
		TargetWhere: clause.Where{Exprs: []clause.Expression{clause.Expr{SQL: "stripe_event_id IS NOT NULL"}}},
		DoNothing:   true,
	}).Create(map[string]any{
		"payment_id": p.ID, "from_status": string(p.Status), "to_status": string(to), "applied": applied,
		"stripe_event_id": db.NullIfEmpty(ev.ID), "stripe_event_type": db.NullIfEmpty(ev.Type), "reason": db.NullIfEmpty(reason),
		"source": ev.source(),
	})
	if res.Error != nil {
		return db.Translate(res.Error, nil)
	}
	if res.RowsAffected == 0 {
		return errEventApplied
	}
	return nil
}

// eventApplied reports whether ev is already in the history of payment id.
func eventApplied(ctx context.Context, tx *gorm.DB, id string, ev EventRef) (bool, error) {
	if ev.ID == "" {
		return false, nil
	}
	var applied bool
	err := tx.WithContext(ctx).Raw(`SELECT EXISTS (SELECT 1 FROM payment_transitions WHERE payment_id = ? AND stripe_event_id = ?)`,
		id, ev.ID).Row().Scan(&applied)
	if err != nil {
		return false, db.Translate(err, nil)
	}
	return applied, nil
}
