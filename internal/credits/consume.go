package credits

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/customers"
	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/errs"
)

// consumeAnswer is a ConsumeResult as stored for idempotent replay.
type consumeAnswer struct {
	TransactionID string `json:"transaction_id"`
	Amount        int64  `json:"amount"`
	Balance       int64  `json:"balance"`
}

// Consume spends in.Amount credits of the customer from what is available
// (not held, effective, unexpired) in the draw order: lowest priority, then
// soonest expiry (never-expiring last), then oldest. It
// runs in one transaction guarded by key: the same key and request replays
// the first answer with replayed=true, and a concurrent duplicate waits for
// the first and replays its answer, so a key spends at most once.
//
// An insufficient_credits answer is not stored (its transaction rolled
// back), so retrying the same key after a top-up can succeed.
//
// Errors: errs.Invalid (bad input, missing key); errs.NotFound for an unknown
// customer (none is created); errs.InsufficientCredits with Extra["balance"]
// and Extra["available"]; errs.IdempotencyKeyReused; errs.Unavailable.
func (s *Service) Consume(ctx context.Context, in ConsumeInput, key db.IdempotencyKey) (ConsumeResult, bool, error) {
	if err := in.Validate(); err != nil {
		return ConsumeResult{}, false, err
	}
	if key.Key == "" {
		return ConsumeResult{}, false, errs.InvalidField("Idempotency-Key", "the Idempotency-Key header is required")
	}
	if err := key.Validate(); err != nil {
		return ConsumeResult{}, false, err
	}
	meta, err := metadataJSON(in.Metadata)
	if err != nil {
		return ConsumeResult{}, false, err
	}
	// Group commit (batch.go): the consume joins the next batch that can take it.
	d := s.batch.do(s.consumeCall(ctx, in, key, meta))
	if d.err != nil {
		return ConsumeResult{}, false, d.err
	}
	var a consumeAnswer
	if err := json.Unmarshal(d.answer, &a); err != nil {
		return ConsumeResult{}, false, fmt.Errorf("credits: stored consume answer: %w", err)
	}
	return ConsumeResult(a), d.replayed, nil
}

// consumeCall is the consume as a batch takes it, with its full path.
func (s *Service) consumeCall(ctx context.Context, in ConsumeInput, key db.IdempotencyKey, meta string) *batchCall {
	item := newBatchItem(KindConsume, in.CustomerID, key)
	item.Amount, item.Reason, item.Metadata = &in.Amount, in.Reason, json.RawMessage(meta)
	c := newBatchCall(ctx, item, func(ctx context.Context) ([]byte, bool, error) {
		return onceRaw(ctx, s, key, func(tx *gorm.DB, threshold *int64) (consumeAnswer, error) {
			r, err := consume(ctx, tx, s.now, in, threshold, key.Key, s.topUp)
			return consumeAnswer(r), err
		})
	})
	c.spent = func([]byte) int64 { return in.Amount } // a consume spends what it asks, or nothing
	return c
}

// consumeSQL draws amount from what is available of the customer's
// effective, unexpired grants (remaining less what holds keep) in draw
// order, lowers the balance row, adds amount to the day's consumption
// rollup when it is a consume (what the forecast learns from; a negative
// adjustment is not consumption) and appends the ledger entry, in one
// statement. When the available credits do not cover amount (some of the
// balance is held, or not effective yet) it changes nothing and returns no
// row. The caller holds the balance row's lock, which every writer of the
// customer's grants takes first, so the snapshot the CTEs read is current.
// p binds each value once; NOT MATERIALIZED lets the planner see them as
// the constants they are (the draw-order index is used, as with literals).
const consumeSQL = `
WITH p AS NOT MATERIALIZED (
	SELECT ?::text AS customer, ?::timestamptz AS now, ?::bigint AS amount, ?::boolean AS notified,
	       ?::bigint AS default_threshold, ?::text AS id, ?::text AS reason, ?::jsonb AS metadata, ?::text AS key,
	       ?::text AS kind
), cand AS (
	SELECT g.id, g.remaining - g.held AS free,
	       (sum(g.remaining - g.held) OVER w)::bigint AS run,
	       row_number() OVER w AS rn
	FROM credit_grants g, p
	WHERE g.customer_id = p.customer AND g.remaining > 0 AND g.remaining > g.held
	  AND (g.expires_at IS NULL OR g.expires_at > p.now) AND (g.effective_at IS NULL OR g.effective_at <= p.now)
	WINDOW w AS (ORDER BY g.priority, g.expires_at NULLS LAST, g.created_at, g.id)
), draws AS (
	SELECT cand.id, cand.rn, LEAST(cand.free, p.amount - (cand.run - cand.free)) AS take
	FROM cand, p WHERE cand.run - cand.free < p.amount AND (SELECT max(run) FROM cand) >= p.amount
), drawn AS (
	UPDATE credit_grants g SET remaining = g.remaining - d.take
	FROM draws d WHERE g.id = d.id
	RETURNING g.id
), bal AS (
	UPDATE credit_balances b
	SET balance = b.balance - p.amount, low_balance_notified = p.notified,
	    default_low_balance_threshold = COALESCE(p.default_threshold, b.default_low_balance_threshold),
	    updated_at = p.now
	FROM p
	WHERE b.customer_id = p.customer AND EXISTS (SELECT 1 FROM draws)
	RETURNING b.balance
), rollup AS (
	INSERT INTO credit_consumption_daily AS r (customer_id, day, consumed)
	SELECT p.customer, (p.now AT TIME ZONE 'UTC')::date, p.amount FROM p
	WHERE p.kind = 'consume' AND EXISTS (SELECT 1 FROM draws)
	ON CONFLICT (customer_id, day) DO UPDATE SET consumed = r.consumed + excluded.consumed
)
INSERT INTO credit_ledger (id, customer_id, kind, amount, balance_after, reason, metadata, draws, idempotency_key, created_at)
SELECT p.id, p.customer, p.kind, -p.amount, bal.balance, p.reason, p.metadata,
       (SELECT jsonb_agg(jsonb_build_object('grant_id', d.id, 'amount', d.take) ORDER BY d.rn) FROM draws d),
       p.key, p.now
FROM bal, p
RETURNING balance_after,
	(SELECT COALESCE(sum(take), 0)::bigint FROM draws) AS drawn_total,
	(SELECT count(*) FROM drawn) AS drawn_grants`

