package credits

import (
	"context"
	"database/sql"
	"slices"
	"time"

	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/customers"
	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/errs"
	"github.com/tallybilling/tally/internal/events"
)

var grantConstraints = map[string]errs.Code{
	"credit_grants_payment_id_key": errs.Conflict,
}

// Grant adds credits inside the caller's transaction tx: payments calls it in
// the same transaction as the payment's transition, so the payment and its
// credits commit or vanish together. It creates the customer if missing,
// appends a grant ledger entry and credits.granted, and re-arms the
// low-balance notice when the balance is back at or above the threshold.
// The entry's time is read from clock once the customer's balance row is
// locked, so that ledger times follow the ledger's order.
//
// Errors: errs.Invalid for bad input (including an ExpiresAt not after now);
// errs.Conflict for a second purchase grant of the same PaymentID (the
// schema's backstop behind payments' idempotency table; PostgreSQL has then
// aborted tx, so the caller must roll back); errs.Unavailable.
func Grant(ctx context.Context, tx *gorm.DB, clock func() time.Time, in GrantInput) (GrantResult, error) {
	return grant(ctx, tx, clock, in, nil, "", nil)
}

// GrantThen is Grant, and appends then (an event about the same customer,
// such as payments' payment.succeeded) right after credits.granted, in the
// statement that writes the grant: one round trip less than an
// events.Append after Grant, with the same order in the feed.
func GrantThen(ctx context.Context, tx *gorm.DB, clock func() time.Time, in GrantInput, then events.Payload) (GrantResult, error) {
	return grant(ctx, tx, clock, in, nil, "", then)
}

func grant(ctx context.Context, tx *gorm.DB, clock func() time.Time, in GrantInput, defaultThreshold *int64, idemKey string, then events.Payload) (GrantResult, error) {
	if err := in.Validate(); err != nil {
		return GrantResult{}, err
	}
	// Checked before any write; grantTx checks again with the time it
	// stamps the grant with.
	if err := validateTimes(in, clock()); err != nil {
		return GrantResult{}, err
	}
	res, err := grantTx(ctx, tx, clock, in, KindGrant, defaultThreshold, idemKey, then)
	return res, db.Translate(err, grantConstraints)
}

func validateExpiry(at *time.Time, now time.Time) error {
	if at != nil && !at.After(now) {
		return errs.InvalidField("/expires_at", "expires_at must be in the future")
	}
	return nil
}

// validateTimes checks a grant's expiry and schedule against now.
func validateTimes(in GrantInput, now time.Time) error {
	if err := validateExpiry(in.ExpiresAt, now); err != nil {
		return err
	}
	if in.EffectiveAt != nil && !in.EffectiveAt.After(now) {
		return errs.InvalidField("/effective_at", "effective_at must be in the future; omit it for credits spendable at once")
	}
	return nil
}

// grantTx writes the grant and its ledger entry of kind (grant, or adjust
// for a positive adjustment, which announces itself as credits.adjusted
// instead of credits.granted).
func grantTx(ctx context.Context, tx *gorm.DB, clock func() time.Time, in GrantInput, kind string, defaultThreshold *int64, idemKey string, then events.Payload) (GrantResult, error) {
	// The balance row first: when it exists, so does the customer (its
	// foreign key), and the two inserts that create them (each a round
	// trip) are needed only for a customer's first grant.
	a, found, err := lockAccount(ctx, tx, in.CustomerID, clock, defaultThreshold)
	if err != nil {
		return GrantResult{}, err
	}
	if !found {
		if _, err := customers.Ensure(ctx, tx, in.CustomerID, clock()); err != nil {
			return GrantResult{}, err
		}
		if a, err = ensureAccount(ctx, tx, in.CustomerID, clock, defaultThreshold); err != nil {
			return GrantResult{}, err
		}
	}
	now := a.now
	if err := validateTimes(in, now); err != nil {
		return GrantResult{}, err
	}
	var effectiveAt *time.Time
	if in.EffectiveAt != nil {
		t := in.EffectiveAt.UTC()
		effectiveAt = &t
	}
	meta, err := metadataJSON(in.Metadata)
	if err != nil {
		return GrantResult{}, err
	}
	var expiresAt *time.Time
	if in.ExpiresAt != nil {
		t := in.ExpiresAt.UTC()
		expiresAt = &t
	}
	grantID := db.NewID("grt")
	a.balance += in.Amount
	if effectiveAt != nil && effectiveAt.After(now) {
		a.pending += in.Amount
	}
	if expiresAt != nil && (!a.nextExpiry.Valid || expiresAt.Before(a.nextExpiry.Time)) {
		a.nextExpiry = sql.NullTime{Time: *expiresAt, Valid: true}
	}
	a.lowBalance(false)
	txID := db.NewID("ctx")
	var key *string
	if idemKey != "" {
		key = &idemKey
	}
	var ev events.Payload = events.CreditsGranted{
		CustomerID: in.CustomerID, GrantID: grantID, TransactionID: txID, Amount: in.Amount, Balance: a.balance,
		Source: string(in.Source), Reason: in.Reason, ExpiresAt: expiresAt, PaymentID: in.PaymentID,
		Priority: in.priority(), Category: in.category(), EffectiveAt: effectiveAt,
	}
	if kind == KindAdjust {
		ev = events.CreditsAdjusted{CustomerID: in.CustomerID, TransactionID: txID, Amount: in.Amount, Balance: a.balance,
			Reason: in.Reason, GrantID: grantID}
	}
	evType, evData, err := events.Encode(ev)
	if err != nil {
		return GrantResult{}, err
	}
	// The event rows: the grant's, then the caller's (GrantThen), in one
	// VALUES list, whose rows are inserted, and their ids drawn, in order.
	query, eventArgs := grantQuery, []any{evType, in.CustomerID, evData}
	if then != nil {
		thenType, thenData, err := events.Encode(then)
		if err != nil {
			return GrantResult{}, err
		}
		query = grantThenQuery
		eventArgs = append(eventArgs, thenType, in.CustomerID, thenData)
	}
	_, err = db.ExecDirect(ctx, tx, query,
		slices.Concat([]any{grantID, in.CustomerID, in.Amount, in.Amount, string(in.Source), db.NullIfEmpty(in.PaymentID), in.Reason, meta,
			expiresAt, now, in.priority(), in.category(), effectiveAt,
			txID, in.CustomerID, kind, in.Amount, a.balance, in.Reason, meta, grantID, db.NullIfEmpty(in.PaymentID),
			key, now},
			[]any{a.balance, a.nextExpiry, a.notified, a.held, a.nextHoldExpiry, a.defaultThreshold, a.now, in.CustomerID},
			eventArgs)...)
	if err != nil {
		return GrantResult{}, db.Translate(err, grantConstraints)
	}
	return GrantResult{TransactionID: txID, GrantID: grantID, Amount: in.Amount, Balance: a.balance, ExpiresAt: expiresAt,
		Priority: in.priority(), Category: in.category(), EffectiveAt: effectiveAt}, nil
}

