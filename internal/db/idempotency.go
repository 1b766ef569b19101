package db

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
	"time"
	"unicode/utf8"

	"gorm.io/gorm"
	"gorm.io/gorm/clause"

	"github.com/tallybilling/tally/internal/errs"
	"github.com/tallybilling/tally/internal/text"
)

// IdempotencyRetention is how long a key's first answer is replayed
// (docs/guarantees.md, "Idempotency": same key and body within 24 h). An
// older row counts as absent and is replaced by the next request with
// that key.
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

// Errors returned to callers whose key is taken. KeyReusedError and
// KeyInFlightError are the same answers for code that claims keys its own
// way (credits' batched consume, which claims them inside one statement).
func KeyReusedError() error { return errKeyReused() }

// KeyInFlightError: see KeyReusedError.
func KeyInFlightError() error { return errKeyInFlight() }

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

// idempotencyKeyRow is a row of idempotency_keys. created_at, and the
// lease's end, are the database's clock: every comparison with them is
// made by the database too.
type idempotencyKeyRow struct {
	Scope          string `gorm:"primaryKey"`
	Key            string `gorm:"primaryKey"`
	RequestHash    []byte
	Result         []byte
	Holder         *string
	CreatedAt      time.Time `gorm:"autoCreateTime:false"`
	CompletedAt    *time.Time
	LeaseExpiresAt *time.Time
}

func (idempotencyKeyRow) TableName() string { return "idempotency_keys" }

// keyRow addresses the row of k, for an update or a delete by key; more
// conditions follow in further Where calls.
func keyRow(tx *gorm.DB, k IdempotencyKey) *gorm.DB {
	return tx.Model(&idempotencyKeyRow{}).Where("scope = ? AND key = ?", k.Scope, k.Key)
}

// leaseEnd is the end of a lease that starts now, by the database's clock.
func leaseEnd(lease time.Duration) clause.Expr {
	return gorm.Expr("now() + make_interval(secs => ?)", lease.Seconds())
}

// keyState is what claim reads of a key already taken.
type keyState struct {
	RequestHash []byte
	Result      []byte
	// Done: completed. Expired: past IdempotencyRetention, so absent.
	// Abandoned: the reservation's lease lapsed.
	Done, Expired, Abandoned bool
}

// claim takes the key inside tx for holder (empty for Once, whose claim
// never outlives its transaction) with lease. The INSERT waits for any other
// transaction holding the same key to finish, so afterwards the row is
// either ours or a committed earlier one, which we lock and inspect.
func claim(tx *gorm.DB, k IdempotencyKey, holder string, lease time.Duration) (claimState, []byte, error) {
	// A concurrent purge may delete the row between our two statements; then
	// the next INSERT succeeds. Three rounds cover that race twice over.
	for range 3 {
		res := tx.Model(&idempotencyKeyRow{}).Clauses(clause.OnConflict{DoNothing: true}).Create(map[string]any{
			"scope": k.Scope, "key": k.Key, "request_hash": k.RequestHash,
			"holder": NullIfEmpty(holder), "lease_expires_at": leaseEnd(lease),
		})
		if res.Error != nil {
			return 0, nil, res.Error
		}
		if res.RowsAffected == 1 {
			return claimed, nil, nil
		}
		// Age and lease are judged by the database's clock, the one that
		// wrote them.
		var st keyState
		res = tx.Raw(`SELECT request_hash, result, completed_at IS NOT NULL AS done,
				created_at < now() - make_interval(secs => ?) AS expired,
				COALESCE(lease_expires_at, created_at + make_interval(secs => ?)) < now() AS abandoned
			FROM idempotency_keys WHERE scope = ? AND key = ? FOR UPDATE`,
			IdempotencyRetention.Seconds(), ReservationLease.Seconds(), k.Scope, k.Key).Scan(&st)
		if res.Error != nil {
			return 0, nil, res.Error
		}
		if res.RowsAffected == 0 {
			continue
		}
		// A reservation nobody completed, released or renewed within its
		// lease was left by a crashed or killed request: take it over rather
		// than answer in_flight for the rest of the day. The new holder id
		// tells the old holder, should it still be alive, that the key is
		// no longer its own.
		if st.Expired || (!st.Done && st.Abandoned) {
			err := keyRow(tx, k).Updates(map[string]any{
				"request_hash": k.RequestHash, "result": nil, "created_at": gorm.Expr("now()"), "completed_at": nil,
				"holder": NullIfEmpty(holder), "lease_expires_at": leaseEnd(lease),
			}).Error
			if err != nil {
				return 0, nil, err
			}
			return claimed, nil, nil
		}
		if !bytes.Equal(st.RequestHash, k.RequestHash) {
			return 0, nil, errKeyReused()
		}
		if !st.Done {
			return 0, nil, errKeyInFlight()
		}
		return completed, st.Result, nil
	}
	return 0, nil, fmt.Errorf("db: idempotency key %q in scope %q vanished three times while claiming it", k.Key, k.Scope)
}