// addConsumption adds n credits spent outside consumeSQL (a hold's
// capture) to the day's consumption rollup the forecast learns from, as
// consumeSQL does for a consume.
func addConsumption(ctx context.Context, tx *gorm.DB, customerID string, now time.Time, n int64) error {
	return tx.WithContext(ctx).Exec(`INSERT INTO credit_consumption_daily AS r (customer_id, day, consumed)
		VALUES (?, (?::timestamptz AT TIME ZONE 'UTC')::date, ?)
		ON CONFLICT (customer_id, day) DO UPDATE SET consumed = r.consumed + excluded.consumed`, customerID, now, n).Error
}

func consume(ctx context.Context, tx *gorm.DB, clock func() time.Time, in ConsumeInput, defaultThreshold *int64, idemKey string, topUp TopUpFunc) (ConsumeResult, error) {
	return spend(ctx, tx, clock, in, KindConsume, defaultThreshold, idemKey, topUp)
}

// spend draws in.Amount like a consume and records it as a ledger entry of
// kind (consume, or adjust for a negative adjustment); topUp (nil: none)
// starts an automatic top-up when it leaves too little available.
func spend(ctx context.Context, tx *gorm.DB, clock func() time.Time, in ConsumeInput, kind string, defaultThreshold *int64, idemKey string, topUp TopUpFunc) (ConsumeResult, error) {
	a, found, err := lockAccount(ctx, tx, in.CustomerID, clock, defaultThreshold)
	if err != nil {
		return ConsumeResult{}, err
	}
	if found {
		a.topUp = topUp
	}
	if !found {
		// Never granted anything: unknown (404) or simply empty (402).
		if _, err := customers.Get(ctx, tx, in.CustomerID); err != nil {
			return ConsumeResult{}, err
		}
		return ConsumeResult{}, insufficient(0, 0, in.Amount)
	}
	if a.balance-a.held < in.Amount {
		return ConsumeResult{}, a.refuse(ctx, tx, in.Amount)
	}
	a.balance -= in.Amount
	fire := a.lowBalance(true)
	meta, err := metadataJSON(in.Metadata)
	if err != nil {
		return ConsumeResult{}, err
	}
	id := db.NewID("ctx")
	var out struct{ BalanceAfter, DrawnTotal, DrawnGrants int64 }
	res := tx.WithContext(ctx).Raw(consumeSQL, in.CustomerID, a.now, in.Amount, a.notified,
		defaultThreshold, id, in.Reason, meta, db.NullIfEmpty(idemKey), kind).Scan(&out)
	if res.Error != nil {
		return ConsumeResult{}, res.Error
	}
	if res.RowsAffected == 0 {
		// The balance less what is held covers it, but some of it is not
		// effective yet: nothing was written.
		a.balance += in.Amount
		return ConsumeResult{}, a.refuse(ctx, tx, in.Amount)
	}
	balanceAfter, drawnTotal, drawnGrants := out.BalanceAfter, out.DrawnTotal, out.DrawnGrants
	// The balance row and the grants must agree; if they ever do not, refuse
	// (rolling back) rather than record a consume the grants cannot back.
	if balanceAfter != a.balance || drawnTotal != in.Amount || drawnGrants == 0 {
		return ConsumeResult{}, fmt.Errorf("credits: %s of %d for %s drew %d from %d grants, balance %d, expected %d: balance row and grants disagree",
			kind, in.Amount, in.CustomerID, drawnTotal, drawnGrants, balanceAfter, a.balance)
	}
	if err := a.afterLowering(ctx, tx, fire); err != nil {
		return ConsumeResult{}, err
	}
	return ConsumeResult{TransactionID: id, Amount: in.Amount, Balance: a.balance}, nil
}
