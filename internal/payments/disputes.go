package payments

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"gorm.io/gorm"
	"gorm.io/gorm/clause"

	"github.com/tallybilling/tally/internal/credits"
	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/events"
)

// Dispute is a Stripe Dispute (charge.dispute.*): a cardholder contesting
// a charge with their bank.
type Dispute struct {
	ID            string
	Charge        string
	PaymentIntent string
	// Amount is what the dispute is about (minor units of Currency).
	Amount   int64
	Currency string
	Status   string
	Reason   string
	Livemode bool
	Metadata map[string]string
}

// A dispute's stages, in the order Stripe moves through them. An inquiry
// (warning_*) withdraws nothing; from needs_response on, the funds are
// withdrawn; won and lost close it. An event may arrive after a later
// stage was applied: only a further stage changes anything.
var disputeStages = map[string]int{
	"warning_needs_response": 1,
	"warning_under_review":   2,
	"warning_closed":         3,
	"prevented":              3, // closed before any chargeback
	"needs_response":         4,
	"under_review":           5,
	"won":                    6,
	"lost":                   6,
}

const stageWithdrawn = 4

// DisputeChanged applies charge.dispute.created, .updated, .closed,
// .funds_withdrawn and .funds_reinstated, all by the dispute's status in
// the event, so that any order of delivery ends in the same place:
//
//   - an inquiry (warning_*) is recorded in the payment's history, nothing
//     more: no funds were withdrawn;
//   - a chargeback (needs_response, under_review) moves the payment to
//     disputed, adds the amount to amount_disputed and takes back the
//     credits that amount bought, exactly as a refund does (takeBack), and
//     emits payment.disputed;
//   - closed lost: dispute_lost and payment.dispute_lost (first seen lost,
//     the withdrawal is applied in the same step);
//   - closed won: the credits taken back return as dispute_won grants with
//     the expiry of the grants they came from (not those whose expiry has
//     passed meanwhile), the shortfall is settled, the payment returns to
//     succeeded or refunded, and payment.dispute_won is emitted. A dispute
//     first seen won took nothing here, so it only records.
//
// A stage already reached (a redelivery, a late or replayed event) is only
// recorded. A dispute of a payment not succeeded yet is *Waiting (it
// applies once the success arrives).
//
// A charge or dispute of a PaymentIntent nothing linked yet is found by
// asking Stripe for it (chargePayment), and for an invoice's PaymentIntent
// (no tally metadata) which invoice it paid: the dispute of a
// pay-by-invoice payment links that PaymentIntent to it.
// Errors: ErrNotOurs, *Waiting, *stripeapi.Error (Stripe not answering),
// *Rejection (livemode, currency, no or
// another PaymentIntent, a dispute of another payment), errs.Unavailable.
func (s *Service) DisputeChanged(ctx context.Context, ev EventRef, d Dispute) error {
	id, viaInvoice, err := s.chargePayment(ctx, d.Metadata, d.PaymentIntent)
	if err != nil {
		return err
	}
	return s.inEventTx(ctx, ev, id, d.Livemode, d.PaymentIntent, func(tx *gorm.DB, p Payment) error {
		if d.PaymentIntent == "" {
			return reject("dispute %s names no PaymentIntent, so it cannot be matched to payment %s", d.ID, p.ID)
		}
		if !strings.EqualFold(d.Currency, paidCurrency(p)) {
			return reject("dispute %s currency %q does not match payment %s (%q)", d.ID, d.Currency, p.ID, paidCurrency(p))
		}
		if d.Amount < 1 {
			return reject("dispute %s is about %d", d.ID, d.Amount)
		}
		if p.Status == Pending || p.Status == Failed {
			return waitingForSuccess(p, d.PaymentIntent, "dispute "+d.ID)
		}
		if err := s.linkInvoicePaymentIntent(ctx, tx, &p, viaInvoice, d.PaymentIntent); err != nil {
			return err
		}
		if d.PaymentIntent != p.PaymentIntentID {
			return reject("dispute %s belongs to PaymentIntent %s, not to payment %s's (%q)", d.ID, d.PaymentIntent, p.ID, p.PaymentIntentID)
		}
		row, found, err := loadDispute(ctx, tx, d.ID)
		if err != nil {
			return err
		}
		if found && row.PaymentID != p.ID {
			return reject("dispute %s is of payment %s, not %s", d.ID, row.PaymentID, p.ID)
		}
		stage, known := disputeStages[d.Status]
		if !known {
			return record(ctx, tx, p, p.Status, false, ev, fmt.Sprintf("dispute %s has status %q, which tally does not act on", d.ID, d.Status))
		}
		if found && stage <= disputeStages[row.Status] {
			return record(ctx, tx, p, p.Status, false, ev, fmt.Sprintf("dispute %s is %s: already %s, nothing more to do", d.ID, d.Status, row.Status))
		}
		now := s.now()
		if !found {
			row = disputeRow{StripeDisputeID: d.ID, PaymentID: p.ID, Amount: d.Amount}
			if err := tx.WithContext(ctx).Model(&disputeRow{}).Create(map[string]any{
				"stripe_dispute_id": d.ID, "payment_id": p.ID, "charge_id": db.NullIfEmpty(d.Charge), "amount": d.Amount,
				"currency": strings.ToLower(d.Currency), "reason": db.NullIfEmpty(d.Reason), "status": d.Status,
				"created_at": now, "updated_at": now,
			}).Error; err != nil {
				return db.Translate(err, nil)
			}
		}
		changed := map[string]any{"status": d.Status, "updated_at": now}
		if d.Status == "won" || d.Status == "lost" || d.Status == "warning_closed" || d.Status == "prevented" {
			changed["closed_at"] = now
		}
		if err := updateDispute(ctx, tx, d.ID, changed); err != nil {
			return err
		}
		switch {
		case stage < stageWithdrawn:
			return record(ctx, tx, p, p.Status, false, ev, fmt.Sprintf("dispute inquiry %s is %s: recorded, no funds withdrawn", d.ID, d.Status))
		case d.Status == "won":
			return s.disputeWon(ctx, tx, p, row, ev)
		case row.WithdrawnAt == nil:
			return s.disputeWithdrawn(ctx, tx, p, row, d, ev)
		case d.Status == "lost":
			return s.disputeLost(ctx, tx, p, row, ev)
		}
		return record(ctx, tx, p, p.Status, false, ev, fmt.Sprintf("dispute %s is %s", d.ID, d.Status))
	})
}

