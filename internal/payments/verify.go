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
// credits.Checker): VerifyPurchases, VerifyTakeBacks and VerifyDisputes.
func Verify(ctx context.Context, tx *gorm.DB) ([]credits.VerifyProblem, int64, error) {
	problems, checked, err := VerifyPurchases(ctx, tx)
	if err != nil {
		return nil, 0, err
	}
	for _, check := range []func(context.Context, *gorm.DB) ([]credits.VerifyProblem, error){VerifyTakeBacks, VerifyDisputes, VerifyInvoices} {
		more, err := check(ctx, tx)
		if err != nil {
			return nil, 0, err
		}
		problems = append(problems, more...)
	}
	return problems, checked, nil
}

// VerifyInvoices checks pay-by-invoice payments against their invoices
// and the guard: a paid invoice's credit-pack payment has exactly one
// purchase grant and a confirmation keyed by that invoice; an open, draft,
// void or uncollectible invoice's payment has no grant, no confirmation
// and has not succeeded; and no invoice confirms a payment not paid by
// invoice.
func VerifyInvoices(ctx context.Context, gdb *gorm.DB) ([]credits.VerifyProblem, error) {
	counts, err := credits.PurchaseGrantCounts(ctx, gdb)
	if err != nil {
		return nil, err
	}
	type row struct {
		ID, CustomerID, ItemKind, Status, Method   string
		InvoiceID, InvoiceStatus, ConfirmedInvoice string
	}
	var rows []row
	// payments beside their guard rows: SQL.
	err = gdb.WithContext(ctx).Raw(`
		SELECT p.id, p.customer_id, p.item_kind, p.status, p.method, COALESCE(p.invoice_id, '') AS invoice_id,
		       COALESCE(p.invoice_status, '') AS invoice_status, COALESCE(c.invoice_id, '') AS confirmed_invoice
		FROM payments p LEFT JOIN payment_confirmations c ON c.payment_id = p.id
		WHERE p.method = 'invoice' OR c.invoice_id IS NOT NULL
		ORDER BY p.id`).Scan(&rows).Error
	if err != nil {
		return nil, db.Translate(err, nil)
	}
	var problems []credits.VerifyProblem
	add := func(r row, kind, format string, args ...any) {
		problems = append(problems, credits.VerifyProblem{Kind: kind, CustomerID: r.CustomerID, PaymentID: r.ID, Detail: fmt.Sprintf(format, args...)})
	}
	for _, r := range rows {
		paid := r.Status != string(Pending) && r.Status != string(Failed)
		n := counts[r.ID]
		switch {
		case r.Method != string(MethodInvoice):
			add(r, "invoice_confirms_non_invoice_payment", "invoice %s confirmed a %s payment", r.ConfirmedInvoice, r.Method)
		case r.InvoiceStatus == "paid" && r.ItemKind == string(KindCreditPack) && n != 1:
			add(r, "paid_invoice_grants", "invoice %s is paid and its %s payment has %d purchase grants, want exactly 1", r.InvoiceID, r.Status, n)
		case r.InvoiceStatus != "paid" && (n != 0 || paid):
			add(r, "unpaid_invoice_credited", "invoice %s is %q but its payment is %s with %d purchase grants", r.InvoiceID, r.InvoiceStatus, r.Status, n)
		case paid && r.ConfirmedInvoice != r.InvoiceID:
			add(r, "invoice_payment_unconfirmed", "%s payment has no confirmation by its invoice %s (confirmed by %q)", r.Status, r.InvoiceID, r.ConfirmedInvoice)
		case !paid && r.ConfirmedInvoice != "":
			add(r, "unpaid_invoice_confirmed", "%s payment has a confirmation by invoice %s", r.Status, r.ConfirmedInvoice)
		}
	}
	return problems, nil
}

