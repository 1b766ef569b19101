package credits

import (
	"context"
	"errors"
	"fmt"
	"time"

	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/catalog"
	"github.com/tallybilling/tally/internal/customers"
	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/errs"
	"github.com/tallybilling/tally/internal/events"
)

// An operator's corrections: voiding a grant given by mistake, and
// adjusting a balance either way. Both are ledger entries with a reason
// and the Idempotency-Key of the request: the audit trail.

// VoidInput voids a grant.
type VoidInput struct {
	CustomerID string
	GrantID    string
	Reason     string
}

// VoidResult is the answer to a void.
type VoidResult struct {
	GrantID string `json:"grant_id"`
	// Voided is what was taken now: what the grant had left and no hold
	// kept. What holds keep goes the same way when they release it.
	Voided int64 `json:"voided"`
	// TransactionID is the void entry, "" when Voided is 0.
	TransactionID string `json:"transaction_id,omitempty"`
	Balance       int64  `json:"balance"`
}

// Void ends a grant: what it has left and is not held is taken with a
// void ledger entry and credits.voided, and credits holds keep of it are
// voided when released (a capture may still spend them). In one
// transaction guarded by key.
//
// Errors: errs.Invalid (bad input, missing key); errs.NotFound (no such
// grant of this customer); errs.Conflict (already voided, or nothing left
// to void: spent or expired); errs.IdempotencyKeyReused; errs.Unavailable.
func (s *Service) Void(ctx context.Context, in VoidInput, key db.IdempotencyKey) (VoidResult, bool, error) {
	if err := customers.ValidateID(in.CustomerID); err != nil {
		return VoidResult{}, false, err
	}
	if err := validateReason(in.Reason); err != nil {
		return VoidResult{}, false, err
	}
	return once(ctx, s, key, "void", func(tx *gorm.DB, threshold *int64) (VoidResult, error) {
		return void(ctx, tx, s.now, in, threshold, key.Key, s.topUp)
	})
}

func void(ctx context.Context, tx *gorm.DB, clock func() time.Time, in VoidInput, defaultThreshold *int64, idemKey string, topUp TopUpFunc) (VoidResult, error) {
	notFound := errs.E(errs.NotFound, "no grant %s for customer %s", in.GrantID, in.CustomerID)
	a, found, err := lockAccount(ctx, tx, in.CustomerID, clock, defaultThreshold)
	if err != nil {
		return VoidResult{}, err
	}
	if found {
		a.topUp = topUp
	}
	if !found {
		if _, err := customers.Get(ctx, tx, in.CustomerID); err != nil {
			return VoidResult{}, err
		}
		return VoidResult{}, notFound
	}
	var g grantRow
	err = tx.WithContext(ctx).Where("id = ? AND customer_id = ?", in.GrantID, in.CustomerID).Take(&g).Error
	if errors.Is(err, gorm.ErrRecordNotFound) {
		return VoidResult{}, notFound
	}
	if err != nil {
		return VoidResult{}, err
	}
	switch {
	case g.VoidedAt != nil:
		return VoidResult{}, errs.E(errs.Conflict, "grant %s is already voided", g.ID)
	case g.Remaining == 0:
		return VoidResult{}, errs.E(errs.Conflict, "grant %s has nothing left to void (spent or expired)", g.ID)
	}
	res := VoidResult{GrantID: g.ID}
	fire := false
	if g.Remaining > g.Held {
		res.Voided = g.Remaining - g.Held
		if res.TransactionID, err = a.voidRest(ctx, tx, g.ID, res.Voided, in.Reason, nil, idemKey); err != nil {
			return VoidResult{}, err
		}
		if g.EffectiveAt != nil && g.EffectiveAt.After(a.now) {
			// Scheduled credits were not available: what is available stays.
			a.pending -= res.Voided
		}
		fire = a.lowBalance(true)
	} else {
		// Everything left is held: mark the grant; releases void the rest.
		if err := tx.WithContext(ctx).Model(&grantRow{}).Where("id = ?", g.ID).Update("voided_at", a.now).Error; err != nil {
			return VoidResult{}, err
		}
		if err := events.Append(ctx, tx, in.CustomerID, events.CreditsVoided{
			CustomerID: in.CustomerID, GrantID: g.ID, Balance: a.balance, Reason: in.Reason,
		}); err != nil {
			return VoidResult{}, err
		}
	}
	if err := a.save(ctx, tx); err != nil {
		return VoidResult{}, err
	}
	if err := a.afterLowering(ctx, tx, fire); err != nil {
		return VoidResult{}, err
	}
	res.Balance = a.balance
	return res, nil
}

