package credits

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"strconv"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/tallybilling/tally/internal/customers"
	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/errs"
)

// Balance returns the customer's credits now: what it owns (the unspent
// remainder of grants whose expiry instant has not passed, whether or not
// the sweeper has recorded the expiry yet, plus what active holds keep),
// what of that is held and pending, and what is available, with the grants
// in draw order. A hold past its expires_at counts as released, as the
// next write to the customer will record. A known customer without grants
// has balance 0.
//
// Errors: errs.Invalid for a malformed id, errs.NotFound for an unknown
// customer, errs.Unavailable.
func (s *Service) Balance(ctx context.Context, customerID string) (Balance, error) {
	if err := customers.ValidateID(customerID); err != nil {
		return Balance{}, err
	}
	now := s.now()
	type row struct {
		ID          string
		Amount      int64
		Remaining   int64
		LiveHeld    int64
		Source      string
		PaymentID   *string
		ExpiresAt   *time.Time
		Priority    int
		Category    string
		EffectiveAt *time.Time
		VoidedAt    *time.Time
		CreatedAt   time.Time
	}
	var (
		rows      []row
		known     bool
		threshold *int64
		// liveDraws is what the customer's live holds draw, one list per
		// hold (NULL without one), repeated on every row.
		liveDraws []byte
	)
	// One statement answers whether the customer exists, its threshold, its
	// grants and what its live holds draw: a customer row with no grant
	// comes back once with a NULL grant id, an unknown customer as no row.
	// It is the hottest read of the service, so it takes the pgx connection
	// beneath gorm's pool (db.Pgx says why).
	err := db.Pgx(ctx, s.db, func(conn *pgx.Conn) error {
		rs, err := conn.Query(ctx, balanceSQL, customerID, now)
		if err != nil {
			return err
		}
		defer rs.Close()
		for rs.Next() {
			var (
				r  row
				id *string
				// The grant's non-null columns are NULL when the customer has no grant.
				amount, remaining *int64
				source, category  *string
				priority          *int
				createdAt         *time.Time
			)
			if err := rs.Scan(&threshold, &liveDraws, &id, &amount, &remaining, &source, &r.PaymentID, &r.ExpiresAt,
				&priority, &category, &r.EffectiveAt, &r.VoidedAt, &createdAt); err != nil {
				return err
			}
			known = true
			if id == nil {
				continue
			}
			r.ID, r.Amount, r.Remaining, r.Source, r.Priority, r.Category, r.CreatedAt =
				*id, *amount, *remaining, *source, *priority, *category, *createdAt
			rows = append(rows, r)
		}
		return rs.Err()
	})
	if err != nil {
		return Balance{}, db.Translate(err, nil)
	}
	if !known {
		return Balance{}, errs.E(errs.NotFound, "customer %s not found", customerID)
	}
	if liveDraws != nil {
		var holds [][]Draw
		if err := json.Unmarshal(liveDraws, &holds); err != nil {
			return Balance{}, fmt.Errorf("credits: draws of the live holds of %s: %w", customerID, err)
		}
		held := map[string]int64{}
		for _, draws := range holds {
			for _, d := range draws {
				held[d.GrantID] += d.Amount
			}
		}
		for i := range rows {
			rows[i].LiveHeld = held[rows[i].ID]
		}
	}
	b := Balance{CustomerID: customerID, Grants: make([]GrantSummary, 0, len(rows)), LowBalanceThreshold: s.cfg.DefaultLowBalanceThreshold}
	if threshold != nil {
		b.LowBalanceThreshold = *threshold
	}
	for _, r := range rows {
		owned := r.Remaining
		if r.VoidedAt != nil || (r.ExpiresAt != nil && !r.ExpiresAt.After(now)) {
			// A dead grant keeps only what live holds keep of it.
			owned = r.LiveHeld
		}
		if owned == 0 {
			continue
		}
		g := GrantSummary{ID: r.ID, Amount: r.Amount, Remaining: owned, Held: r.LiveHeld, Source: Source(r.Source),
			Priority: r.Priority, Category: r.Category, CreatedAt: r.CreatedAt.UTC()}
		if r.PaymentID != nil {
			g.PaymentID = *r.PaymentID
		}
		if r.EffectiveAt != nil {
			t := r.EffectiveAt.UTC()
			g.EffectiveAt = &t
			if t.After(now) {
				b.Pending += owned
			}
		}
		if r.ExpiresAt != nil {
			t := r.ExpiresAt.UTC()
			g.ExpiresAt = &t
			if free := owned - r.LiveHeld; free > 0 && t.After(now) {
				switch {
				case b.NextExpiry == nil || t.Before(*b.NextExpiry):
					b.NextExpiry = &t
					b.NextExpiryAmount = &free
				case b.NextExpiry.Equal(t):
					*b.NextExpiryAmount += free
				}
			}
		}
		b.Balance += owned
		b.Held += r.LiveHeld
		b.Grants = append(b.Grants, g)
	}
	b.Available = b.Balance - b.Held - b.Pending
	return b, nil
}

