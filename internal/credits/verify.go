package credits

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"time"

	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/db"
)

// Kinds of VerifyProblem the credits checks report.
const (
	ProblemNegativeBalance       = "negative_balance"
	ProblemBalanceMissing        = "balance_row_missing"
	ProblemBalanceLedgerMismatch = "balance_ledger_mismatch"
	ProblemLedgerGrantsMismatch  = "ledger_grants_mismatch"
	ProblemLedgerChainBroken     = "ledger_chain_broken"
	ProblemGrantAccounting       = "grant_accounting"
	ProblemDuplicatePurchase     = "duplicate_purchase_grant"
	ProblemDuplicateConsume      = "duplicate_consume_for_key"
	ProblemRevokeAccounting      = "revoke_accounting"
	ProblemHeldMismatch          = "held_mismatch"
	ProblemHoldAccounting        = "hold_accounting"
	ProblemOverdueHold           = "overdue_hold"
	ProblemVoidedGrantLeft       = "voided_grant_not_empty"
	ProblemHoldClaims            = "hold_claims"
)

// OverdueHoldGrace is how long past its expires_at an active hold may
// stay unreleased before Verify reports it: the sweeper releases overdue
// holds every TALLY_CREDITS_SWEEP_INTERVAL (a minute by default), so twice
// that means it is not doing its work.
const OverdueHoldGrace = 2 * time.Minute

// VerifyReport is the invariant report of `tally verify` and
// GET /v1/admin/verify. Other packages contribute problems through Checkers.
type VerifyReport struct {
	OK               bool
	CustomersChecked int64
	PaymentsChecked  int64
	Problems         []VerifyProblem
	// Receivables are customers with an open shortfall: credits a refund or
	// dispute could not take back because they were spent. Money owed to
	// the merchant, not a breach: they do not affect OK.
	Receivables []Receivable
}

// Receivable is a customer's open shortfall.
type Receivable struct {
	CustomerID string
	// Shortfall is the credits not recovered, over Revokes revoke entries.
	Shortfall int64
	Revokes   int64
}

// VerifyProblem is one breached invariant. Kind is a stable identifier
// (ProblemNegativeBalance, ...); Detail explains it with numbers.
type VerifyProblem struct {
	Kind       string
	CustomerID string
	PaymentID  string
	Detail     string
}

// Append adds problems to the report and keeps OK in step with them.
func (r *VerifyReport) Append(problems ...VerifyProblem) {
	r.Problems = append(r.Problems, problems...)
	r.OK = len(r.Problems) == 0
}

// Checker is an invariant check contributed by another package (payments:
// every succeeded payment credited exactly once). It runs inside the
// read-only snapshot tx that the credits checks use, so it sees the same
// state they do, and returns its problems and how many payments it checked.
type Checker func(ctx context.Context, tx *gorm.DB) (problems []VerifyProblem, paymentsChecked int64, err error)

// Verify recomputes every customer's balance from the ledger and from the
// grants and checks the invariants of the wallet, then runs extra, all in
// one consistent read-only snapshot of a live database:
//
//   - the balance row equals the ledger sum, which is never negative, and
//     equals the grants' unspent remainder (unexpired, plus expired ones the
//     sweeper has not recorded yet);
//   - every ledger entry's balance_after is the running sum before it;
//   - every grant's spent part is accounted for by the consume draws, expire
//     and revoke entries naming it, and it has exactly one grant entry;
//   - at most one purchase grant per payment;
//   - one consume entry per idempotency key (within the key's retention);
//   - every revoke's draws add up to what it took, and its shortfall is
//     recorded as a receivable;
//   - what is held, per grant and per customer, is what active holds keep,
//     never more than is there; a voided grant has nothing left but that;
//   - every hold's draws add up to its amount, an ended hold's captured and
//     released add up to it, and what it captured is its one consume
//     entry; no active hold is overdue by more than OverdueHoldGrace;
//   - a shortfall's claims on holds are open only on active holds, each
//     hold's claimed is its open claims, a shortfall never claims more
//     than it still owes, and what holds paid of it is its recovered and
//     exactly the revoke entries that name it.
//
// It also lists the open receivables (customers' unrecovered shortfalls),
// which are not breaches.
//
// Problems are reported, not returned as errors; err is for a check that
// could not run (errs.Unavailable, ...).
func Verify(ctx context.Context, gdb *gorm.DB, extra ...Checker) (VerifyReport, error) {
	var rep VerifyReport
	err := db.InSnapshot(ctx, gdb, func(tx *gorm.DB) error {
		rep = VerifyReport{}
		checks := append([]Checker{checkBalances, checkChain, checkGrants, checkPurchases, checkConsumeKeys, checkRevokes,
			checkHeld, checkHolds, checkClaims}, extra...)
		for _, check := range checks {
			problems, payments, err := check(ctx, tx)
			if err != nil {
				return err
			}
			rep.PaymentsChecked += payments
			rep.Append(problems...)
		}
		var err error
		if rep.Receivables, err = receivables(ctx, tx); err != nil {
			return err
		}
		return tx.Raw(`SELECT count(*) FROM (
			SELECT customer_id FROM credit_balances UNION SELECT customer_id FROM credit_ledger
			UNION SELECT customer_id FROM credit_grants) ids`).Scan(&rep.CustomersChecked).Error
	})
	if err != nil {
		return VerifyReport{}, err
	}
	rep.OK = len(rep.Problems) == 0
	if rep.Problems == nil {
		rep.Problems = []VerifyProblem{}
	}
	if rep.Receivables == nil {
		rep.Receivables = []Receivable{}
	}
	return rep, nil
}

