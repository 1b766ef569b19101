package credits

import (
	"context"
	"database/sql"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/customers"
	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/errs"
	"github.com/tallybilling/tally/internal/events"
)

// A hold reserves credits for a job whose cost is known only at its end: it
// takes them from grants at once, in draw order, and keeps them (they stay
// in the balance, the customer owns them, but are not available to consume,
// hold again, void or expire) until it is captured, released, or expires.

// Hold statuses.
const (
	HoldActive   = "active"
	HoldCaptured = "captured"
	HoldReleased = "released"
	HoldExpired  = "expired"
)

// Hold lifetimes (openapi.yaml: HoldRequest.expires_in_seconds).
const (
	DefaultHoldLifetime = time.Hour
	MaxHoldLifetime     = 7 * 24 * time.Hour
)

// HoldInput reserves credits.
type HoldInput struct {
	CustomerID string
	Amount     int64
	Reason     string
	// ExpiresIn is how long the hold lasts unless captured or released:
	// 0 for DefaultHoldLifetime, else whole seconds from 1s to
	// MaxHoldLifetime.
	ExpiresIn time.Duration
	Metadata  map[string]string
}

// Validate checks the input without touching the database.
// Errors: errs.Invalid naming the offending field.
func (in HoldInput) Validate() error {
	if err := validateMove(in.CustomerID, in.Amount, in.Reason, in.Metadata); err != nil {
		return err
	}
	if in.ExpiresIn != 0 && (in.ExpiresIn < time.Second || in.ExpiresIn > MaxHoldLifetime || in.ExpiresIn%time.Second != 0) {
		return errs.InvalidField("/expires_in_seconds", "expires_in_seconds must be a whole number from 1 to 604800")
	}
	return nil
}

// Hold is a reservation of credits.
type Hold struct {
	ID         string
	CustomerID string
	Amount     int64
	// Status is HoldActive, HoldCaptured, HoldReleased or HoldExpired.
	Status   string
	Reason   string
	Metadata map[string]string
	// Draws are what the hold keeps (kept, while active) of each grant.
	Draws []Draw
	// Captured and Released account for Amount once the hold has ended.
	Captured int64
	Released int64
	// TransactionID is the capture's consume entry ("" when none).
	TransactionID string
	ExpiresAt     time.Time
	CreatedAt     time.Time
	EndedAt       *time.Time
}

// HoldResult is the answer to a new hold.
type HoldResult struct {
	HoldID    string    `json:"hold_id"`
	Amount    int64     `json:"amount"`
	Status    string    `json:"status"`
	ExpiresAt time.Time `json:"expires_at"`
	// Balance is what the customer owns (unchanged by a hold); Available
	// what it may still spend or hold.
	Balance   int64 `json:"balance"`
	Available int64 `json:"available"`
}

// CaptureInput spends from a hold. Amount nil captures all of it.
type CaptureInput struct {
	CustomerID string
	HoldID     string
	Amount     *int64
}

// HoldEnd is the answer to a capture or a release.
type HoldEnd struct {
	HoldID   string `json:"hold_id"`
	Status   string `json:"status"`
	Captured int64  `json:"captured"`
	Released int64  `json:"released"`
	// TransactionID is the capture's consume entry ("" when it captured
	// nothing, and for a release).
	TransactionID string `json:"transaction_id,omitempty"`
	Balance       int64  `json:"balance"`
	Available     int64  `json:"available"`
}

// HoldPage is one page of a customer's holds, newest first.
type HoldPage struct {
	Holds      []Hold
	NextCursor string
}

