package credits

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"strconv"
	"time"

	"github.com/tallybilling/tally/internal/customers"
	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/errs"
)

// Balance returns the customer's spendable credits now: the unspent
// remainder of grants whose expiry instant has not passed (whether or not
// the sweeper has recorded the expiry yet), with those grants soonest expiry
// first. A known customer without grants has balance 0.
//
// Errors: errs.Invalid for a malformed id, errs.NotFound for an unknown
// customer, errs.Unavailable.
func (s *Service) Balance(ctx context.Context, customerID string) (Balance, error) {
	if err := customers.ValidateID(customerID); err != nil {
		return Balance{}, err
	}
	c, err := customers.Get(ctx, s.db, customerID)
	if err != nil {
		return Balance{}, err
	}
	now := s.now()
	type row struct {
		ID        string
		Amount    int64
		Remaining int64
		Source    string
		PaymentID *string
		ExpiresAt *time.Time
		CreatedAt time.Time
	}
	var rows []row
	err = s.db.WithContext(ctx).Model(&grantRow{}).
		Where("customer_id = ? AND remaining > 0 AND (expires_at IS NULL OR expires_at > ?)", customerID, now).
		Order("expires_at NULLS LAST, created_at, id").Find(&rows).Error
	if err != nil {
		return Balance{}, db.Translate(err, nil)
	}
	b := Balance{CustomerID: customerID, Grants: make([]GrantSummary, 0, len(rows)), LowBalanceThreshold: s.cfg.DefaultLowBalanceThreshold}
	if c.LowBalanceThreshold != nil {
		b.LowBalanceThreshold = *c.LowBalanceThreshold
	}
	for _, r := range rows {
		g := GrantSummary{ID: r.ID, Amount: r.Amount, Remaining: r.Remaining, Source: Source(r.Source), CreatedAt: r.CreatedAt.UTC()}
		if r.PaymentID != nil {
			g.PaymentID = *r.PaymentID
		}
		if r.ExpiresAt != nil {
			t := r.ExpiresAt.UTC()
			g.ExpiresAt = &t
			switch {
			case b.NextExpiry == nil:
				b.NextExpiry = &t
				n := r.Remaining
				b.NextExpiryAmount = &n
			case b.NextExpiry.Equal(t):
				*b.NextExpiryAmount += r.Remaining
			}
		}
		b.Balance += r.Remaining
		b.Grants = append(b.Grants, g)
	}
	return b, nil
}

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