// Verify runs the credits checks alone; see the package-level Verify.
func (s *Service) Verify(ctx context.Context) (VerifyReport, error) {
	return Verify(ctx, s.db)
}

func checkBalances(ctx context.Context, tx *gorm.DB) ([]VerifyProblem, int64, error) {
	type row struct {
		CustomerID string
		Balance    *int64
		LedgerSum  int64
		Entries    int64
		Remaining  int64
		Unexpired  int64
	}
	var rows []row
	err := tx.WithContext(ctx).Raw(`
		WITH l AS (SELECT customer_id, sum(amount)::bigint AS ledger_sum, count(*) AS entries FROM credit_ledger GROUP BY customer_id),
		     g AS (SELECT customer_id, sum(remaining)::bigint AS remaining,
		                  COALESCE(sum(remaining) FILTER (WHERE expires_at IS NULL OR expires_at > now()), 0)::bigint AS unexpired
		           FROM credit_grants GROUP BY customer_id),
		     ids AS (SELECT customer_id FROM credit_balances UNION SELECT customer_id FROM l UNION SELECT customer_id FROM g)
		SELECT ids.customer_id, b.balance, COALESCE(l.ledger_sum, 0) AS ledger_sum, COALESCE(l.entries, 0) AS entries,
		       COALESCE(g.remaining, 0) AS remaining, COALESCE(g.unexpired, 0) AS unexpired
		FROM ids
		LEFT JOIN credit_balances b ON b.customer_id = ids.customer_id
		LEFT JOIN l ON l.customer_id = ids.customer_id
		LEFT JOIN g ON g.customer_id = ids.customer_id
		WHERE b.balance IS NULL OR b.balance < 0 OR COALESCE(l.ledger_sum, 0) < 0
		   OR b.balance <> COALESCE(l.ledger_sum, 0) OR COALESCE(l.ledger_sum, 0) <> COALESCE(g.remaining, 0)
		ORDER BY ids.customer_id`).Scan(&rows).Error
	if err != nil {
		return nil, 0, err
	}
	var out []VerifyProblem
	for _, r := range rows {
		p := func(kind, format string, args ...any) {
			out = append(out, VerifyProblem{Kind: kind, CustomerID: r.CustomerID, Detail: fmt.Sprintf(format, args...)})
		}
		if r.Balance == nil {
			p(ProblemBalanceMissing, "%d ledger entries (sum %d) but no balance row", r.Entries, r.LedgerSum)
			continue
		}
		if *r.Balance < 0 || r.LedgerSum < 0 {
			p(ProblemNegativeBalance, "balance row %d, ledger sum %d", *r.Balance, r.LedgerSum)
		}
		if *r.Balance != r.LedgerSum {
			p(ProblemBalanceLedgerMismatch, "balance row %d but the ledger (%d entries) sums to %d", *r.Balance, r.Entries, r.LedgerSum)
		}
		if r.LedgerSum != r.Remaining {
			p(ProblemLedgerGrantsMismatch, "ledger sums to %d but grants have %d left (%d of it unexpired)", r.LedgerSum, r.Remaining, r.Unexpired)
		}
	}
	return out, 0, nil
}