// Hold reserves in.Amount of the customer's available credits, in draw
// order, in one transaction guarded by key (replays as Consume does).
//
// Errors: errs.Invalid (bad input, missing key); errs.NotFound for an
// unknown customer; errs.InsufficientCredits with Extra "balance" and
// "available"; errs.IdempotencyKeyReused; errs.Unavailable.
func (s *Service) Hold(ctx context.Context, in HoldInput, key db.IdempotencyKey) (HoldResult, bool, error) {
	if err := in.Validate(); err != nil {
		return HoldResult{}, false, err
	}
	if key.Key == "" {
		return HoldResult{}, false, errs.InvalidField("Idempotency-Key", "the Idempotency-Key header is required")
	}
	if err := key.Validate(); err != nil {
		return HoldResult{}, false, err
	}
	meta, err := metadataJSON(in.Metadata)
	if err != nil {
		return HoldResult{}, false, err
	}
	// A hold draws as a consume does, through the same batches (batch.go,
	// credits_hold_one).
	lifetime := in.ExpiresIn
	if lifetime == 0 {
		lifetime = DefaultHoldLifetime
	}
	item := newBatchItem(kindHold, in.CustomerID, key)
	item.Amount, item.Reason, item.Metadata = &in.Amount, in.Reason, json.RawMessage(meta)
	item.Hold, item.ExpiresIn = db.NewID("hld"), int64(lifetime/time.Second)
	d := s.batch.do(newBatchCall(ctx, item, func(ctx context.Context) ([]byte, bool, error) {
		return onceRaw(ctx, s, key, func(tx *gorm.DB, threshold *int64) (HoldResult, error) {
			return hold(ctx, tx, s.now, in, threshold, key.Key, s.topUp)
		})
	}))
	if d.err != nil {
		return HoldResult{}, false, d.err
	}
	var h HoldResult
	if err := json.Unmarshal(d.answer, &h); err != nil {
		return HoldResult{}, false, fmt.Errorf("credits: stored hold answer: %w", err)
	}
	return h, d.replayed, nil
}

func hold(ctx context.Context, tx *gorm.DB, clock func() time.Time, in HoldInput, defaultThreshold *int64, idemKey string, topUp TopUpFunc) (HoldResult, error) {
	a, found, err := lockAccount(ctx, tx, in.CustomerID, clock, defaultThreshold)
	if err != nil {
		return HoldResult{}, err
	}
	if found {
		a.topUp = topUp
	}
	if !found {
		if _, err := customers.Get(ctx, tx, in.CustomerID); err != nil {
			return HoldResult{}, err
		}
		return HoldResult{}, insufficient(0, 0, in.Amount)
	}
	if a.balance-a.held < in.Amount {
		return HoldResult{}, a.refuse(ctx, tx, in.Amount)
	}
	// What is available of each grant, in the draw order (as consumeSQL).
	type free struct {
		ID   string
		Free int64
	}
	var grants []free
	err = tx.WithContext(ctx).Raw(`SELECT id, remaining - held AS free FROM credit_grants
		WHERE customer_id = ? AND remaining > 0 AND remaining > held AND (expires_at IS NULL OR expires_at > ?) AND (effective_at IS NULL OR effective_at <= ?)
		ORDER BY priority, expires_at NULLS LAST, created_at, id`, in.CustomerID, a.now, a.now).Scan(&grants).Error
	if err != nil {
		return HoldResult{}, err
	}
	var total int64
	draws := []Draw{}
	for _, g := range grants {
		total += g.Free
		if left := in.Amount - sumDraws(draws); left > 0 {
			draws = append(draws, Draw{GrantID: g.ID, Amount: min(g.Free, left)})
		}
	}
	if total < in.Amount {
		return HoldResult{}, insufficient(a.balance, total, in.Amount)
	}
	js, err := json.Marshal(draws)
	if err != nil {
		return HoldResult{}, fmt.Errorf("credits: hold draws: %w", err)
	}
	res := tx.WithContext(ctx).Exec(`UPDATE credit_grants g SET held = g.held + d.amount
		FROM jsonb_to_recordset(?::jsonb) AS d(grant_id text, amount bigint) WHERE g.id = d.grant_id`, string(js))
	if res.Error != nil {
		return HoldResult{}, res.Error
	}
	if res.RowsAffected != int64(len(draws)) {
		return HoldResult{}, fmt.Errorf("credits: hold of %s kept %d grants of %d", in.CustomerID, res.RowsAffected, len(draws))
	}
	meta, err := metadataJSON(in.Metadata)
	if err != nil {
		return HoldResult{}, err
	}
	lifetime := in.ExpiresIn
	if lifetime == 0 {
		lifetime = DefaultHoldLifetime
	}
	h := holdRow{
		ID: db.NewID("hld"), CustomerID: in.CustomerID, Amount: in.Amount, Status: HoldActive, Reason: in.Reason,
		Metadata: meta, Draws: string(js), IdempotencyKey: db.NullIfEmpty(idemKey),
		ExpiresAt: a.now.Add(lifetime), CreatedAt: a.now,
	}
	if err := tx.WithContext(ctx).Create(&h).Error; err != nil {
		return HoldResult{}, err
	}
	a.held += in.Amount
	if !a.nextHoldExpiry.Valid || h.ExpiresAt.Before(a.nextHoldExpiry.Time) {
		a.nextHoldExpiry = sql.NullTime{Time: h.ExpiresAt, Valid: true}
	}
	// Held credits are not available: thresholds compare what is.
	fire := a.lowBalance(true)
	if err := a.save(ctx, tx); err != nil {
		return HoldResult{}, err
	}
	available := total - in.Amount
	if err := events.Append(ctx, tx, in.CustomerID, events.CreditsHeld{
		CustomerID: in.CustomerID, HoldID: h.ID, Amount: in.Amount, Reason: in.Reason, ExpiresAt: h.ExpiresAt.UTC(),
		Balance: a.balance, Available: available,
	}); err != nil {
		return HoldResult{}, err
	}
	// What is available fell; the balance did not.
	if err := a.afterLowering(ctx, tx, fire); err != nil {
		return HoldResult{}, err
	}
	return HoldResult{HoldID: h.ID, Amount: in.Amount, Status: HoldActive, ExpiresAt: h.ExpiresAt.UTC(), Balance: a.balance, Available: available}, nil
}