// voidRest takes n unheld credits of grant grantID with a void entry and
// credits.voided, marks the grant voided, and lowers a.balance; the caller
// saves the account and runs afterLowering. It returns the entry's id.
func (a *account) voidRest(ctx context.Context, tx *gorm.DB, grantID string, n int64, reason string, metadata map[string]string, idemKey string) (string, error) {
	res := tx.WithContext(ctx).Exec(`UPDATE credit_grants SET remaining = remaining - ?, voided = voided + ?,
		voided_at = COALESCE(voided_at, ?) WHERE id = ? AND remaining - held >= ?`, n, n, a.now, grantID, n)
	if res.Error != nil {
		return "", res.Error
	}
	if res.RowsAffected != 1 {
		return "", fmt.Errorf("credits: void of %d from grant %s: not that much unheld", n, grantID)
	}
	a.balance -= n
	txID := db.NewID("ctx")
	if err := insertEntry(ctx, tx, entryRow{
		ID: txID, CustomerID: a.customerID, Kind: KindVoid, Amount: -n, BalanceAfter: a.balance,
		Reason: reason, Metadata: metadata, GrantID: &grantID, IdempotencyKey: db.NullIfEmpty(idemKey), CreatedAt: a.now,
	}); err != nil {
		return "", err
	}
	return txID, events.Append(ctx, tx, a.customerID, events.CreditsVoided{
		CustomerID: a.customerID, GrantID: grantID, Amount: n, TransactionID: txID, Balance: a.balance, Reason: reason,
	})
}

// AdjustInput is an operator's correction of a balance.
type AdjustInput struct {
	CustomerID string
	// Amount is non-zero: positive adds a grant, negative draws like a
	// consume.
	Amount int64
	Reason string
	// ExpiresAt is for a positive adjustment's grant (nil: never).
	ExpiresAt *time.Time
	Metadata  map[string]string
}

// AdjustResult is the answer to an adjustment.
type AdjustResult struct {
	TransactionID string `json:"transaction_id"`
	Amount        int64  `json:"amount"`
	Balance       int64  `json:"balance"`
	// GrantID is the positive adjustment's grant.
	GrantID string `json:"grant_id,omitempty"`
}