func checkChain(ctx context.Context, tx *gorm.DB) ([]VerifyProblem, int64, error) {
	type row struct {
		CustomerID   string
		ID           string
		BalanceAfter int64
		Running      int64
	}
	var rows []row
	err := tx.WithContext(ctx).Raw(`
		SELECT DISTINCT ON (customer_id) customer_id, id, balance_after, running FROM (
			SELECT customer_id, id, seq, balance_after,
			       (sum(amount) OVER (PARTITION BY customer_id ORDER BY seq))::bigint AS running
			FROM credit_ledger) x
		WHERE balance_after <> running OR running < 0
		ORDER BY customer_id, seq`).Scan(&rows).Error
	if err != nil {
		return nil, 0, err
	}
	var out []VerifyProblem
	for _, r := range rows {
		out = append(out, VerifyProblem{Kind: ProblemLedgerChainBroken, CustomerID: r.CustomerID,
			Detail: fmt.Sprintf("entry %s says balance_after %d but the entries up to it sum to %d (first break shown)", r.ID, r.BalanceAfter, r.Running)})
	}
	return out, 0, nil
}

func checkGrants(ctx context.Context, tx *gorm.DB) ([]VerifyProblem, int64, error) {
	type row struct {
		ID           string
		CustomerID   string
		Amount       int64
		Remaining    int64
		Drawn        int64
		Removed      int64
		GrantEntries int64
		Granted      int64
	}
	var rows []row
	err := tx.WithContext(ctx).Raw(`
		WITH d AS (SELECT x->>'grant_id' AS grant_id, sum((x->>'amount')::bigint)::bigint AS amount
		           FROM credit_ledger, jsonb_array_elements(draws) x
		           WHERE kind IN ('consume', 'revoke', 'adjust') AND amount < 0 AND draws IS NOT NULL GROUP BY 1),
		     -- Expiries, voids, and revokes from before revokes named their
		     -- draws (they took from the grant they name).
		     e AS (SELECT grant_id, (-sum(amount))::bigint AS amount FROM credit_ledger
		           WHERE (kind IN ('expire', 'void') OR (kind = 'revoke' AND draws IS NULL)) AND grant_id IS NOT NULL GROUP BY 1),
		     -- A grant is created by a grant entry, or a positive adjustment.
		     ge AS (SELECT grant_id, count(*) AS entries, sum(amount)::bigint AS amount FROM credit_ledger
		            WHERE (kind = 'grant' OR (kind = 'adjust' AND amount > 0)) AND grant_id IS NOT NULL GROUP BY 1)
		SELECT g.id, g.customer_id, g.amount, g.remaining, COALESCE(d.amount, 0) AS drawn,
		       COALESCE(e.amount, 0) AS removed, COALESCE(ge.entries, 0) AS grant_entries, COALESCE(ge.amount, 0) AS granted
		FROM credit_grants g
		LEFT JOIN d ON d.grant_id = g.id
		LEFT JOIN e ON e.grant_id = g.id
		LEFT JOIN ge ON ge.grant_id = g.id
		WHERE g.amount - g.remaining <> COALESCE(d.amount, 0) + COALESCE(e.amount, 0)
		   OR COALESCE(ge.entries, 0) <> 1 OR COALESCE(ge.amount, 0) <> g.amount
		ORDER BY g.customer_id, g.id`).Scan(&rows).Error
	if err != nil {
		return nil, 0, err
	}
	var out []VerifyProblem
	for _, r := range rows {
		out = append(out, VerifyProblem{Kind: ProblemGrantAccounting, CustomerID: r.CustomerID,
			Detail: fmt.Sprintf("grant %s of %d has %d left, but consumes and revokes drew %d and expiries took %d; %d grant entries for %d",
				r.ID, r.Amount, r.Remaining, r.Drawn, r.Removed, r.GrantEntries, r.Granted)})
	}
	return out, 0, nil
}