func sumDraws(draws []Draw) int64 {
	var n int64
	for _, d := range draws {
		n += d.Amount
	}
	return n
}

// Capture spends in.Amount (all, when nil) of an active hold's credits with
// a consume ledger entry that names the hold, and releases the rest, in one
// transaction guarded by key: a retry with the same key replays the first
// answer, even though the hold has ended since.
//
// Errors: errs.Invalid (missing key; an amount below 0, or above the
// hold's, naming /amount); errs.NotFound (no such hold of this customer);
// errs.Conflict (the hold is no longer active: captured, released or
// expired); errs.IdempotencyKeyReused; errs.Unavailable.
func (s *Service) Capture(ctx context.Context, in CaptureInput, key db.IdempotencyKey) (HoldEnd, bool, error) {
	if err := customers.ValidateID(in.CustomerID); err != nil {
		return HoldEnd{}, false, err
	}
	if in.Amount != nil && *in.Amount < 0 {
		return HoldEnd{}, false, errs.InvalidField("/amount", "amount must not be negative")
	}
	if key.Key == "" {
		return HoldEnd{}, false, errs.InvalidField("Idempotency-Key", "the Idempotency-Key header is required")
	}
	if err := key.Validate(); err != nil {
		return HoldEnd{}, false, err
	}
	// A capture spends like a consume, through the same batches (batch.go,
	// credits_capture_one).
	item := newBatchItem(kindCapture, in.CustomerID, key)
	item.Amount, item.Hold = in.Amount, in.HoldID
	c := newBatchCall(ctx, item, func(ctx context.Context) ([]byte, bool, error) {
		return onceRaw(ctx, s, key, func(tx *gorm.DB, threshold *int64) (HoldEnd, error) {
			return endHold(ctx, tx, s.now, in.CustomerID, in.HoldID, true, in.Amount, threshold, key.Key, s.topUp)
		})
	})
	c.spent = func(answer []byte) int64 {
		var end HoldEnd
		_ = json.Unmarshal(answer, &end) // an answer that does not decode is refused to its caller
		return end.Captured
	}
	d := s.batch.do(c)
	if d.err != nil {
		return HoldEnd{}, false, d.err
	}
	var end HoldEnd
	if err := json.Unmarshal(d.answer, &end); err != nil {
		return HoldEnd{}, false, fmt.Errorf("credits: stored capture answer: %w", err)
	}
	return end, d.replayed, nil
}