// grantTx's statement: the grant, its ledger entry, its event and the
// balance in one statement (one round trip instead of four), with the
// same rows and columns as the grant, insertEntry, events.Append and
// account.save write: the ledger entry's foreign key to the grant is
// checked at the end of the statement, once both exist, and the event
// follows the entry in the feed as before (ids are drawn in the order
// written). grantThenQuery appends the caller's event (GrantThen) after
// the grant's, in one VALUES list, whose rows are inserted, and their ids
// drawn, in order. Direct statements (db.ExecDirect): every purchase runs
// one, and gorm wrote its text out again at each call.
const (
	grantQueryHead = `WITH grant_row AS (
			INSERT INTO credit_grants (id, customer_id, amount, remaining, source, payment_id, reason, metadata,
				expires_at, created_at, priority, category, effective_at)
			VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
		), entry AS (
			INSERT INTO credit_ledger (id, customer_id, kind, amount, balance_after, reason, metadata, grant_id, payment_id,
				idempotency_key, created_at)
			VALUES ($14, $15, $16, $17, $18, $19, $20, $21, $22, $23, $24)
		), event AS (
			INSERT INTO events (type, customer_id, data) VALUES ($33, $34, $35)`
	grantQueryTail = `
		)
		UPDATE credit_balances SET balance = $25, next_expiry = $26, low_balance_notified = $27, held = $28, next_hold_expiry = $29,
			default_low_balance_threshold = COALESCE($30::bigint, default_low_balance_threshold), updated_at = $31
		WHERE customer_id = $32`
	grantQuery     = grantQueryHead + grantQueryTail
	grantThenQuery = grantQueryHead + `, ($36, $37, $38)` + grantQueryTail
)

// grantAnswer is a GrantResult as stored for idempotent replay.
type grantAnswer struct {
	TransactionID string     `json:"transaction_id"`
	GrantID       string     `json:"grant_id"`
	Amount        int64      `json:"amount"`
	Balance       int64      `json:"balance"`
	ExpiresAt     *time.Time `json:"expires_at,omitempty"`
	Priority      int        `json:"priority"`
	Category      string     `json:"category"`
	EffectiveAt   *time.Time `json:"effective_at,omitempty"`
}

// Grant adds credits for an HTTP request (source service unless in says
// otherwise), in its own transaction guarded by key: the same key and
// request replays the first answer with replayed=true; a concurrent
// duplicate waits for the first and replays it.
//
// Errors: errs.Invalid (bad input, missing key), errs.IdempotencyKeyReused,
// errs.Conflict, errs.Unavailable.
func (s *Service) Grant(ctx context.Context, in GrantInput, key db.IdempotencyKey) (GrantResult, bool, error) {
	if in.Source == "" {
		in.Source = SourceService
	}
	if err := in.Validate(); err != nil {
		return GrantResult{}, false, err
	}
	// expires_at is checked inside Once (by grant), not here: a retry of a
	// grant whose expiry has passed since must still replay its first answer.
	a, replayed, err := once(ctx, s, key, "grant", func(tx *gorm.DB, threshold *int64) (grantAnswer, error) {
		r, err := grant(ctx, tx, s.now, in, threshold, key.Key, nil)
		return grantAnswer(r), err
	})
	if err != nil {
		return GrantResult{}, false, err
	}
	return GrantResult(a), replayed, nil
}
