package credits

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/catalog"
	"github.com/tallybilling/tally/internal/config"
	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/errs"
	"github.com/tallybilling/tally/internal/events"
)

// RevokeInput takes credits back from a customer because the money that
// bought them went back (a refund) or was taken back (a dispute).
type RevokeInput struct {
	CustomerID string
	// PaymentID is the payment whose own grants are drawn first: its
	// purchase grant, then what won disputes of it gave back.
	PaymentID string
	// Credits is how many credits to take back (at least 1).
	Credits int64
	// Reason is the ledger entry's reason ("refund", "dispute").
	Reason   string
	Metadata map[string]string
	// From is config.RevokeFromBalance (the payment's own grants first,
	// then the customer's other grants in draw order, and what they cannot
	// cover is a shortfall) or config.RevokeFromPurchaseGrant (only what is
	// left of the payment's own grants; the rest is neither taken nor
	// recorded).
	From string
	// TopUp starts an automatic top-up when the revoke leaves the customer
	// below its threshold; nil: never (see afterLowering).
	TopUp TopUpFunc
}

// RevokeResult is what a revoke did.
type RevokeResult struct {
	// TransactionID is the revoke ledger entry, "" when nothing was written
	// (RevokeFromPurchaseGrant with nothing left to take).
	TransactionID string
	// Taken is what was taken from the grants in Draws; Shortfall is what
	// they could not cover (always 0 under RevokeFromPurchaseGrant).
	Taken     int64
	Shortfall int64
	Draws     []Draw
	// Balance is the spendable balance afterwards.
	Balance int64
}

// Revoke takes in.Credits back from the customer inside the caller's
// transaction tx (payments calls it with the payment's row locked, in the
// transaction that records the refund or dispute). It never drives the
// balance below zero: what the grants cannot cover is recorded as the
// entry's shortfall and as an open receivable (see Verify), never taken
// from later grants. It writes one revoke ledger entry and credits.revoked,
// and fires credits.low_balance when that crosses the threshold.
//
// Errors: errs.Invalid for bad input; errs.Unavailable.
func Revoke(ctx context.Context, tx *gorm.DB, clock func() time.Time, in RevokeInput) (RevokeResult, error) {
	if in.Credits < 1 || in.Credits > catalog.MaxCreditsPerMove {
		return RevokeResult{}, errs.InvalidField("/credits", fmt.Sprintf("a revoke takes 1 to %d credits", int64(catalog.MaxCreditsPerMove)))
	}
	if in.From != config.RevokeFromBalance && in.From != config.RevokeFromPurchaseGrant {
		return RevokeResult{}, errs.InvalidField("/from", "a revoke takes from balance or purchase_grant")
	}
	if err := validateMove(in.CustomerID, in.Credits, in.Reason, in.Metadata); err != nil {
		return RevokeResult{}, err
	}
	r, err := revoke(ctx, tx, clock, in)
	return r, db.Translate(err, nil)
}