// Release ends an active hold and gives all its credits back to their
// grants (credits of a grant that expired or was voided meanwhile then
// expire or are voided). With a key it is guarded like Capture; without
// one, a second release is a conflict.
//
// Errors: errs.NotFound, errs.Conflict, errs.IdempotencyKeyReused,
// errs.Unavailable.
func (s *Service) Release(ctx context.Context, customerID, holdID string, key db.IdempotencyKey) (HoldEnd, bool, error) {
	if err := customers.ValidateID(customerID); err != nil {
		return HoldEnd{}, false, err
	}
	zero := int64(0)
	do := func(tx *gorm.DB, threshold *int64) (HoldEnd, error) {
		return endHold(ctx, tx, s.now, customerID, holdID, false, &zero, threshold, "", s.topUp)
	}
	if key.Key != "" {
		return once(ctx, s, key, "release", do)
	}
	threshold := s.cfg.DefaultLowBalanceThreshold
	var out HoldEnd
	err := db.InTx(ctx, s.db, func(tx *gorm.DB) error {
		var err error
		out, err = do(tx, &threshold)
		return err
	})
	return out, false, err
}

// endHold ends the hold: a capture spends amount of it (all when nil), a
// release nothing, and the rest goes back to its grants.
func endHold(ctx context.Context, tx *gorm.DB, clock func() time.Time, customerID, holdID string, capture bool, amount *int64, defaultThreshold *int64, idemKey string, topUp TopUpFunc) (HoldEnd, error) {
	// Locking the account first releases the hold if it is overdue, so an
	// expired hold is never captured.
	a, found, err := lockAccount(ctx, tx, customerID, clock, defaultThreshold)
	if err != nil {
		return HoldEnd{}, err
	}
	if found {
		a.topUp = topUp
	}
	if !found {
		if _, err := customers.Get(ctx, tx, customerID); err != nil {
			return HoldEnd{}, err
		}
		return HoldEnd{}, errs.E(errs.NotFound, "no hold %s for customer %s", holdID, customerID)
	}
	var h holdRow
	err = tx.WithContext(ctx).Raw(`SELECT * FROM credit_holds WHERE id = ? AND customer_id = ? FOR UPDATE`, holdID, customerID).Scan(&h).Error
	if err != nil {
		return HoldEnd{}, err
	}
	if h.ID == "" {
		return HoldEnd{}, errs.E(errs.NotFound, "no hold %s for customer %s", holdID, customerID)
	}
	if h.Status != HoldActive {
		return HoldEnd{}, errs.E(errs.Conflict, "hold %s is %s, no longer active", holdID, h.Status)
	}
	captured := h.Amount
	if amount != nil {
		captured = *amount
	}
	if captured > h.Amount {
		return HoldEnd{}, errs.InvalidField("/amount", fmt.Sprintf("amount %d is more than the %d credits held", captured, h.Amount))
	}
	var draws []Draw
	if err := json.Unmarshal([]byte(h.Draws), &draws); err != nil {
		return HoldEnd{}, fmt.Errorf("credits: draws of hold %s: %w", h.ID, err)
	}
	// The capture spends from the hold's draws in their order.
	parts := make([]heldPart, 0, len(draws))
	spent := []Draw{}
	left := captured
	for _, d := range draws {
		take := min(d.Amount, left)
		left -= take
		parts = append(parts, heldPart{GrantID: d.GrantID, Held: d.Amount, Take: take})
		if take > 0 {
			spent = append(spent, Draw{GrantID: d.GrantID, Amount: take})
		}
	}
	dead, err := a.unhold(ctx, tx, parts)
	if err != nil {
		return HoldEnd{}, err
	}
	a.held -= h.Amount
	if err := a.refreshHoldExpiry(ctx, tx, h.ID); err != nil {
		return HoldEnd{}, err
	}
	end := HoldEnd{HoldID: h.ID, Status: HoldReleased, Captured: captured, Released: h.Amount - captured}
	if capture {
		end.Status = HoldCaptured
	}
	// A capture spends what its hold kept, which was not available
	// already; lowBalance still decides (a threshold may have changed since
	// the hold), and a release re-arms the notice when enough came back.
	if captured > 0 {
		a.balance -= captured
		end.TransactionID = db.NewID("ctx")
		if err := insertEntry(ctx, tx, entryRow{
			ID: end.TransactionID, CustomerID: customerID, Kind: KindConsume, Amount: -captured, BalanceAfter: a.balance,
			Reason: h.Reason, Metadata: decodeMetadata(h.Metadata), IdempotencyKey: db.NullIfEmpty(idemKey),
			HoldID: &h.ID, Draws: spent, CreatedAt: a.now,
		}); err != nil {
			return HoldEnd{}, err
		}
	}
	fire := a.lowBalance(capture)
	// What comes back pays the revokes that claimed it first.
	paid, err := a.payClaims(ctx, tx, h, parts)
	if err != nil {
		return HoldEnd{}, err
	}
	fire = fire || paid
	if err := tx.WithContext(ctx).Model(&holdRow{}).Where("id = ?", h.ID).Updates(map[string]any{
		"status": end.Status, "captured": end.Captured, "released": end.Released,
		"transaction_id": db.NullIfEmpty(end.TransactionID), "ended_at": a.now,
	}).Error; err != nil {
		return HoldEnd{}, err
	}
	// Saves the account, after voiding or expiring what came back to dead
	// grants.
	if _, err := a.settleReleased(ctx, tx, dead); err != nil {
		return HoldEnd{}, err
	}
	if end.Available, err = a.available(ctx, tx); err != nil {
		return HoldEnd{}, err
	}
	end.Balance = a.balance
	var ev events.Payload = events.CreditsReleased{CustomerID: customerID, HoldID: h.ID, Released: end.Released, Balance: end.Balance, Available: end.Available}
	if end.Status == HoldCaptured {
		ev = events.CreditsCaptured{CustomerID: customerID, HoldID: h.ID, Captured: end.Captured, Released: end.Released,
			TransactionID: end.TransactionID, Balance: end.Balance, Available: end.Available}
	}
	if err := events.Append(ctx, tx, customerID, ev); err != nil {
		return HoldEnd{}, err
	}
	// A capture is a consume: the one guard after a fall runs for it
	// (thresholds, automatic top-up), and the forecast's rollup counts it.
	if captured > 0 {
		if err := addConsumption(ctx, tx, customerID, a.now, captured); err != nil {
			return HoldEnd{}, err
		}
	}
	if capture || fire {
		if err := a.afterLowering(ctx, tx, fire); err != nil {
			return HoldEnd{}, err
		}
	}
	return end, nil
}

