package credits

import (
	"context"
	"encoding/json"
	"fmt"

	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/errs"
)

// once runs do in its own transaction guarded by key (db.Once) and returns
// its answer A, stored as JSON for replay: the same key and request replays
// the first answer with replayed=true, and a concurrent duplicate waits for
// the first and replays its answer. do gets the configured default
// low-balance threshold for a customer whose balance row it creates. what
// names the operation in the error of an unreadable stored answer.
//
// Errors: errs.Invalid when key has no key; do's; those of db.Once.
func once[A any](ctx context.Context, s *Service, key db.IdempotencyKey, what string, do func(tx *gorm.DB, defaultThreshold *int64) (A, error)) (answer A, replayed bool, err error) {
	out, replayed, err := onceRaw(ctx, s, key, do)
	if err != nil {
		return answer, false, err
	}
	if err := json.Unmarshal(out, &answer); err != nil {
		return answer, false, fmt.Errorf("credits: stored %s answer: %w", what, err)
	}
	return answer, replayed, nil
}

// onceRaw is once returning the answer as stored: JSON.
func onceRaw[A any](ctx context.Context, s *Service, key db.IdempotencyKey, do func(tx *gorm.DB, defaultThreshold *int64) (A, error)) ([]byte, bool, error) {
	if key.Key == "" {
		return nil, false, errs.InvalidField("Idempotency-Key", "the Idempotency-Key header is required")
	}
	threshold := s.cfg.DefaultLowBalanceThreshold
	return db.Once(ctx, s.db, key, func(tx *gorm.DB) ([]byte, error) {
		a, err := do(tx, &threshold)
		if err != nil {
			return nil, err
		}
		return json.Marshal(a)
	})
}