func revoke(ctx context.Context, tx *gorm.DB, clock func() time.Time, in RevokeInput) (RevokeResult, error) {
	a, err := ensureAccount(ctx, tx, in.CustomerID, clock, nil)
	if err != nil {
		return RevokeResult{}, err
	}
	a.topUp = in.TopUp
	now := a.now
	type candidate struct {
		ID        string
		Remaining int64
	}
	// The payment's own grants first (its purchase grant, and what won
	// disputes gave back of it: only those grants name a payment), then
	// (from the balance) the others in the draw order. lockAccount expired
	// what was due. Credits active holds keep are not taken: the hold's
	// capture may still spend them, so what they would have covered is
	// part of the shortfall. Grants not effective yet are owned, and taken.
	var grants []candidate
	err = tx.WithContext(ctx).Raw(`
		WITH p AS NOT MATERIALIZED (SELECT ?::text AS payment, ?::text AS customer, ?::timestamptz AS now, ?::text AS take_from)
		SELECT g.id, g.remaining - g.held AS remaining
		FROM credit_grants g, p
		WHERE g.customer_id = p.customer AND g.remaining > 0 AND g.remaining > g.held AND (g.expires_at IS NULL OR g.expires_at > p.now)
		  AND (p.take_from = 'balance' OR g.payment_id = p.payment)
		ORDER BY (g.payment_id IS NOT DISTINCT FROM p.payment) DESC, g.source <> 'purchase', g.priority, g.expires_at NULLS LAST, g.created_at, g.id
		FOR UPDATE OF g`, in.PaymentID, in.CustomerID, now, in.From).Scan(&grants).Error
	if err != nil {
		return RevokeResult{}, err
	}
	res := RevokeResult{Draws: []Draw{}}
	for _, g := range grants {
		if res.Taken == in.Credits {
			break
		}
		take := min(g.Remaining, in.Credits-res.Taken)
		if err := tx.WithContext(ctx).Model(&grantRow{}).Where("id = ?", g.ID).Updates(map[string]any{
			"remaining": gorm.Expr("remaining - ?", take), "revoked": gorm.Expr("revoked + ?", take),
		}).Error; err != nil {
			return RevokeResult{}, err
		}
		res.Taken += take
		res.Draws = append(res.Draws, Draw{GrantID: g.ID, Amount: take})
	}
	if in.From == config.RevokeFromBalance {
		res.Shortfall = in.Credits - res.Taken
	}
	if res.Taken == 0 && res.Shortfall == 0 {
		res.Balance = a.balance
		// ensureAccount may have expired credits (which fired their
		// notices); a top-up may still be due.
		return res, a.afterLowering(ctx, tx, false)
	}
	a.balance -= res.Taken
	res.Balance = a.balance
	fire := a.lowBalance(true)
	if err := a.save(ctx, tx); err != nil {
		return RevokeResult{}, err
	}
	// The entry is about the purchase grant (when the payment has one),
	// whichever grants it drew from.
	var ids []string
	if err := tx.WithContext(ctx).Model(&grantRow{}).Where("source = ? AND payment_id = ?", SourcePurchase, in.PaymentID).
		Pluck("id", &ids).Error; err != nil {
		return RevokeResult{}, err
	}
	var purchaseGrant *string
	if len(ids) > 0 {
		purchaseGrant = &ids[0]
	}
	res.TransactionID = db.NewID("ctx")
	if err := insertEntry(ctx, tx, entryRow{
		ID: res.TransactionID, CustomerID: in.CustomerID, Kind: KindRevoke, Amount: -res.Taken, BalanceAfter: a.balance,
		Reason: in.Reason, Metadata: in.Metadata, GrantID: purchaseGrant, PaymentID: db.NullIfEmpty(in.PaymentID),
		Draws: res.Draws, Shortfall: res.Shortfall, CreatedAt: now,
	}); err != nil {
		return RevokeResult{}, err
	}
	if res.Shortfall > 0 {
		if err := tx.WithContext(ctx).Create(&shortfallRow{
			LedgerEntryID: res.TransactionID, CustomerID: in.CustomerID, PaymentID: db.NullIfEmpty(in.PaymentID),
			Amount: res.Shortfall, CreatedAt: now,
		}).Error; err != nil {
			return RevokeResult{}, err
		}
		// What active holds keep is part of the shortfall until they end.
		if err := a.claimHeld(ctx, tx, res.TransactionID, res.Shortfall); err != nil {
			return RevokeResult{}, err
		}
	}
	revoked := events.CreditsRevoked{
		CustomerID: in.CustomerID, PaymentID: in.PaymentID, TransactionID: res.TransactionID,
		Amount: res.Taken, Shortfall: res.Shortfall, Draws: make([]events.Draw, 0, len(res.Draws)), Balance: a.balance, Reason: in.Reason,
	}
	for _, d := range res.Draws {
		revoked.Draws = append(revoked.Draws, events.Draw{GrantID: d.GrantID, Amount: d.Amount})
	}
	if purchaseGrant != nil {
		revoked.GrantID = *purchaseGrant
	}
	if err := events.Append(ctx, tx, in.CustomerID, revoked); err != nil {
		return RevokeResult{}, err
	}
	return res, a.afterLowering(ctx, tx, fire)
}

// entryDraws decodes a ledger entry's draws.
func entryDraws(e ledgerRow) ([]Draw, error) {
	var draws []Draw
	if e.Draws == nil {
		return nil, nil
	}
	if err := json.Unmarshal([]byte(*e.Draws), &draws); err != nil {
		return nil, fmt.Errorf("credits: draws of entry %s: %w", e.ID, err)
	}
	return draws, nil
}

// drawsJSON is the draws column of an entry: nil (SQL NULL) when none.
func drawsJSON(draws []Draw) (*string, error) {
	if draws == nil {
		return nil, nil
	}
	b, err := json.Marshal(draws)
	if err != nil {
		return nil, fmt.Errorf("credits: draws: %w", err)
	}
	s := string(b)
	return &s, nil
}

// RestoreInput gives back what one revoke took, because the money came back
// after all (a dispute won).
type RestoreInput struct {
	CustomerID string
	// PaymentID is the payment the revoke was for; the new grants name it.
	PaymentID string
	// RevokeTransactionID is the revoke ledger entry to give back.
	RevokeTransactionID string
	// Reason is the new grants' reason and the shortfall's settlement.
	Reason   string
	Metadata map[string]string
}