// heldPart is what a hold kept of one grant as it ends: Take of it is
// spent, the rest goes back to the grant.
type heldPart struct {
	GrantID string `json:"grant_id"`
	Held    int64  `json:"held"`
	Take    int64  `json:"take"`
}

// deadGrant is a grant voided before a hold gave credits back to it.
type deadGrant struct {
	ID string
}

// unhold ends what a hold kept of each grant: the grant's held falls by
// the part and its remaining by what was taken. Credits given back to a
// grant that expired meanwhile lower a.nextExpiry so settleReleased
// expires them; those given back to a voided grant are returned as dead,
// for settleReleased to void. The caller adjusts a.held and a.balance.
func (a *account) unhold(ctx context.Context, tx *gorm.DB, parts []heldPart) ([]deadGrant, error) {
	if len(parts) == 0 {
		return nil, nil
	}
	js, err := json.Marshal(parts)
	if err != nil {
		return nil, fmt.Errorf("credits: held parts: %w", err)
	}
	var back []struct {
		ID        string
		Remaining int64
		Held      int64
		ExpiresAt *time.Time
		VoidedAt  *time.Time
	}
	err = tx.WithContext(ctx).Raw(`UPDATE credit_grants g SET held = g.held - p.held, remaining = g.remaining - p.take
		FROM (SELECT grant_id, sum(held)::bigint AS held, sum(take)::bigint AS take
		      FROM jsonb_to_recordset(?::jsonb) AS x(grant_id text, held bigint, take bigint) GROUP BY grant_id) p
		WHERE g.id = p.grant_id AND g.customer_id = ?
		RETURNING g.id, g.remaining, g.held, g.expires_at, g.voided_at`, string(js), a.customerID).Scan(&back).Error
	if err != nil {
		return nil, err
	}
	var dead []deadGrant
	for _, g := range back {
		if g.Remaining <= g.Held {
			continue
		}
		switch {
		case g.VoidedAt != nil:
			dead = append(dead, deadGrant{ID: g.ID})
		case g.ExpiresAt != nil && (!a.nextExpiry.Valid || g.ExpiresAt.Before(a.nextExpiry.Time)):
			a.nextExpiry = sql.NullTime{Time: *g.ExpiresAt, Valid: true}
		}
	}
	return dead, nil
}