// Adjust writes an adjust ledger entry: a positive one adds a grant
// (promotional, default priority; the customer is created if missing), a
// negative one draws what is available like a consume. In one transaction
// guarded by key.
//
// Errors: errs.Invalid (zero or too large an amount, an expiry on a
// negative adjustment, missing key); errs.NotFound (negative, for an
// unknown customer); errs.InsufficientCredits; errs.IdempotencyKeyReused;
// errs.Unavailable.
func (s *Service) Adjust(ctx context.Context, in AdjustInput, key db.IdempotencyKey) (AdjustResult, bool, error) {
	if in.Amount == 0 || in.Amount < -catalog.MaxCreditsPerMove || in.Amount > catalog.MaxCreditsPerMove {
		return AdjustResult{}, false, errs.InvalidField("/amount", fmt.Sprintf("amount must be a non-zero whole number from -%d to %d",
			int64(catalog.MaxCreditsPerMove), int64(catalog.MaxCreditsPerMove)))
	}
	if in.Amount < 0 && in.ExpiresAt != nil {
		return AdjustResult{}, false, errs.InvalidField("/expires_at", "expires_at is for positive adjustments only")
	}
	if in.Amount > 0 {
		gi := GrantInput{CustomerID: in.CustomerID, Amount: in.Amount, Reason: in.Reason, Source: SourceService,
			ExpiresAt: in.ExpiresAt, Metadata: in.Metadata}
		if err := gi.Validate(); err != nil {
			return AdjustResult{}, false, err
		}
		return once(ctx, s, key, "adjust", func(tx *gorm.DB, threshold *int64) (AdjustResult, error) {
			if err := validateTimes(gi, s.now()); err != nil {
				return AdjustResult{}, err
			}
			r, err := grantTx(ctx, tx, s.now, gi, KindAdjust, threshold, key.Key, nil)
			if err != nil {
				return AdjustResult{}, db.Translate(err, grantConstraints)
			}
			return AdjustResult{TransactionID: r.TransactionID, Amount: r.Amount, Balance: r.Balance, GrantID: r.GrantID}, nil
		})
	}
	ci := ConsumeInput{CustomerID: in.CustomerID, Amount: -in.Amount, Reason: in.Reason, Metadata: in.Metadata}
	if err := ci.Validate(); err != nil {
		return AdjustResult{}, false, err
	}
	return once(ctx, s, key, "adjust", func(tx *gorm.DB, threshold *int64) (AdjustResult, error) {
		r, err := spend(ctx, tx, s.now, ci, KindAdjust, threshold, key.Key, s.topUp)
		if err != nil {
			return AdjustResult{}, err
		}
		if err := events.Append(ctx, tx, in.CustomerID, events.CreditsAdjusted{
			CustomerID: in.CustomerID, TransactionID: r.TransactionID, Amount: in.Amount, Balance: r.Balance, Reason: in.Reason,
		}); err != nil {
			return AdjustResult{}, err
		}
		return AdjustResult{TransactionID: r.TransactionID, Amount: in.Amount, Balance: r.Balance}, nil
	})
}

// CheckResult says whether a customer may spend Amount now.
type CheckResult struct {
	Allowed   bool
	Amount    int64
	Balance   int64
	Available int64
}

// Check says whether the customer could spend amount now, without writing
// anything: the gate a product calls before starting work. (A consume a
// moment later may still be refused: the check reserves nothing; a hold
// does.)
//
// Errors: errs.Invalid, errs.NotFound, errs.Unavailable.
func (s *Service) Check(ctx context.Context, customerID string, amount int64) (CheckResult, error) {
	if err := validateAmount(amount); err != nil {
		return CheckResult{}, err
	}
	b, err := s.Balance(ctx, customerID)
	if err != nil {
		return CheckResult{}, err
	}
	return CheckResult{Allowed: b.Available >= amount, Amount: amount, Balance: b.Balance, Available: b.Available}, nil
}

// BalanceAt is the customer's balance as the ledger stood at a time.
type BalanceAt struct {
	CustomerID string
	At         time.Time
	Balance    int64
}

// BalanceAt returns the balance after the customer's last ledger entry at
// or before at (0 before the first). A customer's ledger times follow its
// sequence, so that entry is the one the balance stood at.
//
// Errors: errs.Invalid (at in the future), errs.NotFound, errs.Unavailable.
func (s *Service) BalanceAt(ctx context.Context, customerID string, at time.Time) (BalanceAt, error) {
	if err := customers.ValidateID(customerID); err != nil {
		return BalanceAt{}, err
	}
	if at.After(s.now()) {
		return BalanceAt{}, errs.InvalidField("at", "at must not be in the future")
	}
	if _, err := customers.Get(ctx, s.db, customerID); err != nil {
		return BalanceAt{}, err
	}
	var balance int64
	err := s.db.WithContext(ctx).Raw(`SELECT COALESCE((SELECT balance_after FROM credit_ledger
		WHERE customer_id = ? AND created_at <= ? ORDER BY created_at DESC, seq DESC LIMIT 1), 0)`, customerID, at).Scan(&balance).Error
	if err != nil {
		return BalanceAt{}, db.Translate(err, nil)
	}
	return BalanceAt{CustomerID: customerID, At: at.UTC(), Balance: balance}, nil
}
