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