// settleReleased voids what came back to voided grants, expires what came
// back to expired ones (and anything else due), and saves the account. It
// returns how many grants it expired.
func (a *account) settleReleased(ctx context.Context, tx *gorm.DB, dead []deadGrant) (int, error) {
	fire := false
	// Several holds ending together may give back to one grant (each
	// listed it): what it has unheld now is voided, once.
	seen := make(map[string]bool, len(dead))
	for _, g := range dead {
		if seen[g.ID] {
			continue
		}
		seen[g.ID] = true
		var left int64
		if err := tx.WithContext(ctx).Raw(`SELECT remaining - held FROM credit_grants WHERE id = ?`, g.ID).Scan(&left).Error; err != nil {
			return 0, err
		}
		if left <= 0 {
			continue
		}
		if _, err := a.voidRest(ctx, tx, g.ID, left, "voided grant: released from a hold", nil, ""); err != nil {
			return 0, err
		}
		fire = a.lowBalance(true) || fire
	}
	expired := 0
	if a.expiryDue() {
		// Saves, and runs afterLowering for what it expired.
		var err error
		if expired, err = a.expireDue(ctx, tx, false); err != nil {
			return 0, err
		}
	} else if err := a.save(ctx, tx); err != nil {
		return 0, err
	}
	if len(dead) > 0 {
		return expired, a.afterLowering(ctx, tx, fire)
	}
	return expired, nil
}

// refreshHoldExpiry recomputes a.nextHoldExpiry from the customer's active
// holds other than ending (the hold being ended in this transaction).
func (a *account) refreshHoldExpiry(ctx context.Context, tx *gorm.DB, ending ...string) error {
	if ending == nil {
		ending = []string{""}
	}
	return tx.WithContext(ctx).Raw(`SELECT min(expires_at) FROM credit_holds
		WHERE customer_id = ? AND status = 'active' AND id NOT IN ?`, a.customerID, ending).Scan(&a.nextHoldExpiry).Error
}