// balanceSQL is Balance's statement: $1 the customer, $2 now. The live
// holds' draws come back as they are stored, from a subquery PostgreSQL
// runs once, and are summed per grant in Go: joining them to the grants in
// SQL (an aggregate, a hash join and a sort of the holds' draws) cost
// PostgreSQL about a third more per read with no hold at all, 94 to 110 µs
// a read against 71 to 77 (pgbench, one client; BENCHMARKS.md).
const balanceSQL = `
	SELECT c.low_balance_threshold,
	       (SELECT jsonb_agg(h.draws) FROM credit_holds h
	        WHERE h.customer_id = $1 AND h.status = 'active' AND h.expires_at > $2),
	       g.id, g.amount, g.remaining, g.source, g.payment_id, g.expires_at,
	       g.priority, g.category, g.effective_at, g.voided_at, g.created_at
	FROM customers c
	LEFT JOIN credit_grants g ON g.customer_id = c.id AND g.remaining > 0
	WHERE c.id = $1
	ORDER BY g.priority, g.expires_at NULLS LAST, g.created_at, g.id`

// Ledger returns a page of the customer's ledger, newest first, starting
// after cursor ("" for the newest entry), limit (1..500) at a time.
//
// Errors: errs.Invalid for a malformed cursor or a limit outside 1..500,
// errs.NotFound for an unknown customer, errs.Unavailable.
func (s *Service) Ledger(ctx context.Context, customerID, cursor string, limit int) (LedgerPage, error) {
	if err := customers.ValidateID(customerID); err != nil {
		return LedgerPage{}, err
	}
	if err := db.CheckPageSize(limit); err != nil {
		return LedgerPage{}, err
	}
	before, err := parseCursor(cursor)
	if err != nil {
		return LedgerPage{}, err
	}
	var rows []ledgerRow
	err = s.db.WithContext(ctx).Where("customer_id = ? AND seq < ?", customerID, before).
		Order("seq DESC").Limit(limit + 1).Find(&rows).Error
	if err != nil {
		return LedgerPage{}, db.Translate(err, nil)
	}
	if len(rows) == 0 {
		// An empty page of a known customer is fine; of an unknown one, 404.
		if _, err := customers.Get(ctx, s.db, customerID); err != nil {
			return LedgerPage{}, err
		}
	}
	page := LedgerPage{Entries: make([]LedgerEntry, 0, min(len(rows), limit))}
	for i, r := range rows {
		if i == limit {
			page.NextCursor = formatCursor(rows[i-1].Seq)
			break
		}
		e := LedgerEntry{ID: r.ID, Kind: r.Kind, Amount: r.Amount, BalanceAfter: r.BalanceAfter, Reason: r.Reason, CreatedAt: r.CreatedAt.UTC()}
		if err := json.Unmarshal([]byte(r.Metadata), &e.Metadata); err != nil {
			return LedgerPage{}, fmt.Errorf("credits: metadata of ledger entry %s: %w", r.ID, err)
		}
		if r.GrantID != nil {
			e.GrantID = *r.GrantID
		}
		if r.PaymentID != nil {
			e.PaymentID = *r.PaymentID
		}
		if r.Shortfall != nil {
			e.Shortfall = *r.Shortfall
		}
		if r.HoldID != nil {
			e.HoldID = *r.HoldID
		}
		if r.Draws != nil {
			if err := json.Unmarshal([]byte(*r.Draws), &e.Draws); err != nil {
				return LedgerPage{}, fmt.Errorf("credits: draws of ledger entry %s: %w", r.ID, err)
			}
		}
		page.Entries = append(page.Entries, e)
	}
	return page, nil
}

// Cursors are the opaque form of the last seen ledger seq.
const cursorPrefix = "l1."

func formatCursor(seq int64) string {
	return base64.RawURLEncoding.EncodeToString([]byte(cursorPrefix + strconv.FormatInt(seq, 10)))
}

// parseCursor decodes a cursor made by formatCursor; "" is the newest entry.
func parseCursor(c string) (int64, error) {
	if c == "" {
		return int64(^uint64(0) >> 1), nil
	}
	bad := errs.InvalidField("cursor", "malformed cursor; pass back a next_cursor returned by this list")
	raw, err := base64.RawURLEncoding.DecodeString(c)
	if err != nil || len(raw) <= len(cursorPrefix) || string(raw[:len(cursorPrefix)]) != cursorPrefix {
		return 0, bad
	}
	seq, err := strconv.ParseInt(string(raw[len(cursorPrefix):]), 10, 64)
	if err != nil || seq < 1 {
		return 0, bad
	}
	return seq, nil
}