func checkPurchases(ctx context.Context, tx *gorm.DB) ([]VerifyProblem, int64, error) {
	counts, err := PurchaseGrantCounts(ctx, tx)
	if err != nil {
		return nil, 0, err
	}
	var out []VerifyProblem
	for paymentID, n := range counts {
		if n > 1 {
			out = append(out, VerifyProblem{Kind: ProblemDuplicatePurchase, PaymentID: paymentID,
				Detail: fmt.Sprintf("payment %s has %d purchase grants", paymentID, n)})
		}
	}
	// Map order is random; operators diff reports.
	slices.SortFunc(out, func(a, b VerifyProblem) int { return strings.Compare(a.PaymentID, b.PaymentID) })
	return out, 0, nil
}

func checkConsumeKeys(ctx context.Context, tx *gorm.DB) ([]VerifyProblem, int64, error) {
	type row struct {
		CustomerID     string
		IdempotencyKey string
		Entries        int64
	}
	var rows []row
	// A key may be used again once its first answer is past retention, so
	// only duplicates within that window are breaches.
	err := tx.WithContext(ctx).Raw(`
		SELECT customer_id, idempotency_key, count(*) AS entries FROM credit_ledger
		WHERE kind = 'consume' AND idempotency_key IS NOT NULL
		GROUP BY customer_id, idempotency_key
		HAVING count(*) > 1 AND max(created_at) - min(created_at) < make_interval(secs => ?)
		ORDER BY customer_id, idempotency_key`, db.IdempotencyRetention.Seconds()).Scan(&rows).Error
	if err != nil {
		return nil, 0, err
	}
	var out []VerifyProblem
	for _, r := range rows {
		out = append(out, VerifyProblem{Kind: ProblemDuplicateConsume, CustomerID: r.CustomerID,
			Detail: fmt.Sprintf("Idempotency-Key %q has %d consume entries", r.IdempotencyKey, r.Entries)})
	}
	return out, 0, nil
}

func checkRevokes(ctx context.Context, tx *gorm.DB) ([]VerifyProblem, int64, error) {
	type row struct {
		CustomerID string
		ID         string
		Taken      int64
		Drawn      *int64
		Shortfall  int64
		Recorded   *int64
	}
	var rows []row
	err := tx.WithContext(ctx).Raw(`
		SELECT l.customer_id, l.id, -l.amount AS taken,
		       (SELECT sum((x->>'amount')::bigint)::bigint FROM jsonb_array_elements(l.draws) x) AS drawn,
		       COALESCE(l.shortfall, 0) AS shortfall, s.amount AS recorded
		FROM credit_ledger l LEFT JOIN credit_shortfalls s ON s.ledger_entry_id = l.id
		WHERE l.kind = 'revoke'
		  AND ((l.draws IS NOT NULL AND COALESCE((SELECT sum((x->>'amount')::bigint) FROM jsonb_array_elements(l.draws) x), 0) <> -l.amount)
		       OR COALESCE(l.shortfall, 0) <> COALESCE(s.amount, 0))
		ORDER BY l.customer_id, l.seq`).Scan(&rows).Error
	if err != nil {
		return nil, 0, err
	}
	var out []VerifyProblem
	for _, r := range rows {
		drawn, recorded := int64(0), int64(0)
		if r.Drawn != nil {
			drawn = *r.Drawn
		}
		if r.Recorded != nil {
			recorded = *r.Recorded
		}
		out = append(out, VerifyProblem{Kind: ProblemRevokeAccounting, CustomerID: r.CustomerID,
			Detail: fmt.Sprintf("revoke %s took %d with draws of %d, and is short %d with %d recorded as receivable",
				r.ID, r.Taken, drawn, r.Shortfall, recorded)})
	}
	return out, 0, nil
}