// releaseOverdueHolds releases every active hold of the account past its
// expires_at (status expired, credits.hold_expired), then settles what came
// back (and expires whatever else is due) and saves the account. It
// returns how many holds it released and grants it expired.
func (a *account) releaseOverdueHolds(ctx context.Context, tx *gorm.DB) (released, expired int, err error) {
	var overdue []holdRow
	err = tx.WithContext(ctx).Raw(`UPDATE credit_holds SET status = 'expired', released = amount, ended_at = ?
		WHERE customer_id = ? AND status = 'active' AND expires_at <= ?
		RETURNING *`, a.now, a.customerID, a.now).Scan(&overdue).Error
	if err != nil {
		return 0, 0, err
	}
	var dead []deadGrant
	parts := make([][]heldPart, len(overdue))
	for i, h := range overdue {
		var draws []Draw
		if err := json.Unmarshal([]byte(h.Draws), &draws); err != nil {
			return 0, 0, fmt.Errorf("credits: draws of hold %s: %w", h.ID, err)
		}
		parts[i] = make([]heldPart, 0, len(draws))
		for _, d := range draws {
			parts[i] = append(parts[i], heldPart{GrantID: d.GrantID, Held: d.Amount})
		}
		d, err := a.unhold(ctx, tx, parts[i])
		if err != nil {
			return 0, 0, err
		}
		dead = append(dead, d...)
		a.held -= h.Amount
	}
	if err := a.refreshHoldExpiry(ctx, tx); err != nil {
		return 0, 0, err
	}
	// Events after the release, with the balance it leaves; the expiries
	// and voids settleReleased writes follow them.
	for _, h := range overdue {
		if err := events.Append(ctx, tx, a.customerID, events.CreditsHoldExpired{
			CustomerID: a.customerID, HoldID: h.ID, Released: h.Amount, ExpiresAt: h.ExpiresAt.UTC(), Balance: a.balance,
		}); err != nil {
			return 0, 0, err
		}
	}
	// What came back pays the revokes that claimed it first.
	fire := false
	for i, h := range overdue {
		paid, err := a.payClaims(ctx, tx, h, parts[i])
		if err != nil {
			return 0, 0, err
		}
		fire = fire || paid
	}
	if expired, err = a.settleReleased(ctx, tx, dead); err != nil {
		return 0, 0, err
	}
	if fire {
		err = a.afterLowering(ctx, tx, fire)
	}
	return len(overdue), expired, err
}

func decodeMetadata(js string) map[string]string {
	var m map[string]string
	_ = json.Unmarshal([]byte(js), &m)
	return m
}

// GetHold returns one hold of the customer.
//
// Errors: errs.Invalid, errs.NotFound (unknown customer, or no such hold of
// this customer), errs.Unavailable.
func (s *Service) GetHold(ctx context.Context, customerID, holdID string) (Hold, error) {
	if err := customers.ValidateID(customerID); err != nil {
		return Hold{}, err
	}
	var r holdRow
	err := s.db.WithContext(ctx).Where("id = ? AND customer_id = ?", holdID, customerID).Take(&r).Error
	if errors.Is(err, gorm.ErrRecordNotFound) {
		return Hold{}, errs.E(errs.NotFound, "no hold %s for customer %s", holdID, customerID)
	}
	if err != nil {
		return Hold{}, db.Translate(err, nil)
	}
	return s.toHold(r)
}

