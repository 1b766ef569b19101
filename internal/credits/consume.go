package credits

import (
	"context"
	"fmt"
	"time"

	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/customers"
	"github.com/tallybilling/tally/internal/db"
)

// consumeAnswer is a ConsumeResult as stored for idempotent replay.
type consumeAnswer struct {
	TransactionID string `json:"transaction_id"`
	Amount        int64  `json:"amount"`
	Balance       int64  `json:"balance"`
}

// Consume spends in.Amount credits of the customer, drawing from the grant
// that expires soonest, then the oldest (never-expiring grants last). It
// runs in one transaction guarded by key: the same key and request replays
// the first answer with replayed=true, and a concurrent duplicate waits for
// the first and replays its answer, so a key spends at most once.
//
// An insufficient_credits answer is not stored (its transaction rolled
// back), so retrying the same key after a top-up can succeed.
//
// Errors: errs.Invalid (bad input, missing key); errs.NotFound for an unknown
// customer (none is created); errs.InsufficientCredits with Extra["balance"]
// the spendable balance; errs.IdempotencyKeyReused; errs.Unavailable.
func (s *Service) Consume(ctx context.Context, in ConsumeInput, key db.IdempotencyKey) (ConsumeResult, bool, error) {
	if err := in.Validate(); err != nil {
		return ConsumeResult{}, false, err
	}
	a, replayed, err := once(ctx, s, key, "consume", func(tx *gorm.DB, threshold *int64) (consumeAnswer, error) {
		r, err := consume(ctx, tx, s.now, in, threshold, key.Key)
		return consumeAnswer(r), err
	})
	if err != nil {
		return ConsumeResult{}, false, err
	}
	if !replayed {
		s.consumed.Add(float64(a.Amount))
	}
	return ConsumeResult(a), replayed, nil
}

// consumeSQL draws amount from the customer's unexpired grants in draw order,
// lowers the balance row and appends the ledger entry, in one statement.
// The caller holds the balance row's lock, which every writer of the
// customer's grants takes first, so the snapshot the CTEs read is current.
const consumeSQL = `
WITH cand AS (
	SELECT id, remaining,
	       (sum(remaining) OVER w)::bigint AS run,
	       row_number() OVER w AS rn
	FROM credit_grants
	WHERE customer_id = @customer AND remaining > 0 AND (expires_at IS NULL OR expires_at > CAST(@now AS timestamptz))
	WINDOW w AS (ORDER BY expires_at NULLS LAST, created_at, id)
), draws AS (
	SELECT id, rn, LEAST(remaining, CAST(@amount AS bigint) - (run - remaining)) AS take
	FROM cand WHERE run - remaining < CAST(@amount AS bigint)
), drawn AS (
	UPDATE credit_grants g SET remaining = g.remaining - d.take
	FROM draws d WHERE g.id = d.id
	RETURNING g.id
), bal AS (
	UPDATE credit_balances
	SET balance = balance - CAST(@amount AS bigint), low_balance_notified = @notified,
	    default_low_balance_threshold = COALESCE(CAST(@default_threshold AS bigint), default_low_balance_threshold),
	    updated_at = CAST(@now AS timestamptz)
	WHERE customer_id = @customer
	RETURNING balance
)
INSERT INTO credit_ledger (id, customer_id, kind, amount, balance_after, reason, metadata, draws, idempotency_key, created_at)
SELECT @id, @customer, 'consume', -CAST(@amount AS bigint), bal.balance, @reason, CAST(@metadata AS jsonb),
       (SELECT jsonb_agg(jsonb_build_object('grant_id', d.id, 'amount', d.take) ORDER BY d.rn) FROM draws d),
       @key, CAST(@now AS timestamptz)
FROM bal
RETURNING balance_after, (SELECT COALESCE(sum(take), 0)::bigint FROM draws), (SELECT count(*) FROM drawn)`

func consume(ctx context.Context, tx *gorm.DB, clock func() time.Time, in ConsumeInput, defaultThreshold *int64, idemKey string) (ConsumeResult, error) {
	a, found, err := lockAccount(ctx, tx, in.CustomerID, clock, defaultThreshold)
	if err != nil {
		return ConsumeResult{}, err
	}
	if !found {
		// Never granted anything: unknown (404) or simply empty (402).
		if _, err := customers.Get(ctx, tx, in.CustomerID); err != nil {
			return ConsumeResult{}, err
		}
		return ConsumeResult{}, insufficient(0, in.Amount)
	}
	if a.balance < in.Amount {
		return ConsumeResult{}, insufficient(a.balance, in.Amount)
	}
	a.balance -= in.Amount
	fire := a.lowBalance(true)
	meta, err := metadataJSON(in.Metadata)
	if err != nil {
		return ConsumeResult{}, err
	}
	id := db.NewID("ctx")
	var balanceAfter, drawnTotal, drawnGrants int64
	err = db.ScanRow(tx.WithContext(ctx).Raw(consumeSQL, map[string]any{
		"customer":          in.CustomerID,
		"now":               a.now,
		"amount":            in.Amount,
		"notified":          a.notified,
		"default_threshold": defaultThreshold,
		"id":                id,
		"reason":            in.Reason,
		"metadata":          meta,
		"key":               idemKey,
	}), &balanceAfter, &drawnTotal, &drawnGrants)
	if err != nil {
		return ConsumeResult{}, err
	}
	// The balance row and the grants must agree; if they ever do not, refuse
	// (rolling back) rather than record a consume the grants cannot back.
	if balanceAfter != a.balance || drawnTotal != in.Amount || drawnGrants == 0 {
		return ConsumeResult{}, fmt.Errorf("credits: consume of %d for %s drew %d from %d grants, balance %d, expected %d: balance row and grants disagree",
			in.Amount, in.CustomerID, drawnTotal, drawnGrants, balanceAfter, a.balance)
	}
	if fire {
		if err := a.appendLowBalance(ctx, tx); err != nil {
			return ConsumeResult{}, err
		}
	}
	return ConsumeResult{TransactionID: id, Amount: in.Amount, Balance: a.balance}, nil
}