// completion is the update that stores result as the key's answer.
func completion(result []byte) map[string]any {
	return map[string]any{"result": nonNil(result), "completed_at": gorm.Expr("now()")}
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

// OnceIn is Once inside the caller's transaction tx: the claim, fn's effect
// and the stored answer commit or vanish with the caller's transaction, and
// a concurrent duplicate waits until that transaction ends. There is no
// retry of its own; the caller's InTx retries the whole. Errors: as Once.
func OnceIn(ctx context.Context, tx *gorm.DB, key IdempotencyKey, fn func(tx *gorm.DB) ([]byte, error)) (result []byte, replayed bool, err error) {
	if err := key.Validate(); err != nil {
		return nil, false, err
	}
	result, replayed, err = guard(tx.WithContext(ctx), key, "", ReservationLease, fn)
	return result, replayed, Translate(err, nil)
}

// guarded validates key and runs guard in a transaction of its own.
func guarded(ctx context.Context, gdb *gorm.DB, key IdempotencyKey, holder string, lease time.Duration, fn func(tx *gorm.DB) ([]byte, error)) (result []byte, replayed bool, err error) {
	if err := key.Validate(); err != nil {
		return nil, false, err
	}
	err = InTx(ctx, gdb, func(tx *gorm.DB) error {
		var err error
		result, replayed, err = guard(tx, key, holder, lease, fn)
		return err
	})
	if err != nil {
		return nil, false, err
	}
	return result, replayed, nil
}

// guard claims key inside tx. With fn (Once) it runs fn and stores its
// result in tx; without (Reserve) the claim alone is for holder. A completed
// key replays its stored result instead.
func guard(tx *gorm.DB, key IdempotencyKey, holder string, lease time.Duration, fn func(tx *gorm.DB) ([]byte, error)) (result []byte, replayed bool, err error) {
	state, stored, err := claim(tx, key, holder, lease)
	if err != nil {
		return nil, false, err
	}
	if state == completed {
		return stored, true, nil
	}
	if fn == nil {
		return nil, false, nil
	}
	out, err := fn(tx)
	if err != nil {
		return nil, false, err
	}
	if err := keyRow(tx, key).Updates(completion(out)).Error; err != nil {
		return nil, false, err
	}
	return out, false, nil
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
	res := r.held(gdb.WithContext(ctx)).UpdateColumn("lease_expires_at", leaseEnd(r.Lease))
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
	res := r.held(gdb.WithContext(ctx)).Updates(completion(result))
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
	err := r.held(gdb.WithContext(ctx)).Delete(&idempotencyKeyRow{}).Error
	return Translate(err, nil)
}

// held addresses the reservation's row while it is still the holder's and
// not completed.
func (r Reservation) held(tx *gorm.DB) *gorm.DB {
	return keyRow(tx, r.Key).Where("holder = ? AND completed_at IS NULL", r.holder)
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