// ListHolds returns a page of the customer's holds, newest first; status
// "" lists all, else only holds in that status.
//
// Errors: errs.Invalid (bad status, cursor or limit), errs.NotFound for an
// unknown customer, errs.Unavailable.
func (s *Service) ListHolds(ctx context.Context, customerID, status, cursor string, limit int) (HoldPage, error) {
	if err := customers.ValidateID(customerID); err != nil {
		return HoldPage{}, err
	}
	switch status {
	case "", HoldActive, HoldCaptured, HoldReleased, HoldExpired:
	default:
		return HoldPage{}, errs.InvalidField("status", "status must be active, captured, released or expired")
	}
	if err := db.CheckPageSize(limit); err != nil {
		return HoldPage{}, err
	}
	if _, err := customers.Get(ctx, s.db, customerID); err != nil {
		return HoldPage{}, err
	}
	q := s.db.WithContext(ctx).Where("customer_id = ?", customerID)
	if status == HoldActive {
		// An active hold past its expiry is expired, released or not yet.
		q = q.Where("status = ? AND expires_at > ?", HoldActive, s.now())
	} else if status == HoldExpired {
		q = q.Where("(status = ? OR (status = ? AND expires_at <= ?))", HoldExpired, HoldActive, s.now())
	} else if status != "" {
		q = q.Where("status = ?", status)
	}
	if cursor != "" {
		at, id, err := parseHoldCursor(cursor)
		if err != nil {
			return HoldPage{}, err
		}
		q = q.Where("(created_at, id) < (?, ?)", at, id)
	}
	var rows []holdRow
	if err := q.Order("created_at DESC, id DESC").Limit(limit + 1).Find(&rows).Error; err != nil {
		return HoldPage{}, db.Translate(err, nil)
	}
	page := HoldPage{Holds: make([]Hold, 0, min(len(rows), limit))}
	for i, r := range rows {
		if i == limit {
			last := rows[i-1]
			page.NextCursor = formatHoldCursor(last.CreatedAt, last.ID)
			break
		}
		h, err := s.toHold(r)
		if err != nil {
			return HoldPage{}, err
		}
		page.Holds = append(page.Holds, h)
	}
	return page, nil
}

// toHold is the domain view of a row. An active hold past its expiry is
// shown expired: it no longer keeps anything from a consume, whether or
// not the sweeper has recorded that yet.
func (s *Service) toHold(r holdRow) (Hold, error) {
	h := Hold{
		ID: r.ID, CustomerID: r.CustomerID, Amount: r.Amount, Status: r.Status, Reason: r.Reason,
		Captured: r.Captured, Released: r.Released, ExpiresAt: r.ExpiresAt.UTC(), CreatedAt: r.CreatedAt.UTC(),
		Metadata: decodeMetadata(r.Metadata),
	}
	if err := json.Unmarshal([]byte(r.Draws), &h.Draws); err != nil {
		return Hold{}, fmt.Errorf("credits: draws of hold %s: %w", r.ID, err)
	}
	if r.TransactionID != nil {
		h.TransactionID = *r.TransactionID
	}
	if r.EndedAt != nil {
		t := r.EndedAt.UTC()
		h.EndedAt = &t
	}
	if h.Status == HoldActive && !h.ExpiresAt.After(s.now()) {
		h.Status, h.Released, h.EndedAt = HoldExpired, h.Amount, &h.ExpiresAt
	}
	return h, nil
}

// Hold cursors are the opaque form of the last hold seen: its creation
// time and id.
const holdCursorPrefix = "h1."

func formatHoldCursor(at time.Time, id string) string {
	return base64.RawURLEncoding.EncodeToString([]byte(holdCursorPrefix + strconv.FormatInt(at.UnixMicro(), 10) + "." + id))
}

func parseHoldCursor(c string) (time.Time, string, error) {
	bad := errs.InvalidField("cursor", "malformed cursor; pass back a next_cursor returned by this list")
	raw, err := base64.RawURLEncoding.DecodeString(c)
	if err != nil || !strings.HasPrefix(string(raw), holdCursorPrefix) {
		return time.Time{}, "", bad
	}
	micros, id, ok := strings.Cut(strings.TrimPrefix(string(raw), holdCursorPrefix), ".")
	n, err := strconv.ParseInt(micros, 10, 64)
	if !ok || err != nil || id == "" {
		return time.Time{}, "", bad
	}
	return time.UnixMicro(n).UTC(), id, nil
}