func loadDispute(ctx context.Context, tx *gorm.DB, id string) (disputeRow, bool, error) {
	var r disputeRow
	err := tx.WithContext(ctx).Clauses(clause.Locking{Strength: "UPDATE"}).Where("stripe_dispute_id = ?", id).Take(&r).Error
	if errors.Is(err, gorm.ErrRecordNotFound) {
		return disputeRow{}, false, nil
	}
	if err != nil {
		return disputeRow{}, false, db.Translate(err, nil)
	}
	return r, true, nil
}

// disputeWithdrawn applies the withdrawal of a dispute's funds (and, for a
// dispute first seen lost, its loss in the same move).
func (s *Service) disputeWithdrawn(ctx context.Context, tx *gorm.DB, p Payment, row disputeRow, d Dispute, ev EventRef) error {
	to := Disputed
	if d.Status == "lost" {
		to = DisputeLost
	}
	ok, err := transition(ctx, tx, p, to, ev, fmt.Sprintf("dispute %s (%s): %d %s withdrawn", d.ID, d.Reason, d.Amount, paidCurrency(p)))
	if err != nil {
		return err
	}
	if !ok {
		return reject("payment %s is %s and cannot become %s", p.ID, p.Status, to)
	}
	back, err := s.takeBack(ctx, tx, p, disputeDue(p, row.Amount), "dispute", ev)
	if err != nil {
		return err
	}
	now := s.now()
	if err := updateDispute(ctx, tx, row.StripeDisputeID, map[string]any{
		"withdrawn_at": now, "credits_revoked": back.Taken, "credits_shortfall": back.Shortfall,
		"revoke_transaction_id": db.NullIfEmpty(back.TransactionID),
	}); err != nil {
		return err
	}
	before := p.StatusBeforeDispute
	if p.Status == Succeeded || p.Status == Refunded {
		before = p.Status
	}
	if err := updatePayment(ctx, tx, p.ID, map[string]any{
		"status": string(to), "amount_disputed": gorm.Expr("amount_disputed + ?", row.Amount),
		"status_before_dispute": string(before), "updated_at": now,
	}); err != nil {
		return err
	}
	err = events.Append(ctx, tx, p.CustomerID, events.PaymentDisputed{
		PaymentID: p.ID, DisputeID: row.StripeDisputeID, AmountDisputed: row.Amount, Currency: paidCurrency(p),
		Reason: d.Reason, CreditsRevoked: back.Taken, CreditsShortfall: back.Shortfall, StripeEventID: ev.ID,
	})
	if err != nil || to != DisputeLost {
		return err
	}
	return appendDisputeLost(ctx, tx, p, row, ev)
}

func (s *Service) disputeLost(ctx context.Context, tx *gorm.DB, p Payment, row disputeRow, ev EventRef) error {
	ok, err := transition(ctx, tx, p, DisputeLost, ev, fmt.Sprintf("dispute %s lost", row.StripeDisputeID))
	if err != nil {
		return err
	}
	if !ok {
		return reject("payment %s is %s and cannot become %s", p.ID, p.Status, DisputeLost)
	}
	if err := updatePayment(ctx, tx, p.ID, map[string]any{"status": string(DisputeLost), "updated_at": s.now()}); err != nil {
		return err
	}
	return appendDisputeLost(ctx, tx, p, row, ev)
}

