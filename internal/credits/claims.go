package credits

import (
	"context"
	"fmt"
	"sort"
	"time"

	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/events"
)

// A revoke cannot take credits that active holds keep: a capture may still
// spend them. So it records them short, like spent credits, and claims
// them from the holds open at that moment. A hold pays its claims, oldest
// first, with what it gives back when it ends (a release, an expiry, the
// part a capture does not spend) before those credits are spendable again:
// a hold defers a refund's revoke, it never cancels it. What a capture
// spends stays owed, like credits spent before the refund. Credits granted
// after the revoke never pay it (no hold open at the revoke keeps them).
//
// The tables: credit_hold_claims (one row per hold and shortfall),
// credit_holds.claimed (the sum of a hold's open claims, read with the hold
// so that ending a hold without claims costs nothing more) and
// credit_shortfalls.recovered (what holds paid of it).

// claim is one open claim of a shortfall on a hold.
type claim struct {
	LedgerEntryID string
	Amount        int64
	CreatedAt     time.Time
}

// claimHeld claims up to shortfall credits of revoke entry entryID from the
// account's active holds, oldest first: what each keeps of grants that are
// neither expired nor voided (those credits would not come back), less what
// earlier claims have on it.
func (a *account) claimHeld(ctx context.Context, tx *gorm.DB, entryID string, shortfall int64) error {
	if a.held == 0 || shortfall == 0 {
		return nil
	}
	var holds []struct {
		ID   string
		Free int64
	}
	err := tx.WithContext(ctx).Raw(`
		SELECT h.id, LEAST(h.amount, sum((d.value->>'amount')::bigint)) - h.claimed AS free
		FROM credit_holds h
		CROSS JOIN LATERAL jsonb_array_elements(h.draws) d
		JOIN credit_grants g ON g.id = d.value->>'grant_id'
		WHERE h.customer_id = ? AND h.status = 'active'
		  AND g.voided_at IS NULL AND (g.expires_at IS NULL OR g.expires_at > ?)
		GROUP BY h.id
		HAVING LEAST(h.amount, sum((d.value->>'amount')::bigint)) > h.claimed
		ORDER BY h.created_at, h.id`, a.customerID, a.now).Scan(&holds).Error
	if err != nil {
		return err
	}
	left := shortfall
	for _, h := range holds {
		if left == 0 {
			break
		}
		n := min(h.Free, left)
		left -= n
		if err := tx.WithContext(ctx).Exec(`INSERT INTO credit_hold_claims (hold_id, ledger_entry_id, customer_id, amount, created_at)
			VALUES (?, ?, ?, ?, ?)`, h.ID, entryID, a.customerID, n, a.now).Error; err != nil {
			return err
		}
		if err := tx.WithContext(ctx).Model(&holdRow{}).Where("id = ?", h.ID).
			Update("claimed", gorm.Expr("claimed + ?", n)).Error; err != nil {
			return err
		}
	}
	return nil
}

// payClaims ends hold h's open claims as the hold ends: each, oldest first,
// takes what it claims of back (what the hold gave back to each grant, in
// draw order, after unhold; only grants alive at the claim: see aliveAt)
// with a revoke entry naming the revoke it pays for and the hold, and adds
// it to that shortfall's recovered.
// It lowers a.balance; the caller saves the account. It reports whether
// that crossed the low-balance threshold.
func (a *account) payClaims(ctx context.Context, tx *gorm.DB, h holdRow, back []heldPart) (bool, error) {
	if h.Claimed == 0 {
		return false, nil
	}
	var claims []claim
	err := tx.WithContext(ctx).Raw(`UPDATE credit_hold_claims SET ended_at = ?, recovered = 0
		WHERE hold_id = ? AND ended_at IS NULL RETURNING ledger_entry_id, amount, created_at`, a.now, h.ID).Scan(&claims).Error
	if err != nil {
		return false, err
	}
	sort.Slice(claims, func(i, j int) bool {
		if !claims[i].CreatedAt.Equal(claims[j].CreatedAt) {
			return claims[i].CreatedAt.Before(claims[j].CreatedAt)
		}
		return claims[i].LedgerEntryID < claims[j].LedgerEntryID
	})
	// What came back to each grant, still to be taken, and when each grant
	// died (expired or voided), if it has.
	free := make([]Draw, 0, len(back))
	ids := make([]string, 0, len(back))
	for _, p := range back {
		if n := p.Held - p.Take; n > 0 {
			free = append(free, Draw{GrantID: p.GrantID, Amount: n})
			ids = append(ids, p.GrantID)
		}
	}
	if len(free) == 0 {
		return false, nil // a capture spent everything: the claims stay owed
	}
	var deaths []grantDeath
	if err := tx.WithContext(ctx).Raw(`SELECT id, expires_at, voided_at FROM credit_grants WHERE id IN ?`, ids).Scan(&deaths).Error; err != nil {
		return false, err
	}
	died := make(map[string]grantDeath, len(deaths))
	for _, d := range deaths {
		died[d.ID] = d
	}
	fire := false
	for _, c := range claims {
		draws, err := a.takeBack(ctx, tx, free, c, died)
		if err != nil {
			return false, err
		}
		if len(draws) == 0 {
			continue
		}
		if err := a.recover(ctx, tx, h.ID, c, draws); err != nil {
			return false, err
		}
		fire = a.lowBalance(true) || fire
	}
	return fire, nil
}

