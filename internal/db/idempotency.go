package db

import (
	"bytes"
	"context"
	"crypto/sha256"
	"database/sql"
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
	"time"
	"unicode/utf8"

	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/errs"
)

// IdempotencyRetention is how long a key's first answer is replayed
// (design/API.md: same key and body within 24 h). An older row counts as
// absent and is replaced by the next request with that key.
const IdempotencyRetention = 24 * time.Hour

// ReservationLease is how long a Reserve without Complete or Release blocks
// its key (errs.IdempotencyKeyInFlight). It outlasts the longest Stripe call
// (a 20 s timeout, retried twice), so only a request that died holding the key
// loses it.
const ReservationLease = 2 * time.Minute

// MaxIdempotencyKeyLen is the longest accepted key, in characters.
const MaxIdempotencyKeyLen = 255

// IdempotencyKey names one guarded operation. Scope separates key spaces
// (e.g. "consume:" + customer id, so two customers may use the same key);
// RequestHash identifies the request body, see HashRequest.
type IdempotencyKey struct {
	Scope       string
	Key         string
	RequestHash []byte
}

// Validate checks the key as a client sent it. Errors: errs.Invalid for a key
// that is empty, longer than 255 characters, not UTF-8 or contains NUL; a
// missing scope or hash is a programming error (internal).
func (k IdempotencyKey) Validate() error {
	if k.Scope == "" || !utf8.ValidString(k.Scope) || strings.ContainsRune(k.Scope, 0) {
		return errors.New("db: idempotency key without a valid scope")
	}
	if len(k.RequestHash) == 0 {
		return errors.New("db: idempotency key without a request hash")
	}
	if n := utf8.RuneCountInString(k.Key); n < 1 || n > MaxIdempotencyKeyLen {
		return errs.E(errs.Invalid, "Idempotency-Key must be 1 to %d characters long", MaxIdempotencyKeyLen)
	}
	if !utf8.ValidString(k.Key) || strings.ContainsRune(k.Key, 0) {
		return errs.E(errs.Invalid, "Idempotency-Key must be UTF-8 text without NUL characters")
	}
	return nil
}

// HashRequest is the SHA-256 of parts, each prefixed with its length so that
// ("ab","c") and ("a","bc") differ. Callers pass what makes two requests the
// same request: typically the method, the path and the canonical body.
func HashRequest(parts ...[]byte) []byte {
	h := sha256.New()
	var n [8]byte
	for _, p := range parts {
		binary.BigEndian.PutUint64(n[:], uint64(len(p)))
		h.Write(n[:])
		h.Write(p)
	}
	return h.Sum(nil)
}

// Errors returned to callers whose key is taken.
func errKeyReused() error {
	return errs.E(errs.IdempotencyKeyReused, "this Idempotency-Key was already used with a different request")
}

func errKeyInFlight() error {
	return errs.E(errs.IdempotencyKeyInFlight, "a request with this Idempotency-Key is still in progress; retry later")
}

type claimState int

const (
	claimed   claimState = iota // the row is ours: run the operation
	completed                   // an earlier request finished: replay its result
)

// claim takes the key inside tx. The INSERT waits for any other transaction
// holding the same key to finish, so afterwards the row is either ours or a
// committed earlier one, which we lock and inspect.
func claim(tx *gorm.DB, k IdempotencyKey) (claimState, []byte, error) {
	retention := IdempotencyRetention.Seconds()
	// A concurrent purge may delete the row between our two statements; then
	// the next INSERT succeeds. Three rounds cover that race twice over.
	for range 3 {
		res := tx.Exec(`INSERT INTO idempotency_keys (scope, key, request_hash) VALUES (?, ?, ?)
			ON CONFLICT (scope, key) DO NOTHING`, k.Scope, k.Key, k.RequestHash)
		if res.Error != nil {
			return 0, nil, res.Error
		}
		if res.RowsAffected == 1 {
			return claimed, nil, nil
		}
		var (
			hash, result             []byte
			done, expired, abandoned bool
		)
		err := ScanRow(tx.Raw(`SELECT request_hash, result, completed_at IS NOT NULL,
				created_at < now() - make_interval(secs => ?),
				created_at < now() - make_interval(secs => ?)
			FROM idempotency_keys WHERE scope = ? AND key = ? FOR UPDATE`,
			retention, ReservationLease.Seconds(), k.Scope, k.Key), &hash, &result, &done, &expired, &abandoned)
		if errors.Is(err, sql.ErrNoRows) {
			continue
		}
		if err != nil {
			return 0, nil, err
		}
		// A reservation nobody completed or released within its lease was
		// left by a crashed or killed request: take it over rather than
		// answer in_flight for the rest of the day.
		if expired || (!done && abandoned) {
			err := tx.Exec(`UPDATE idempotency_keys
				SET request_hash = ?, result = NULL, created_at = now(), completed_at = NULL
				WHERE scope = ? AND key = ?`, k.RequestHash, k.Scope, k.Key).Error
			if err != nil {
				return 0, nil, err
			}
			return claimed, nil, nil
		}
		if !bytes.Equal(hash, k.RequestHash) {
			return 0, nil, errKeyReused()
		}
		if !done {
			return 0, nil, errKeyInFlight()
		}
		return completed, result, nil
	}
	return 0, nil, fmt.Errorf("db: idempotency key %q in scope %q vanished three times while claiming it", k.Key, k.Scope)
}

