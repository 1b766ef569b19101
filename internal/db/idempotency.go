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
	"github.com/tallybilling/tally/internal/text"
)

// IdempotencyRetention is how long a key's first answer is replayed
// (design/API.md: same key and body within 24 h). An older row counts as
// absent and is replaced by the next request with that key.
const IdempotencyRetention = 24 * time.Hour

// ReservationLease is the default lease of a reservation: how long a Reserve
// that is neither renewed, completed nor released blocks its key
// (errs.IdempotencyKeyInFlight) before another request may take it over. A
// holder that works longer renews its lease (Reservation.Renew), so only a
// request that died holding the key loses it.
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
	if err := text.Check(k.Key); err != nil {
		return errs.E(errs.Invalid, "Idempotency-Key %v", err)
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

// claim takes the key inside tx for holder (empty for Once, whose claim
// never outlives its transaction) with lease. The INSERT waits for any other
// transaction holding the same key to finish, so afterwards the row is
// either ours or a committed earlier one, which we lock and inspect.
func claim(tx *gorm.DB, k IdempotencyKey, holder string, lease time.Duration) (claimState, []byte, error) {
	retention := IdempotencyRetention.Seconds()
	// A concurrent purge may delete the row between our two statements; then
	// the next INSERT succeeds. Three rounds cover that race twice over.
	for range 3 {
		res := tx.Exec(`INSERT INTO idempotency_keys (scope, key, request_hash, holder, lease_expires_at)
			VALUES (?, ?, ?, NULLIF(?, ''), now() + make_interval(secs => ?))
			ON CONFLICT (scope, key) DO NOTHING`, k.Scope, k.Key, k.RequestHash, holder, lease.Seconds())
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
				COALESCE(lease_expires_at, created_at + make_interval(secs => ?)) < now()
			FROM idempotency_keys WHERE scope = ? AND key = ? FOR UPDATE`,
			retention, ReservationLease.Seconds(), k.Scope, k.Key), &hash, &result, &done, &expired, &abandoned)
		if errors.Is(err, sql.ErrNoRows) {
			continue
		}
		if err != nil {
			return 0, nil, err
		}
		// A reservation nobody completed, released or renewed within its
		// lease was left by a crashed or killed request: take it over rather
		// than answer in_flight for the rest of the day. The new holder id
		// tells the old holder, should it still be alive, that the key is
		// no longer its own.
		if expired || (!done && abandoned) {
			err := tx.Exec(`UPDATE idempotency_keys
				SET request_hash = ?, result = NULL, created_at = now(), completed_at = NULL,
					holder = NULLIF(?, ''), lease_expires_at = now() + make_interval(secs => ?)
				WHERE scope = ? AND key = ?`, k.RequestHash, holder, lease.Seconds(), k.Scope, k.Key).Error
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
	return guarded(ctx, gdb, key, "", ReservationLease, fn)
}

// guarded claims key in one transaction. With fn (Once) it runs fn and stores
// its result in that transaction; without (Reserve) it commits the bare claim
// for holder. A completed key replays its stored result instead.
func guarded(ctx context.Context, gdb *gorm.DB, key IdempotencyKey, holder string, lease time.Duration, fn func(tx *gorm.DB) ([]byte, error)) (result []byte, replayed bool, err error) {
	if err := key.Validate(); err != nil {
		return nil, false, err
	}
	err = InTx(ctx, gdb, func(tx *gorm.DB) error {
		result, replayed = nil, false
		state, stored, err := claim(tx, key, holder, lease)
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

// Reservation is one request's hold on an idempotency key between Reserve
// and Complete or Release, for operations that wait on an outside system
// (creating a Stripe Checkout Session) and so cannot hold a transaction open.
// Its holder id tells it apart from a later reservation of the same key that
// took over after its lease lapsed: Renew, Complete and Release act only on
// the holder's own reservation.
type Reservation struct {
	Key IdempotencyKey
	// Replayed says the key was completed earlier: Result is its stored
	// answer, and there is nothing to complete or release.
	Replayed bool
	Result   []byte
	// Lease is how long the reservation lasts without a Renew.
	Lease  time.Duration
	holder string
}

// Reserve claims key for the caller with lease (ReservationLease when not
// positive), committing a row without a result. Unless the answer is
// Replayed, the caller now holds the key and must Complete or Release it, and
// Renew it while it works longer than lease. When the key is already taken:
//
//   - completed with the same hash: Replayed, with the stored Result;
//   - not completed and within its lease: errs.IdempotencyKeyInFlight;
//   - a different hash: errs.IdempotencyKeyReused.
//
// A reservation neither completed, released nor renewed within its lease
// was abandoned (its request died) and is taken over. Other errors:
// errs.Invalid (malformed key), errs.Unavailable.
func Reserve(ctx context.Context, gdb *gorm.DB, key IdempotencyKey, lease time.Duration) (Reservation, error) {
	if lease <= 0 {
		lease = ReservationLease
	}
	r := Reservation{Key: key, Lease: lease, holder: NewID("rsv")}
	result, replayed, err := guarded(ctx, gdb, key, r.holder, lease, nil)
	if err != nil {
		return Reservation{}, err
	}
	r.Replayed, r.Result = replayed, result
	return r, nil
}

// Renew extends the reservation's lease to Lease from now, by the database's
// clock, so a holder that works longer than its lease keeps the key.
// Errors: errs.Conflict when the reservation is no longer the holder's
// (completed, released, or taken over after its lease lapsed);
// errs.Unavailable.
func (r Reservation) Renew(ctx context.Context, gdb *gorm.DB) error {
	res := gdb.WithContext(ctx).Exec(`UPDATE idempotency_keys SET lease_expires_at = now() + make_interval(secs => ?)
		WHERE scope = ? AND key = ? AND holder = ? AND completed_at IS NULL`,
		r.Lease.Seconds(), r.Key.Scope, r.Key.Key, r.holder)
	if res.Error != nil {
		return Translate(res.Error, nil)
	}
	if res.RowsAffected == 0 {
		return errs.E(errs.Conflict, "the reservation of this Idempotency-Key is no longer held")
	}
	return nil
}

// Complete stores result for the holder's reservation; later Reserves of the
// key replay it. gdb may be a transaction, so the result can commit with the
// caller's own writes.
//
// Errors: errs.Conflict when the reservation is no longer the holder's
// (released, completed already, or taken over); errs.Unavailable.
func (r Reservation) Complete(ctx context.Context, gdb *gorm.DB, result []byte) error {
	res := gdb.WithContext(ctx).Exec(`UPDATE idempotency_keys SET result = ?, completed_at = now()
		WHERE scope = ? AND key = ? AND holder = ? AND completed_at IS NULL`,
		nonNil(result), r.Key.Scope, r.Key.Key, r.holder)
	if res.Error != nil {
		return Translate(res.Error, nil)
	}
	if res.RowsAffected == 0 {
		return errs.E(errs.Conflict, "no reservation in progress for this Idempotency-Key")
	}
	return nil
}

// Release deletes the holder's uncompleted reservation so the request can be
// retried at once after a failure. Releasing a completed reservation, or one
// another request took over, does nothing. Errors: errs.Unavailable.
func (r Reservation) Release(ctx context.Context, gdb *gorm.DB) error {
	err := gdb.WithContext(ctx).Exec(`DELETE FROM idempotency_keys
		WHERE scope = ? AND key = ? AND holder = ? AND completed_at IS NULL`,
		r.Key.Scope, r.Key.Key, r.holder).Error
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
