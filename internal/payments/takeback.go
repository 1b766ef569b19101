package payments

import (
	"context"
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

// takeBack revokes, inside tx with p's row locked, the credits bought by p
// that the money now gone back (amountBack: refunded plus disputed, in
// total) no longer pays for, less what earlier refunds and disputes already
// took back (p.CreditsRevoked). It is cumulative, so a repeated or older
// event takes nothing more. Where the credits are taken from follows the
// service's RevokeFrom; what the balance cannot cover is recorded as a
// shortfall and counts as taken back, so it is never asked for twice.
// Under RevokeFromPurchaseGrant what is not covered is not counted either,
// so a later refund of the same payment tries again, as tally always did.
// Only credit packs have credits to take back.
func (s *Service) takeBack(ctx context.Context, tx *gorm.DB, p Payment, amountBack int64, reason string, ev EventRef) (credits.RevokeResult, error) {
	due := creditShare(p.Credits, amountBack, paid(p)) - p.CreditsRevoked
	if p.ItemKind != KindCreditPack || due <= 0 {
		return credits.RevokeResult{}, nil
	}
	meta := map[string]string{"payment_id": p.ID}
	if ev.ID != "" {
		meta["stripe_event_id"] = ev.ID
	}
	r, err := credits.Revoke(ctx, tx, s.now, credits.RevokeInput{
		CustomerID: p.CustomerID, PaymentID: p.ID, Credits: due, Reason: reason, From: s.revokeFrom, Metadata: meta,
	})
	if err != nil {
		return credits.RevokeResult{}, err
	}
	if err := tx.WithContext(ctx).Exec(`UPDATE payments SET credits_revoked = credits_revoked + ? WHERE id = ?`,
		r.Taken+r.Shortfall, p.ID).Error; err != nil {
		return credits.RevokeResult{}, db.Translate(err, nil)
	}
	return r, nil
}