// checkHeld checks what holds keep against what the grants and balance
// rows say is held: per grant, held equals the sum of active holds' draws
// of it and never exceeds remaining (nothing is held that is not there, so
// no grant has less than nothing available); per customer, the balance
// row's held equals the active holds' amounts and the grants' held, and
// never exceeds the balance. A voided grant has nothing left but what
// holds keep.
func checkHeld(ctx context.Context, tx *gorm.DB) ([]VerifyProblem, int64, error) {
	type grantRow struct {
		ID, CustomerID           string
		Remaining, Held, ByHolds int64
		Voided                   bool
	}
	var grants []grantRow
	err := tx.WithContext(ctx).Raw(`
		WITH hd AS (SELECT d.grant_id, sum(d.amount)::bigint AS amount
		            FROM credit_holds h, jsonb_to_recordset(h.draws) AS d(grant_id text, amount bigint)
		            WHERE h.status = 'active' GROUP BY 1)
		SELECT g.id, g.customer_id, g.remaining, g.held, COALESCE(hd.amount, 0) AS by_holds, g.voided_at IS NOT NULL AS voided
		FROM credit_grants g LEFT JOIN hd ON hd.grant_id = g.id
		WHERE g.held <> COALESCE(hd.amount, 0) OR g.held > g.remaining OR g.held < 0
		   OR (g.voided_at IS NOT NULL AND g.remaining <> g.held)
		ORDER BY g.customer_id, g.id`).Scan(&grants).Error
	if err != nil {
		return nil, 0, err
	}
	var out []VerifyProblem
	for _, g := range grants {
		if g.Held != g.ByHolds || g.Held > g.Remaining || g.Held < 0 {
			out = append(out, VerifyProblem{Kind: ProblemHeldMismatch, CustomerID: g.CustomerID,
				Detail: fmt.Sprintf("grant %s has %d held of %d remaining, but active holds keep %d of it", g.ID, g.Held, g.Remaining, g.ByHolds)})
		}
		if g.Voided && g.Remaining != g.Held {
			out = append(out, VerifyProblem{Kind: ProblemVoidedGrantLeft, CustomerID: g.CustomerID,
				Detail: fmt.Sprintf("voided grant %s has %d left, of which only %d is held", g.ID, g.Remaining, g.Held)})
		}
	}
	type customerRow struct {
		CustomerID                      string
		Balance, Held, ByHolds, ByGrant int64
	}
	var rows []customerRow
	err = tx.WithContext(ctx).Raw(`
		WITH h AS (SELECT customer_id, sum(amount)::bigint AS amount FROM credit_holds WHERE status = 'active' GROUP BY 1),
		     g AS (SELECT customer_id, sum(held)::bigint AS held FROM credit_grants WHERE held > 0 GROUP BY 1)
		SELECT b.customer_id, b.balance, b.held, COALESCE(h.amount, 0) AS by_holds, COALESCE(g.held, 0) AS by_grant
		FROM credit_balances b LEFT JOIN h ON h.customer_id = b.customer_id LEFT JOIN g ON g.customer_id = b.customer_id
		WHERE b.held <> COALESCE(h.amount, 0) OR b.held <> COALESCE(g.held, 0) OR b.held > b.balance OR b.held < 0
		UNION ALL
		SELECT h.customer_id, 0, 0, h.amount, 0 FROM h WHERE NOT EXISTS (SELECT 1 FROM credit_balances b WHERE b.customer_id = h.customer_id)
		ORDER BY 1`).Scan(&rows).Error
	if err != nil {
		return nil, 0, err
	}
	for _, r := range rows {
		out = append(out, VerifyProblem{Kind: ProblemHeldMismatch, CustomerID: r.CustomerID,
			Detail: fmt.Sprintf("balance row holds %d of balance %d, but active holds keep %d and the grants say %d", r.Held, r.Balance, r.ByHolds, r.ByGrant)})
	}
	return out, 0, nil
}

