package payments

import (
	"cmp"
	"context"
	"fmt"
	"slices"
	"strings"

	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/credits"
	"github.com/tallybilling/tally/internal/db"
)

// Verify is the payments capability's part of `tally verify` (a
// credits.Checker): VerifyPurchases and VerifyTakeBacks.
func Verify(ctx context.Context, tx *gorm.DB) ([]credits.VerifyProblem, int64, error) {
	problems, checked, err := VerifyPurchases(ctx, tx)
	if err != nil {
		return nil, 0, err
	}
	more, err := VerifyTakeBacks(ctx, tx)
	if err != nil {
		return nil, 0, err
	}
	return append(problems, more...), checked, nil
}

// VerifyTakeBacks checks what refunds and disputes took back of each
// credit-pack payment: never more than the share of its credits that the
// money gone back paid for, and exactly what its revoke ledger entries
// took or recorded short.
func VerifyTakeBacks(ctx context.Context, gdb *gorm.DB) ([]credits.VerifyProblem, error) {
	type row struct {
		ID             string
		CustomerID     string
		Credits        int64
		Paid           int64
		AmountBack     int64
		CreditsRevoked int64
		Ledger         int64
	}
	var rows []row
	err := gdb.WithContext(ctx).Raw(`
		WITH l AS (SELECT payment_id, sum(-amount + COALESCE(shortfall, 0))::bigint AS revoked
		           FROM credit_ledger WHERE kind = 'revoke' AND payment_id IS NOT NULL GROUP BY 1)
		SELECT p.id, p.customer_id, p.credits, COALESCE(p.amount_received, p.amount) AS paid,
		       p.amount_refunded AS amount_back, p.credits_revoked, COALESCE(l.revoked, 0) AS ledger
		FROM payments p LEFT JOIN l ON l.payment_id = p.id
		WHERE p.item_kind = 'credit_pack' AND (p.credits_revoked > 0 OR l.revoked IS NOT NULL)
		ORDER BY p.id`).Scan(&rows).Error
	if err != nil {
		return nil, db.Translate(err, nil)
	}
	var problems []credits.VerifyProblem
	for _, r := range rows {
		if share := creditShare(r.Credits, r.AmountBack, r.Paid); r.CreditsRevoked > share {
			problems = append(problems, credits.VerifyProblem{Kind: "revoked_beyond_share", CustomerID: r.CustomerID, PaymentID: r.ID,
				Detail: fmt.Sprintf("%d of %d credits taken back, but %d of %d paid went back, which bought %d", r.CreditsRevoked, r.Credits, r.AmountBack, r.Paid, share)})
		}
		if r.CreditsRevoked != r.Ledger {
			problems = append(problems, credits.VerifyProblem{Kind: "revoke_ledger_mismatch", CustomerID: r.CustomerID, PaymentID: r.ID,
				Detail: fmt.Sprintf("the payment counts %d credits taken back, its revoke entries %d (taken plus short)", r.CreditsRevoked, r.Ledger)})
		}
	}
	return problems, nil
}

// VerifyPurchases checks invariant 2 of design/QUALITY.md: every succeeded
// (or since refunded) credit-pack payment has exactly one purchase grant,
// and no pending or failed payment has one. It returns one problem per
// breach and the number of payments checked; `tally verify` runs it.
func VerifyPurchases(ctx context.Context, gdb *gorm.DB) ([]credits.VerifyProblem, int64, error) {
	counts, err := credits.PurchaseGrantCounts(ctx, gdb)
	if err != nil {
		return nil, 0, err
	}
	type prow struct {
		ID         string
		CustomerID string
		ItemKind   string
		Status     string
	}
	var rows []prow
	if err := gdb.WithContext(ctx).Raw(`SELECT id, customer_id, item_kind, status FROM payments ORDER BY id`).Scan(&rows).Error; err != nil {
		return nil, 0, db.Translate(err, nil)
	}
	var problems []credits.VerifyProblem
	known := make(map[string]bool, len(rows))
	for _, r := range rows {
		known[r.ID] = true
		n := counts[r.ID]
		switch {
		case r.ItemKind != string(KindCreditPack):
			if n != 0 {
				problems = append(problems, credits.VerifyProblem{Kind: "purchase_grant_for_non_pack", CustomerID: r.CustomerID, PaymentID: r.ID,
					Detail: fmt.Sprintf("%s payment has %d purchase grants", r.ItemKind, n)})
			}
		case r.Status == string(Succeeded) || r.Status == string(Refunded):
			if n != 1 {
				problems = append(problems, credits.VerifyProblem{Kind: "succeeded_payment_grants", CustomerID: r.CustomerID, PaymentID: r.ID,
					Detail: fmt.Sprintf("%s credit-pack payment has %d purchase grants, want exactly 1", r.Status, n)})
			}
		default:
			if n != 0 {
				problems = append(problems, credits.VerifyProblem{Kind: "unpaid_payment_granted", CustomerID: r.CustomerID, PaymentID: r.ID,
					Detail: fmt.Sprintf("%s payment has %d purchase grants, want none", r.Status, n)})
			}
		}
	}
	for id, n := range counts {
		if !known[id] && n > 0 {
			problems = append(problems, credits.VerifyProblem{Kind: "purchase_grant_without_payment", PaymentID: id,
				Detail: fmt.Sprintf("%d purchase grants name a payment that does not exist", n)})
		}
	}
	// Map order is random; operators diff reports.
	slices.SortFunc(problems, func(a, b credits.VerifyProblem) int {
		return cmp.Or(strings.Compare(a.PaymentID, b.PaymentID), strings.Compare(a.Kind, b.Kind))
	})
	return problems, int64(len(rows)), nil
}