// Once runs fn in one transaction guarded by key, and stores fn's result in
// that same transaction, so the effect and its recorded answer commit or
// vanish together.
//
// A later call with the same key and request hash, within
// IdempotencyRetention, returns the stored result with replayed=true and does
// not run fn. A concurrent duplicate waits for the first transaction and then
// replays its committed result, so every copy gets the same answer. If fn
// fails, nothing is stored and a retry runs fn again; an outcome the caller
// wants replayed (say, a 402) must therefore be returned as a result, not an
// error. fn may run more than once when InTx retries a serialization failure.
//
// Errors: errs.IdempotencyKeyReused (same key, different hash),
// errs.IdempotencyKeyInFlight (a Reserve of this key has not completed),
// errs.Invalid (malformed key), fn's own errors, errs.Unavailable.
func Once(ctx context.Context, gdb *gorm.DB, key IdempotencyKey, fn func(tx *gorm.DB) ([]byte, error)) (result []byte, replayed bool, err error) {
	return guarded(ctx, gdb, key, fn)
}

// guarded claims key in one transaction. With fn (Once) it runs fn and stores
// its result in that transaction; without (Reserve) it commits the bare claim.
// A completed key replays its stored result instead.
func guarded(ctx context.Context, gdb *gorm.DB, key IdempotencyKey, fn func(tx *gorm.DB) ([]byte, error)) (result []byte, replayed bool, err error) {
	if err := key.Validate(); err != nil {
		return nil, false, err
	}
	err = InTx(ctx, gdb, func(tx *gorm.DB) error {
		result, replayed = nil, false
		state, stored, err := claim(tx, key)
		if err != nil {
			return err
		}
		if state == completed {
			result, replayed = stored, true
			return nil
		}
		if fn == nil {
			return nil
		}
		out, err := fn(tx)
		if err != nil {
			return err
		}
		if err := tx.Exec(`UPDATE idempotency_keys SET result = ?, completed_at = now()
			WHERE scope = ? AND key = ?`, nonNil(out), key.Scope, key.Key).Error; err != nil {
			return err
		}
		result = out
		return nil
	})
	if err != nil {
		return nil, false, err
	}
	return result, replayed, nil
}

// nonNil stores an empty result as empty bytes rather than NULL, so the
// stored row says "answered with nothing" rather than "no answer yet".
func nonNil(b []byte) []byte {
	if b == nil {
		return []byte{}
	}
	return b
}

// Reserve is the first half of the two-phase form, for operations that wait
// on an outside system (creating a Stripe Checkout Session) and so cannot
// hold a transaction open. It commits a row without a result and returns
// (nil, false, nil): the caller now owns the key and must Complete or Release
// it. When the key is already taken:
//
//   - completed with the same hash: the stored result, replayed=true;
//   - not completed: errs.IdempotencyKeyInFlight;
//   - a different hash: errs.IdempotencyKeyReused.
//
// A reservation neither completed nor released within ReservationLease was
// abandoned (its request died) and may be reserved again. Other errors:
// errs.Invalid (malformed key), errs.Unavailable.
func Reserve(ctx context.Context, gdb *gorm.DB, key IdempotencyKey) (result []byte, replayed bool, err error) {
	return guarded(ctx, gdb, key, nil)
}

// Complete stores result for a key this caller reserved; later Reserves of
// the key replay it. gdb may be a transaction, so the result can commit with
// the caller's own writes.
//
// Errors: errs.Conflict when there is no uncompleted reservation of this key
// and hash (it was released, completed already, or expired and taken over);
// errs.Unavailable.
func Complete(ctx context.Context, gdb *gorm.DB, key IdempotencyKey, result []byte) error {
	res := gdb.WithContext(ctx).Exec(`UPDATE idempotency_keys SET result = ?, completed_at = now()
		WHERE scope = ? AND key = ? AND request_hash = ? AND completed_at IS NULL`,
		nonNil(result), key.Scope, key.Key, key.RequestHash)
	if res.Error != nil {
		return Translate(res.Error, nil)
	}
	if res.RowsAffected == 0 {
		return errs.E(errs.Conflict, "no reservation in progress for this Idempotency-Key")
	}
	return nil
}

// Release deletes this caller's uncompleted reservation so the request can
// be retried after a failure. Releasing a completed, foreign or missing
// reservation does nothing. Errors: errs.Unavailable.
func Release(ctx context.Context, gdb *gorm.DB, key IdempotencyKey) error {
	err := gdb.WithContext(ctx).Exec(`DELETE FROM idempotency_keys
		WHERE scope = ? AND key = ? AND request_hash = ? AND completed_at IS NULL`,
		key.Scope, key.Key, key.RequestHash).Error
	return Translate(err, nil)
}

// PurgeIdempotencyKeys deletes at most size keys created before olderThan
// (completed or abandoned), in one short statement, and returns how many it
// deleted; PurgeInBatches repeats it. Keys past IdempotencyRetention are
// already treated as absent, so purging them only reclaims space; a key a
// request holds locked right now is skipped. Errors: errs.Unavailable.
func PurgeIdempotencyKeys(ctx context.Context, gdb *gorm.DB, olderThan time.Time, size int) (int64, error) {
	// A MATERIALIZED CTE runs once: a subquery the planner rescanned would,
	// with SKIP LOCKED, pass over the rows already deleted and take more.
	res := gdb.WithContext(ctx).Exec(`
		WITH picked AS MATERIALIZED (
			SELECT scope, key FROM idempotency_keys WHERE created_at < ?
			ORDER BY created_at LIMIT ? FOR UPDATE SKIP LOCKED)
		DELETE FROM idempotency_keys k USING picked WHERE k.scope = picked.scope AND k.key = picked.key`, olderThan, size)
	return res.RowsAffected, Translate(res.Error, nil)
}