// checkHolds checks each hold's own accounts: its draws add up to its
// amount; an ended hold's captured and released add up to its amount, and
// what it captured is exactly its one consume entry; and no active hold is
// past its expiry at the customer's last write (which releases overdue
// holds first).
func checkHolds(ctx context.Context, tx *gorm.DB) ([]VerifyProblem, int64, error) {
	type row struct {
		ID, CustomerID, Status      string
		Amount, Drawn               int64
		Captured, Released, Entries int64
		Spent                       int64
		Overdue                     bool
	}
	var rows []row
	err := tx.WithContext(ctx).Raw(`
		WITH l AS (SELECT hold_id, count(*) AS entries, (-sum(amount))::bigint AS spent, min(id) AS entry_id
		           FROM credit_ledger WHERE hold_id IS NOT NULL GROUP BY 1),
		     x AS (SELECT h.*, (SELECT COALESCE(sum((d->>'amount')::bigint), 0) FROM jsonb_array_elements(h.draws) d)::bigint AS drawn,
		                  COALESCE(l.entries, 0) AS entries, COALESCE(l.spent, 0) AS spent, l.entry_id,
		                  (h.status = 'active' AND h.expires_at <= b.updated_at) AS overdue
		           FROM credit_holds h LEFT JOIN l ON l.hold_id = h.id LEFT JOIN credit_balances b ON b.customer_id = h.customer_id)
		SELECT id, customer_id, status, amount, drawn, captured, released, entries, spent, overdue FROM x
		WHERE drawn <> amount OR (status <> 'active' AND captured + released <> amount)
		   OR (status = 'active' AND (captured <> 0 OR released <> 0))
		   OR spent <> captured OR entries > 1 OR transaction_id IS DISTINCT FROM entry_id OR overdue
		ORDER BY customer_id, id`).Scan(&rows).Error
	if err != nil {
		return nil, 0, err
	}
	var out []VerifyProblem
	for _, r := range rows {
		if r.Overdue {
			out = append(out, VerifyProblem{Kind: ProblemOverdueHold, CustomerID: r.CustomerID,
				Detail: fmt.Sprintf("hold %s of %d is still active, but a later write to the customer should have released it", r.ID, r.Amount)})
			continue
		}
		out = append(out, VerifyProblem{Kind: ProblemHoldAccounting, CustomerID: r.CustomerID,
			Detail: fmt.Sprintf("hold %s (%s) of %d drew %d, captured %d and released %d; %d consume entries spent %d",
				r.ID, r.Status, r.Amount, r.Drawn, r.Captured, r.Released, r.Entries, r.Spent)})
	}
	return out, 0, nil
}

// CheckOverdueHolds is the Checker for a live system: no active hold is
// still active more than OverdueHoldGrace past its expiry by the
// database's clock, which the sweeper would have prevented. (The built-in
// checks do not use the clock, so they also hold for tests that set one.)
func CheckOverdueHolds(ctx context.Context, tx *gorm.DB) ([]VerifyProblem, int64, error) {
	type row struct {
		ID, CustomerID string
		Amount         int64
		ExpiresAt      time.Time
	}
	var rows []row
	err := tx.WithContext(ctx).Raw(`SELECT id, customer_id, amount, expires_at FROM credit_holds
		WHERE status = 'active' AND expires_at < now() - make_interval(secs => ?)
		ORDER BY customer_id, id`, OverdueHoldGrace.Seconds()).Scan(&rows).Error
	if err != nil {
		return nil, 0, err
	}
	var out []VerifyProblem
	for _, r := range rows {
		out = append(out, VerifyProblem{Kind: ProblemOverdueHold, CustomerID: r.CustomerID,
			Detail: fmt.Sprintf("hold %s of %d expired at %s and is still active after more than %s: is the sweeper running?",
				r.ID, r.Amount, r.ExpiresAt.UTC().Format(time.RFC3339), OverdueHoldGrace)})
	}
	return out, 0, nil
}

// receivables lists the customers with open shortfalls (what holds have
// not paid of them), largest first.
func receivables(ctx context.Context, tx *gorm.DB) ([]Receivable, error) {
	var out []Receivable
	err := tx.WithContext(ctx).Raw(`SELECT customer_id, sum(amount - recovered)::bigint AS shortfall, count(*) AS revokes
		FROM credit_shortfalls WHERE settled_at IS NULL
		GROUP BY customer_id ORDER BY shortfall DESC, customer_id`).Scan(&out).Error
	return out, err
}

// PurchaseGrantCounts returns, per payment id, how many purchase grants
// exist (payments' verify check compares it with succeeded payments). gdb
// may be a transaction, such as the snapshot a Checker receives.
// Errors: errs.Unavailable.
func PurchaseGrantCounts(ctx context.Context, gdb *gorm.DB) (map[string]int, error) {
	type row struct {
		PaymentID string
		N         int
	}
	var rows []row
	err := gdb.WithContext(ctx).Raw(`SELECT payment_id, count(*) AS n FROM credit_grants
		WHERE source = 'purchase' AND payment_id IS NOT NULL GROUP BY payment_id`).Scan(&rows).Error
	if err != nil {
		return nil, db.Translate(err, nil)
	}
	out := make(map[string]int, len(rows))
	for _, r := range rows {
		out[r.PaymentID] = r.N
	}
	return out, nil
}