// grantDeath is when a grant expires and when it was voided, if ever.
type grantDeath struct {
	ID        string
	ExpiresAt *time.Time
	VoidedAt  *time.Time
}

// aliveAt reports whether the grant's credits were spendable-to-be at t: a
// claim made at t counted only those (claimHeld), and only those pay it.
// Credits of a grant that died before the claim would never have come back
// to the customer; taking them instead would leave live credits spendable.
// A grant that dies after the claim pays it like a live one: the revoke
// would have taken those credits at once had the hold not kept them. A
// void at the very instant of the claim counts as before it.
func (d grantDeath) aliveAt(t time.Time) bool {
	return (d.ExpiresAt == nil || d.ExpiresAt.After(t)) && (d.VoidedAt == nil || d.VoidedAt.After(t))
}

// takeBack takes up to claim c's amount from free (updated in place) as a
// revoke does, only from grants alive at the claim, and returns the draws.
// What comes back to a grant voided since is taken before settleReleased
// voids the rest of it.
func (a *account) takeBack(ctx context.Context, tx *gorm.DB, free []Draw, c claim, died map[string]grantDeath) ([]Draw, error) {
	var draws []Draw
	n := c.Amount
	for i := range free {
		if n == 0 {
			break
		}
		take := min(free[i].Amount, n)
		if take == 0 || !died[free[i].GrantID].aliveAt(c.CreatedAt) {
			continue
		}
		res := tx.WithContext(ctx).Exec(`UPDATE credit_grants SET remaining = remaining - ?, revoked = revoked + ?
			WHERE id = ? AND customer_id = ? AND remaining - held >= ?`, take, take, free[i].GrantID, a.customerID, take)
		if res.Error != nil {
			return nil, res.Error
		}
		if res.RowsAffected != 1 {
			return nil, fmt.Errorf("credits: grant %s does not have the %d credits hold gave back", free[i].GrantID, take)
		}
		free[i].Amount -= take
		n -= take
		draws = append(draws, Draw{GrantID: free[i].GrantID, Amount: take})
	}
	return draws, nil
}

// recover writes what claim c took from hold holdID's returned credits:
// the revoke entry (its metadata names the revoke and the hold: hold_id
// on an entry is only a capture's), the claim's and the shortfall's recovered, and
// credits.revoked.
func (a *account) recover(ctx context.Context, tx *gorm.DB, holdID string, c claim, draws []Draw) error {
	taken := sumDraws(draws)
	var revoked ledgerRow
	if err := tx.WithContext(ctx).Where("id = ?", c.LedgerEntryID).Take(&revoked).Error; err != nil {
		return fmt.Errorf("credits: revoke %s a hold pays for: %w", c.LedgerEntryID, err)
	}
	a.balance -= taken
	txID := db.NewID("ctx")
	if err := insertEntry(ctx, tx, entryRow{
		ID: txID, CustomerID: a.customerID, Kind: KindRevoke, Amount: -taken, BalanceAfter: a.balance,
		Reason: revoked.Reason, Metadata: map[string]string{"recovers_transaction_id": c.LedgerEntryID, "hold_id": holdID},
		GrantID: revoked.GrantID, PaymentID: revoked.PaymentID, Draws: draws, CreatedAt: a.now,
	}); err != nil {
		return err
	}
	if err := tx.WithContext(ctx).Exec(`UPDATE credit_hold_claims SET recovered = ?, recovery_entry_id = ?
		WHERE hold_id = ? AND ledger_entry_id = ?`, taken, txID, holdID, c.LedgerEntryID).Error; err != nil {
		return err
	}
	if err := tx.WithContext(ctx).Exec(`UPDATE credit_shortfalls SET recovered = recovered + ?,
		settled_at = CASE WHEN recovered + ? = amount THEN ?::timestamptz END,
		settled_reason = CASE WHEN recovered + ? = amount THEN 'recovered from holds' END
		WHERE ledger_entry_id = ? AND settled_at IS NULL`, taken, taken, a.now, taken, c.LedgerEntryID).Error; err != nil {
		return err
	}
	ev := events.CreditsRevoked{
		CustomerID: a.customerID, TransactionID: txID, Amount: taken, Draws: make([]events.Draw, 0, len(draws)),
		Balance: a.balance, Reason: revoked.Reason, RecoversTransactionID: c.LedgerEntryID, HoldID: holdID,
	}
	if revoked.PaymentID != nil {
		ev.PaymentID = *revoked.PaymentID
	}
	if revoked.GrantID != nil {
		ev.GrantID = *revoked.GrantID
	}
	for _, d := range draws {
		ev.Draws = append(ev.Draws, events.Draw{GrantID: d.GrantID, Amount: d.Amount})
	}
	return events.Append(ctx, tx, a.customerID, ev)
}