func appendDisputeLost(ctx context.Context, tx *gorm.DB, p Payment, row disputeRow, ev EventRef) error {
	return events.Append(ctx, tx, p.CustomerID, events.PaymentDisputeLost{
		PaymentID: p.ID, DisputeID: row.StripeDisputeID, AmountDisputed: row.Amount, Currency: paidCurrency(p),
		StripeEventID: ev.ID,
	})
}

// disputeWon gives back what a dispute took and returns the payment to the
// state it had before. A dispute first seen won took nothing: recorded only.
func (s *Service) disputeWon(ctx context.Context, tx *gorm.DB, p Payment, row disputeRow, ev EventRef) error {
	if row.WithdrawnAt == nil {
		return record(ctx, tx, p, p.Status, false, ev,
			fmt.Sprintf("dispute %s closed won before tally saw its funds withdrawn: nothing was taken back, nothing to return", row.StripeDisputeID))
	}
	// Another dispute of the payment still open (or lost) keeps it there.
	var others []string
	if err := tx.WithContext(ctx).Model(&disputeRow{}).
		Where("payment_id = ? AND stripe_dispute_id <> ? AND withdrawn_at IS NOT NULL AND status <> 'won'", p.ID, row.StripeDisputeID).
		Pluck("status", &others).Error; err != nil {
		return db.Translate(err, nil)
	}
	to := p.StatusBeforeDispute
	if to == "" {
		to = Succeeded
		if p.AmountRefunded > 0 {
			to = Refunded
		}
	}
	for _, st := range others {
		if st == "lost" {
			to = DisputeLost
		} else if to != DisputeLost {
			to = Disputed
		}
	}
	ok, err := transition(ctx, tx, p, to, ev, fmt.Sprintf("dispute %s won: %d %s reinstated", row.StripeDisputeID, row.Amount, paidCurrency(p)))
	if err != nil {
		return err
	}
	if !ok {
		return reject("payment %s is %s and cannot become %s", p.ID, p.Status, to)
	}
	var back credits.RestoreResult
	if row.RevokeTransactionID != nil {
		back, err = credits.Restore(ctx, tx, s.now, credits.RestoreInput{
			CustomerID: p.CustomerID, PaymentID: p.ID, RevokeTransactionID: *row.RevokeTransactionID,
			Reason: "dispute won", Metadata: map[string]string{"payment_id": p.ID, "dispute_id": row.StripeDisputeID},
		})
		if err != nil {
			return err
		}
	}
	now := s.now()
	if err := updateDispute(ctx, tx, row.StripeDisputeID, map[string]any{
		"credits_restored": back.Restored, "credits_expired": back.Expired,
	}); err != nil {
		return err
	}
	var before *string
	if to == Disputed || to == DisputeLost {
		b := string(p.StatusBeforeDispute)
		before = &b
	}
	released := row.CreditsRevoked + row.CreditsShortfall
	err = updatePayment(ctx, tx, p.ID, map[string]any{
		"status": string(to), "amount_disputed": gorm.Expr("amount_disputed - ?", row.Amount),
		"credits_revoked": gorm.Expr("credits_revoked - ?", released), "status_before_dispute": before, "updated_at": now,
	})
	if err != nil {
		return err
	}
	p.Status, p.CreditsRevoked = to, p.CreditsRevoked-released
	kept, err := s.refundCatchUp(ctx, tx, p, back.Restored+back.ShortfallSettled, ev)
	if err != nil {
		return err
	}
	return events.Append(ctx, tx, p.CustomerID, events.PaymentDisputeWon{
		PaymentID: p.ID, DisputeID: row.StripeDisputeID, Status: string(to), CreditsRestored: back.Restored,
		CreditsExpired: back.Expired, ShortfallSettled: back.ShortfallSettled,
		CreditsRevokedForRefunds: kept.Taken, CreditsShortfallForRefunds: kept.Shortfall, StripeEventID: ev.ID,
	})
}

// refundCatchUp takes back, once a won dispute has returned what it took
// (given back: credits restored and shortfall settled), what refunds of p
// are still due. A refund made at Stripe before the chargeback may be
// delivered while it is open: the chargeback had taken the credits, so the
// refund found none left to take, and the win must not hand back credits
// whose money was refunded. Taken now, the refund's share ends as it would
// have had the refund been delivered first; credits the dispute took that
// expired before the win (not given back) count as gone with the refund,
// as they would have expired in the customer's hands.
func (s *Service) refundCatchUp(ctx context.Context, tx *gorm.DB, p Payment, givenBack int64, ev EventRef) (credits.RevokeResult, error) {
	if p.AmountRefunded <= 0 || givenBack <= 0 {
		return credits.RevokeResult{}, nil
	}
	due, err := refundDue(ctx, tx, p, p.AmountRefunded)
	if err != nil {
		return credits.RevokeResult{}, err
	}
	return s.takeBack(ctx, tx, p, min(due, givenBack), "refund", ev)
}