// RestoreResult is what a restore did.
type RestoreResult struct {
	// Restored is what came back as SourceDisputeWon grants (Grants);
	// Expired what did not, because the grant it was taken from has expired
	// since: those credits would have expired anyway, and nothing comes
	// back already expired.
	Restored int64
	Expired  int64
	Grants   []GrantResult
	// ShortfallSettled is the revoke's shortfall, no longer owed.
	ShortfallSettled int64
}

// Restore reverses a revoke inside the caller's transaction tx: each grant
// the revoke drew from gets its credits back as a new SourceDisputeWon grant
// with that grant's expiry (unless that expiry has passed), and the
// revoke's open shortfall is settled. Each restored grant has its grant
// entry and credits.granted, like any grant.
//
// Errors: errs.NotFound (no such revoke of that customer and payment),
// errs.Invalid, errs.Unavailable.
func Restore(ctx context.Context, tx *gorm.DB, clock func() time.Time, in RestoreInput) (RestoreResult, error) {
	if err := validateReason(in.Reason); err != nil {
		return RestoreResult{}, err
	}
	if err := validateMetadata(in.Metadata); err != nil {
		return RestoreResult{}, err
	}
	r, err := restore(ctx, tx, clock, in)
	return r, db.Translate(err, grantConstraints)
}

func restore(ctx context.Context, tx *gorm.DB, clock func() time.Time, in RestoreInput) (RestoreResult, error) {
	a, err := ensureAccount(ctx, tx, in.CustomerID, clock, nil)
	if err != nil {
		return RestoreResult{}, err
	}
	var entry ledgerRow
	err = tx.WithContext(ctx).Where("id = ? AND customer_id = ? AND payment_id = ? AND kind = ?",
		in.RevokeTransactionID, in.CustomerID, in.PaymentID, KindRevoke).Take(&entry).Error
	if errors.Is(err, gorm.ErrRecordNotFound) {
		return RestoreResult{}, errs.E(errs.NotFound, "no revoke %s of payment %s for customer %s", in.RevokeTransactionID, in.PaymentID, in.CustomerID)
	}
	if err != nil {
		return RestoreResult{}, err
	}
	draws, err := entryDraws(entry)
	if err != nil {
		return RestoreResult{}, err
	}
	// Holds' claims of the revoke's shortfall end unpaid; what holds paid
	// already is given back with what the revoke took.
	paid, err := endClaims(ctx, tx, a.now, entry.ID)
	if err != nil {
		return RestoreResult{}, err
	}
	for _, id := range paid {
		var recovery ledgerRow
		if err := tx.WithContext(ctx).Where("id = ?", id).Take(&recovery).Error; err != nil {
			return RestoreResult{}, fmt.Errorf("credits: revoke %s paying for %s: %w", id, entry.ID, err)
		}
		more, err := entryDraws(recovery)
		if err != nil {
			return RestoreResult{}, err
		}
		draws = append(draws, more...)
	}
	var res RestoreResult
	for _, d := range draws {
		var drawn grantRow
		if err := tx.WithContext(ctx).Where("id = ?", d.GrantID).Take(&drawn).Error; err != nil {
			return RestoreResult{}, fmt.Errorf("credits: grant %s that revoke %s drew from: %w", d.GrantID, in.RevokeTransactionID, err)
		}
		expiresAt := drawn.ExpiresAt
		if expiresAt != nil && !expiresAt.After(a.now) {
			res.Expired += d.Amount
			continue
		}
		meta := map[string]string{"restores_grant_id": d.GrantID, "revoke_transaction_id": in.RevokeTransactionID}
		for k, v := range in.Metadata {
			meta[k] = v
		}
		gi := GrantInput{
			CustomerID: in.CustomerID, Amount: d.Amount, Reason: in.Reason, Source: SourceDisputeWon,
			PaymentID: in.PaymentID, ExpiresAt: expiresAt, Metadata: meta,
		}
		if err := gi.Validate(); err != nil {
			return RestoreResult{}, err
		}
		g, err := grantTx(ctx, tx, clock, gi, KindGrant, nil, "", nil)
		if err != nil {
			return RestoreResult{}, err
		}
		res.Restored += d.Amount
		res.Grants = append(res.Grants, g)
	}
	// Settles and sums in one statement: what was open, and only that.
	err = tx.WithContext(ctx).Raw(`WITH s AS (
			UPDATE credit_shortfalls SET settled_at = ?, settled_reason = ?
			WHERE ledger_entry_id = ? AND settled_at IS NULL RETURNING amount - recovered AS owed)
		SELECT COALESCE(sum(owed), 0)::bigint FROM s`, a.now, in.Reason, in.RevokeTransactionID).Scan(&res.ShortfallSettled).Error
	if err != nil {
		return RestoreResult{}, err
	}
	return res, nil
}