// endClaims ends the open claims of revoke entry entryID without payment
// (its shortfall is settled otherwise: a dispute won) and returns the
// revoke entries that holds' claims of it already wrote.
func endClaims(ctx context.Context, tx *gorm.DB, now time.Time, entryID string) ([]string, error) {
	var ended []struct {
		HoldID string
		Amount int64
	}
	err := tx.WithContext(ctx).Raw(`UPDATE credit_hold_claims SET ended_at = ?, recovered = 0
		WHERE ledger_entry_id = ? AND ended_at IS NULL RETURNING hold_id, amount`, now, entryID).Scan(&ended).Error
	if err != nil {
		return nil, err
	}
	for _, c := range ended {
		if err := tx.WithContext(ctx).Model(&holdRow{}).Where("id = ?", c.HoldID).
			Update("claimed", gorm.Expr("claimed - ?", c.Amount)).Error; err != nil {
			return nil, err
		}
	}
	var paid []string
	err = tx.WithContext(ctx).Raw(`SELECT recovery_entry_id FROM credit_hold_claims
		WHERE ledger_entry_id = ? AND recovery_entry_id IS NOT NULL ORDER BY ended_at, hold_id`, entryID).Scan(&paid).Error
	return paid, err
}

// checkClaims checks the claims of shortfalls on holds (see Verify).
func checkClaims(ctx context.Context, tx *gorm.DB) ([]VerifyProblem, int64, error) {
	var rows []struct {
		CustomerID, Detail string
	}
	err := tx.WithContext(ctx).Raw(`
		WITH c AS (SELECT hold_id, sum(amount) FILTER (WHERE ended_at IS NULL) AS open FROM credit_hold_claims GROUP BY 1)
		SELECT h.customer_id, format('hold %s (%s) has claimed %s, but its open claims are %s', h.id, h.status, h.claimed, COALESCE(c.open, 0)) AS detail
		FROM credit_holds h LEFT JOIN c ON c.hold_id = h.id
		WHERE (h.status = 'active' AND h.claimed <> COALESCE(c.open, 0)) OR (h.status <> 'active' AND COALESCE(c.open, 0) <> 0)
		UNION ALL
		SELECT s.customer_id, format('shortfall of revoke %s: %s owed, %s recovered (claims paid %s, revoke entries took %s), %s claimed on holds, settled %s',
		       s.ledger_entry_id, s.amount, s.recovered, COALESCE(c.paid, 0), COALESCE(l.taken, 0), COALESCE(c.open, 0), s.settled_at IS NOT NULL)
		FROM credit_shortfalls s
		LEFT JOIN (SELECT ledger_entry_id, sum(recovered) AS paid, sum(amount) FILTER (WHERE ended_at IS NULL) AS open
		           FROM credit_hold_claims GROUP BY 1) c ON c.ledger_entry_id = s.ledger_entry_id
		LEFT JOIN (SELECT metadata->>'recovers_transaction_id' AS id, -sum(amount) AS taken FROM credit_ledger
		           WHERE kind = 'revoke' AND metadata->>'recovers_transaction_id' IS NOT NULL GROUP BY 1) l ON l.id = s.ledger_entry_id
		WHERE s.recovered <> COALESCE(c.paid, 0) OR s.recovered <> COALESCE(l.taken, 0)
		   OR COALESCE(c.open, 0) > s.amount - s.recovered OR (s.settled_at IS NOT NULL AND COALESCE(c.open, 0) <> 0)
		   OR (s.settled_at IS NULL AND s.recovered = s.amount)
		ORDER BY 1, 2`).Scan(&rows).Error
	if err != nil {
		return nil, 0, err
	}
	out := make([]VerifyProblem, 0, len(rows))
	for _, r := range rows {
		out = append(out, VerifyProblem{Kind: ProblemHoldClaims, CustomerID: r.CustomerID, Detail: r.Detail})
	}
	return out, 0, nil
}
