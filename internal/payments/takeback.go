package payments

import (
	"context"
	"fmt"
	"math/big"

	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/credits"
	"github.com/tallybilling/tally/internal/db"
)

// creditShare is floor(credits × min(amount, paid) / paid): the credits
// that amount of money bought. Computed without overflow (credits reach
// 1e12, amounts too).
func creditShare(credits, amount, paid int64) int64 {
	if paid < 1 || amount <= 0 || credits <= 0 {
		return 0
	}
	share := new(big.Int).Mul(big.NewInt(credits), big.NewInt(min(amount, paid)))
	return share.Quo(share, big.NewInt(paid)).Int64()
}

// refundDue is how many credits a refund of refundedTotal in total still
// has to take back from p: the share of the credits that refundedTotal
// bought, less what earlier refunds took back (or recorded short). Refunds
// and disputes are counted apart, so the order they arrive in does not
// change what each takes; together they never exceed the payment's credits.
func refundDue(ctx context.Context, tx *gorm.DB, p Payment, refundedTotal int64) (int64, error) {
	// An aggregate over the payment's disputes: SQL, and always one row.
	var byDisputes int64
	err := tx.WithContext(ctx).Raw(`SELECT COALESCE(sum(credits_revoked + credits_shortfall), 0)::bigint
		FROM payment_disputes WHERE payment_id = ? AND withdrawn_at IS NOT NULL AND status <> 'won'`, p.ID).Scan(&byDisputes).Error
	if err != nil {
		return 0, db.Translate(err, nil)
	}
	byRefunds := p.CreditsRevoked - byDisputes
	return min(creditShare(p.Credits, refundedTotal, paid(p))-byRefunds, p.Credits-p.CreditsRevoked), nil
}

// disputeDue is how many credits a dispute withdrawing amount takes back
// from p: the share that amount bought, within what is left of p's credits.
func disputeDue(p Payment, amount int64) int64 {
	return min(creditShare(p.Credits, amount, paid(p)), p.Credits-p.CreditsRevoked)
}

// takeBack revokes due credits bought by p, inside tx with p's row locked,
// and counts them as taken back (p.CreditsRevoked). Where they come from
// follows the service's RevokeFrom; what the balance cannot cover is
// recorded as a shortfall and counts as taken back too, so it is never
// asked for twice. Under RevokeFromPurchaseGrant what is not covered is not
// counted, so a later refund of the same payment tries again, as tally
// always did. Only credit packs have credits to take back.
func (s *Service) takeBack(ctx context.Context, tx *gorm.DB, p Payment, due int64, reason string, ev EventRef) (credits.RevokeResult, error) {
	if p.ItemKind != KindCreditPack || due <= 0 {
		return credits.RevokeResult{}, nil
	}
	if p.Method == MethodAutoTopUp {
		// The card's owner took the top-up back: charging the same card
		// again when the revoke leaves the customer below the threshold
		// would repeat it. Off first, so the revoke starts nothing; the
		// customer (or the product) turns it on again.
		if err := s.disableAutoTopUp(ctx, tx, p.CustomerID, takenBackReason(p.ID, reason), s.now()); err != nil {
			return credits.RevokeResult{}, err
		}
	}
	meta := map[string]string{"payment_id": p.ID}
	if ev.ID != "" {
		meta["stripe_event_id"] = ev.ID
	}
	r, err := credits.Revoke(ctx, tx, s.now, credits.RevokeInput{
		CustomerID: p.CustomerID, PaymentID: p.ID, Credits: due, Reason: reason, From: s.revokeFrom, Metadata: meta,
		TopUp: s.StartAutoTopUp,
	})
	if err != nil {
		return credits.RevokeResult{}, err
	}
	if err := updatePayment(ctx, tx, p.ID, map[string]any{"credits_revoked": gorm.Expr("credits_revoked + ?", r.Taken+r.Shortfall)}); err != nil {
		return credits.RevokeResult{}, err
	}
	return r, nil
}

// takenBackReason is why automatic top-up turned itself off after its
// payment was refunded or disputed.
func takenBackReason(paymentID, reason string) string {
	how := "refunded"
	if reason == "dispute" {
		how = "disputed"
	}
	return fmt.Sprintf("automatic top-up %s was %s", paymentID, how)
}