// VerifyTakeBacks checks what refunds and disputes took back of each
// credit-pack payment: never more than the share of its credits that the
// money gone back (refunded, and withdrawn by disputes not won) paid for,
// and exactly what its revoke ledger entries took or recorded short, less
// the revokes that won disputes gave back.
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
	// An aggregate of the ledger joined to the payments: SQL.
	err := gdb.WithContext(ctx).Raw(`
		WITH l AS (SELECT payment_id, sum(-amount + COALESCE(shortfall, 0))::bigint AS revoked
		           FROM credit_ledger WHERE kind = 'revoke' AND payment_id IS NOT NULL
		             -- a hold paying part of a shortfall later: counted in it already
		             AND metadata->>'recovers_transaction_id' IS NULL
		             AND id NOT IN (SELECT revoke_transaction_id FROM payment_disputes
		                            WHERE status = 'won' AND revoke_transaction_id IS NOT NULL)
		           GROUP BY 1)
		SELECT p.id, p.customer_id, p.credits, COALESCE(p.amount_received, p.amount) AS paid,
		       p.amount_refunded + p.amount_disputed AS amount_back, p.credits_revoked, COALESCE(l.revoked, 0) AS ledger
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

// VerifyDisputes checks the disputes of every payment: a payment's
// amount_disputed is what its withdrawn disputes that were not won took,
// and a disputed or dispute_lost payment has one; each withdrawn dispute's
// credits taken back are its revoke entry's; and the dispute_won grants of
// a payment return exactly what its won disputes say they restored.
func VerifyDisputes(ctx context.Context, gdb *gorm.DB) ([]credits.VerifyProblem, error) {
	type row struct {
		Kind       string
		ID         string
		CustomerID string
		Detail     string
	}
	var rows []row
	// Three aggregates across disputes, payments, grants and the ledger: SQL.
	err := gdb.WithContext(ctx).Raw(`
		WITH open AS (SELECT payment_id, sum(amount)::bigint AS amount, count(*) AS n FROM payment_disputes
		              WHERE withdrawn_at IS NOT NULL AND status <> 'won' GROUP BY 1),
		     restored AS (SELECT payment_id, sum(credits_restored)::bigint AS n FROM payment_disputes WHERE status = 'won' GROUP BY 1),
		     granted AS (SELECT payment_id, sum(amount)::bigint AS n FROM credit_grants WHERE source = 'dispute_won' GROUP BY 1)
		SELECT 'dispute_amount_mismatch' AS kind, p.id, p.customer_id,
		       format('%s payment has amount_disputed %s, its open and lost disputes withdrew %s', p.status, p.amount_disputed, COALESCE(o.amount, 0)) AS detail
		FROM payments p LEFT JOIN open o ON o.payment_id = p.id
		WHERE p.amount_disputed <> COALESCE(o.amount, 0) OR (p.status IN ('disputed', 'dispute_lost') AND COALESCE(o.n, 0) = 0)
		UNION ALL
		SELECT 'dispute_revoke_mismatch', p.id, p.customer_id,
		       format('dispute %s counts %s credits taken and %s short, its revoke entry %s and %s',
		              d.stripe_dispute_id, d.credits_revoked, d.credits_shortfall, COALESCE(-l.amount, 0), COALESCE(l.shortfall, 0))
		FROM payment_disputes d JOIN payments p ON p.id = d.payment_id
		LEFT JOIN credit_ledger l ON l.id = d.revoke_transaction_id
		WHERE d.credits_revoked <> COALESCE(-l.amount, 0) OR d.credits_shortfall <> COALESCE(l.shortfall, 0)
		UNION ALL
		SELECT 'dispute_won_grants_mismatch', COALESCE(r.payment_id, g.payment_id), COALESCE(p.customer_id, ''),
		       format('won disputes restored %s credits, dispute_won grants hold %s', COALESCE(r.n, 0), COALESCE(g.n, 0))
		FROM restored r FULL JOIN granted g ON g.payment_id = r.payment_id
		LEFT JOIN payments p ON p.id = COALESCE(r.payment_id, g.payment_id)
		WHERE COALESCE(r.n, 0) <> COALESCE(g.n, 0)
		ORDER BY 2, 1`).Scan(&rows).Error
	if err != nil {
		return nil, db.Translate(err, nil)
	}
	problems := make([]credits.VerifyProblem, 0, len(rows))
	for _, r := range rows {
		problems = append(problems, credits.VerifyProblem{Kind: r.Kind, CustomerID: r.CustomerID, PaymentID: r.ID, Detail: r.Detail})
	}
	return problems, nil
}

// VerifyPurchases checks invariant 2 of docs/guarantees.md ("Checked, not
// trusted"): every succeeded
// (or since refunded or disputed) credit-pack payment has exactly one
// purchase grant, and no pending or failed payment has one. It returns one problem per
// breach and the number of payments checked; `tally verify` runs it.
func VerifyPurchases(ctx context.Context, gdb *gorm.DB) ([]credits.VerifyProblem, int64, error) {
	counts, err := credits.PurchaseGrantCounts(ctx, gdb)
	if err != nil {
		return nil, 0, err
	}
	var rows []paymentRow
	if err := gdb.WithContext(ctx).Select("id", "customer_id", "item_kind", "status").Order("id").Find(&rows).Error; err != nil {
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
		case r.Status == string(Succeeded) || r.Status == string(Refunded) || r.Status == string(Disputed) || r.Status == string(DisputeLost):
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
