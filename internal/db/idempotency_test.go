package db_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/db/dbtest"
	"github.com/tallybilling/tally/internal/errs"
)

func key(k string, body string) db.IdempotencyKey {
	return db.IdempotencyKey{Scope: "test:cust_1", Key: k, RequestHash: db.HashRequest([]byte("POST"), []byte(body))}
}

func newLedgerDB(t *testing.T) *gorm.DB {
	gdb := dbtest.New(t)
	mustExec(t, gdb, `CREATE TABLE effects (id serial PRIMARY KEY, note text NOT NULL)`)
	return gdb
}

func TestOnceConcurrentDuplicatesRunOnce(t *testing.T) {
	t.Parallel()
	gdb := newLedgerDB(t)
	k := key("k-concurrent", `{"amount":1}`)
	var runs atomic.Int32
	const callers = 50

	type answer struct {
		result   []byte
		replayed bool
		err      error
	}
	answers := make(chan answer, callers)
	start := make(chan struct{})
	var wg sync.WaitGroup
	for range callers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			res, replayed, err := db.Once(context.Background(), gdb, k, func(tx *gorm.DB) ([]byte, error) {
				n := runs.Add(1)
				// Hold the key a little so the other callers pile up on it.
				if err := tx.Exec(`SELECT pg_sleep(0.05)`).Error; err != nil {
					return nil, err
				}
				if err := tx.Exec(`INSERT INTO effects (note) VALUES (?)`, "debit").Error; err != nil {
					return nil, err
				}
				return []byte(fmt.Sprintf(`{"run":%d}`, n)), nil
			})
			answers <- answer{res, replayed, err}
		}()
	}
	close(start)
	wg.Wait()
	close(answers)

	var first []byte
	replays := 0
	for a := range answers {
		if a.err != nil {
			t.Fatalf("Once: %v", a.err)
		}
		if first == nil {
			first = a.result
		}
		if !bytes.Equal(a.result, first) {
			t.Fatalf("callers got different answers: %s vs %s", a.result, first)
		}
		if a.replayed {
			replays++
		}
	}
	if got := runs.Load(); got != 1 {
		t.Fatalf("fn ran %d times, want exactly 1", got)
	}
	if n := count(t, gdb, `SELECT count(*) FROM effects`); n != 1 {
		t.Fatalf("%d effects committed, want 1", n)
	}
	if replays != callers-1 {
		t.Fatalf("%d replays, want %d", replays, callers-1)
	}
	if string(first) != `{"run":1}` {
		t.Fatalf("result %s", first)
	}
}

func TestOnceReplaysAndRejectsReuse(t *testing.T) {
	t.Parallel()
	gdb := newLedgerDB(t)
	ctx := context.Background()
	runs := 0
	fn := func(tx *gorm.DB) ([]byte, error) {
		runs++
		return []byte("answer"), tx.Exec(`INSERT INTO effects (note) VALUES ('x')`).Error
	}
	res, replayed, err := db.Once(ctx, gdb, key("k1", "a"), fn)
	if err != nil || replayed || string(res) != "answer" {
		t.Fatalf("first Once = %q, %v, %v", res, replayed, err)
	}
	res, replayed, err = db.Once(ctx, gdb, key("k1", "a"), fn)
	if err != nil || !replayed || string(res) != "answer" {
		t.Fatalf("replay = %q, %v, %v", res, replayed, err)
	}
	_, _, err = db.Once(ctx, gdb, key("k1", "b"), fn)
	if !errs.Is(err, errs.IdempotencyKeyReused) {
		t.Fatalf("same key, different body = %v, want idempotency_key_reused", err)
	}
	if runs != 1 {
		t.Fatalf("fn ran %d times, want 1", runs)
	}
	// Same key in another scope is another key.
	other := key("k1", "b")
	other.Scope = "test:cust_2"
	if _, replayed, err := db.Once(ctx, gdb, other, fn); err != nil || replayed {
		t.Fatalf("other scope = %v, %v; want a fresh run", replayed, err)
	}
	if runs != 2 || count(t, gdb, `SELECT count(*) FROM effects`) != 2 {
		t.Fatalf("runs %d, want 2", runs)
	}
}

func TestOnceEmptyResultReplays(t *testing.T) {
	t.Parallel()
	gdb := newLedgerDB(t)
	ctx := context.Background()
	runs := 0
	fn := func(*gorm.DB) ([]byte, error) { runs++; return nil, nil }
	if _, _, err := db.Once(ctx, gdb, key("empty", "a"), fn); err != nil {
		t.Fatal(err)
	}
	res, replayed, err := db.Once(ctx, gdb, key("empty", "a"), fn)
	if err != nil || !replayed || len(res) != 0 || runs != 1 {
		t.Fatalf("replay of an empty result = %q, %v, %v (runs %d)", res, replayed, err, runs)
	}
}

func TestOnceFailureStoresNothing(t *testing.T) {
	t.Parallel()
	gdb := newLedgerDB(t)
	ctx := context.Background()
	boom := errs.E(errs.PaymentProviderError, "boom")
	_, _, err := db.Once(ctx, gdb, key("k-fail", "a"), func(tx *gorm.DB) ([]byte, error) {
		if err := tx.Exec(`INSERT INTO effects (note) VALUES ('half')`).Error; err != nil {
			return nil, err
		}
		return nil, boom
	})
	if err != boom {
		t.Fatalf("Once = %v, want fn's error", err)
	}
	if n := count(t, gdb, `SELECT count(*) FROM idempotency_keys`); n != 0 {
		t.Fatalf("%d keys stored after a failure", n)
	}
	if n := count(t, gdb, `SELECT count(*) FROM effects`); n != 0 {
		t.Fatalf("the failed attempt's effect survived")
	}
	ran := false
	res, replayed, err := db.Once(ctx, gdb, key("k-fail", "a"), func(tx *gorm.DB) ([]byte, error) {
		ran = true
		return []byte("ok"), nil
	})
	if err != nil || replayed || !ran || string(res) != "ok" {
		t.Fatalf("retry after failure = %q, %v, %v (ran %v)", res, replayed, err, ran)
	}
}

func TestOnceExpiredKeyIsReplaced(t *testing.T) {
	t.Parallel()
	gdb := newLedgerDB(t)
	ctx := context.Background()
	if _, _, err := db.Once(ctx, gdb, key("old", "a"), func(*gorm.DB) ([]byte, error) { return []byte("first"), nil }); err != nil {
		t.Fatal(err)
	}
	mustExec(t, gdb, `UPDATE idempotency_keys SET created_at = now() - interval '24 hours 1 minute'`)
	// Past retention even a different body is a new request.
	res, replayed, err := db.Once(ctx, gdb, key("old", "b"), func(*gorm.DB) ([]byte, error) { return []byte("second"), nil })
	if err != nil || replayed || string(res) != "second" {
		t.Fatalf("Once on an expired key = %q, %v, %v", res, replayed, err)
	}
	res, replayed, err = db.Once(ctx, gdb, key("old", "b"), func(*gorm.DB) ([]byte, error) { return nil, errors.New("must not run") })
	if err != nil || !replayed || string(res) != "second" {
		t.Fatalf("replay of the replacement = %q, %v, %v", res, replayed, err)
	}
	// Just inside retention it still replays.
	mustExec(t, gdb, `UPDATE idempotency_keys SET created_at = now() - interval '23 hours 59 minutes'`)
	if _, _, err := db.Once(ctx, gdb, key("old", "c"), func(*gorm.DB) ([]byte, error) { return nil, nil }); !errs.Is(err, errs.IdempotencyKeyReused) {
		t.Fatalf("different body within retention = %v, want reused", err)
	}
}

func TestOnceInsideCallerTransaction(t *testing.T) {
	t.Parallel()
	gdb := newLedgerDB(t)
	ctx := context.Background()
	// The caller's transaction rolls back: the key must vanish with the effect.
	_ = db.InTx(ctx, gdb, func(tx *gorm.DB) error {
		if _, _, err := db.OnceIn(ctx, tx, key("nested", "a"), func(tx *gorm.DB) ([]byte, error) {
			return []byte("r"), tx.Exec(`INSERT INTO effects (note) VALUES ('n')`).Error
		}); err != nil {
			t.Fatalf("nested Once: %v", err)
		}
		return errors.New("caller fails later")
	})
	if n := count(t, gdb, `SELECT count(*) FROM idempotency_keys`); n != 0 {
		t.Fatalf("key survived its caller's rollback")
	}
	if n := count(t, gdb, `SELECT count(*) FROM effects`); n != 0 {
		t.Fatalf("effect survived its caller's rollback")
	}
}

func TestIdempotencyKeyValidation(t *testing.T) {
	t.Parallel()
	gdb := newLedgerDB(t)
	ctx := context.Background()
	fn := func(*gorm.DB) ([]byte, error) { return nil, nil }
	for _, k := range []string{"", strings.Repeat("k", 256), "bad\x00key", "bad\xffutf8"} {
		if _, _, err := db.Once(ctx, gdb, key(k, "a"), fn); !errs.Is(err, errs.Invalid) {
			t.Errorf("Once with key %q = %v, want invalid_request", k, err)
		}
		if _, err := db.Reserve(ctx, gdb, key(k, "a"), 0); !errs.Is(err, errs.Invalid) {
			t.Errorf("Reserve with key %q = %v, want invalid_request", k, err)
		}
	}
	// 255 characters is fine even when they take more bytes.
	if _, _, err := db.Once(ctx, gdb, key(strings.Repeat("é", 255), "a"), fn); err != nil {
		t.Errorf("255-character key: %v", err)
	}
	noScope := key("k", "a")
	noScope.Scope = ""
	if _, _, err := db.Once(ctx, gdb, noScope, fn); err == nil {
		t.Error("a key without scope was accepted")
	}
	noHash := key("k", "a")
	noHash.RequestHash = nil
	if _, _, err := db.Once(ctx, gdb, noHash, fn); err == nil {
		t.Error("a key without request hash was accepted")
	}
}

// reserve is db.Reserve with the default lease, failing the test on an error.
func reserve(t *testing.T, gdb *gorm.DB, k db.IdempotencyKey) db.Reservation {
	t.Helper()
	r, err := db.Reserve(context.Background(), gdb, k, 0)
	if err != nil {
		t.Fatalf("Reserve(%s): %v", k.Key, err)
	}
	return r
}

func TestReserveCompleteRelease(t *testing.T) {
	t.Parallel()
	gdb := newLedgerDB(t)
	ctx := context.Background()
	k := key("checkout-1", `{"item":"starter"}`)

	r := reserve(t, gdb, k)
	if r.Replayed || r.Result != nil {
		t.Fatalf("first Reserve = %+v", r)
	}
	if _, err := db.Reserve(ctx, gdb, k, 0); !errs.Is(err, errs.IdempotencyKeyInFlight) {
		t.Fatalf("Reserve while in flight = %v, want idempotency_key_in_flight", err)
	}
	if _, _, err := db.Once(ctx, gdb, k, func(*gorm.DB) ([]byte, error) { return nil, errors.New("must not run") }); !errs.Is(err, errs.IdempotencyKeyInFlight) {
		t.Fatalf("Once on an in-flight reservation = %v, want in flight", err)
	}
	if _, err := db.Reserve(ctx, gdb, key("checkout-1", "other body"), 0); !errs.Is(err, errs.IdempotencyKeyReused) {
		t.Fatalf("Reserve with another body = %v, want reused", err)
	}

	// Failure path: release, then the retry may reserve again at once.
	if err := r.Release(ctx, gdb); err != nil {
		t.Fatalf("Release: %v", err)
	}
	if err := r.Complete(ctx, gdb, []byte("late")); !errs.Is(err, errs.Conflict) {
		t.Fatalf("Complete after Release = %v, want conflict", err)
	}
	again := reserve(t, gdb, k)
	if again.Replayed {
		t.Fatalf("Reserve after Release = %+v", again)
	}
	// The first holder's late Release does not free the second's key.
	if err := r.Release(ctx, gdb); err != nil {
		t.Fatal(err)
	}
	if _, err := db.Reserve(ctx, gdb, k, 0); !errs.Is(err, errs.IdempotencyKeyInFlight) {
		t.Fatalf("an old holder's Release freed the key: %v", err)
	}

	// Success path: complete, then every later Reserve replays.
	if err := again.Complete(ctx, gdb, []byte(`{"url":"https://checkout"}`)); err != nil {
		t.Fatalf("Complete: %v", err)
	}
	if replay := reserve(t, gdb, k); !replay.Replayed || string(replay.Result) != `{"url":"https://checkout"}` {
		t.Fatalf("Reserve after Complete = %+v", replay)
	}
	if err := again.Complete(ctx, gdb, []byte("again")); !errs.Is(err, errs.Conflict) {
		t.Fatalf("second Complete = %v, want conflict", err)
	}
	if err := again.Renew(ctx, gdb); !errs.Is(err, errs.Conflict) {
		t.Fatalf("Renew of a completed key = %v, want conflict", err)
	}
	if err := again.Release(ctx, gdb); err != nil {
		t.Fatalf("Release of a completed key: %v", err)
	}
	if replay := reserve(t, gdb, k); !replay.Replayed || string(replay.Result) != `{"url":"https://checkout"}` {
		t.Fatal("Release deleted a completed result")
	}
}

// A request that died between Reserve and Complete/Release must not block
// its key for a day: once its lease lapses the key is taken over, while a
// live reservation still answers in_flight and a completed one still replays.
func TestReserveAbandonedAfterLease(t *testing.T) {
	t.Parallel()
	gdb := newLedgerDB(t)
	ctx := context.Background()
	k := key("abandoned", "a")
	first := reserve(t, gdb, k)
	if _, err := db.Reserve(ctx, gdb, k, 0); !errs.Is(err, errs.IdempotencyKeyInFlight) {
		t.Fatalf("Reserve of a live reservation = %v, want in_flight", err)
	}
	mustExec(t, gdb, `UPDATE idempotency_keys SET lease_expires_at = now() - interval '1 second'`)
	second := reserve(t, gdb, k)
	if second.Replayed {
		t.Fatalf("Reserve of an abandoned reservation = %+v; want it taken over", second)
	}
	// The first holder, were it still alive, holds nothing any more.
	if err := first.Renew(ctx, gdb); !errs.Is(err, errs.Conflict) {
		t.Fatalf("Renew by the holder that lost the key = %v, want conflict", err)
	}
	if err := first.Complete(ctx, gdb, []byte("stale")); !errs.Is(err, errs.Conflict) {
		t.Fatalf("Complete by the holder that lost the key = %v, want conflict", err)
	}
	if err := second.Complete(ctx, gdb, []byte("done")); err != nil {
		t.Fatal(err)
	}
	mustExec(t, gdb, `UPDATE idempotency_keys SET lease_expires_at = now() - interval '1 second'`)
	if got := reserve(t, gdb, k); !got.Replayed || string(got.Result) != "done" {
		t.Fatalf("Reserve of a completed key past the lease = %+v; want the stored result replayed", got)
	}
	mustExec(t, gdb, `UPDATE idempotency_keys SET created_at = now() - interval '25 hours'`)
	if got := reserve(t, gdb, k); got.Replayed {
		t.Fatalf("Reserve past the retention = %+v; want a fresh reservation", got)
	}
	// A row written before leases were stored counts from its creation.
	mustExec(t, gdb, `UPDATE idempotency_keys SET lease_expires_at = NULL, holder = NULL, completed_at = NULL, created_at = now() - interval '3 minutes'`)
	if got := reserve(t, gdb, k); got.Replayed {
		t.Fatalf("Reserve of an old abandoned reservation = %+v; want it taken over", got)
	}
}

// A holder that renews keeps its key however long it works: a reservation
// whose first lease has long passed but was renewed is still in flight.
func TestReserveRenewedOutlivesItsFirstLease(t *testing.T) {
	t.Parallel()
	gdb := newLedgerDB(t)
	ctx := context.Background()
	k := key("renewed", "a")
	r, err := db.Reserve(ctx, gdb, k, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	mustExec(t, gdb, `UPDATE idempotency_keys SET created_at = now() - interval '1 hour', lease_expires_at = now() - interval '1 second'`)
	if err := r.Renew(ctx, gdb); err != nil {
		t.Fatalf("Renew: %v", err)
	}
	if _, err := db.Reserve(ctx, gdb, k, time.Second); !errs.Is(err, errs.IdempotencyKeyInFlight) {
		t.Fatalf("Reserve of a renewed reservation = %v, want in_flight", err)
	}
	if err := r.Complete(ctx, gdb, []byte("done")); err != nil {
		t.Fatalf("Complete after renewals: %v", err)
	}
}

func TestReserveConcurrentOneWinner(t *testing.T) {
	t.Parallel()
	gdb := newLedgerDB(t)
	k := key("race", "a")
	const callers = 30
	var won, inFlight atomic.Int32
	var wg sync.WaitGroup
	start := make(chan struct{})
	for range callers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			r, err := db.Reserve(context.Background(), gdb, k, 0)
			switch {
			case err == nil && !r.Replayed:
				won.Add(1)
			case errs.Is(err, errs.IdempotencyKeyInFlight):
				inFlight.Add(1)
			default:
				t.Errorf("Reserve = %+v, %v", r, err)
			}
		}()
	}
	close(start)
	wg.Wait()
	if won.Load() != 1 || inFlight.Load() != callers-1 {
		t.Fatalf("%d winners and %d in flight, want 1 and %d", won.Load(), inFlight.Load(), callers-1)
	}
}

func TestPurgeIdempotencyKeys(t *testing.T) {
	t.Parallel()
	gdb := newLedgerDB(t)
	ctx := context.Background()
	for i := range 7 {
		if _, _, err := db.Once(ctx, gdb, key(fmt.Sprint("p", i), "a"), func(*gorm.DB) ([]byte, error) { return nil, nil }); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := db.Reserve(ctx, gdb, key("r-old", "a"), 0); err != nil {
		t.Fatal(err)
	}
	mustExec(t, gdb, `UPDATE idempotency_keys SET created_at = now() - interval '3 days' WHERE key IN ('p0', 'p1', 'p2', 'r-old')`)
	cutoff := time.Now().Add(-48 * time.Hour)
	// One batch deletes at most its size; batches repeat until one is short.
	if n, err := db.PurgeIdempotencyKeys(ctx, gdb, cutoff, 3); err != nil || n != 3 {
		t.Fatalf("one batch of 3: purged %d, %v; want 3", n, err)
	}
	var calls []int64
	n, err := db.PurgeInBatches(ctx, 1, func(ctx context.Context, size int) (int64, error) {
		n, err := db.PurgeIdempotencyKeys(ctx, gdb, cutoff, size)
		calls = append(calls, n)
		return n, err
	})
	if err != nil {
		t.Fatal(err)
	}
	if n != 1 || len(calls) != 2 || calls[0] != 1 || calls[1] != 0 {
		t.Fatalf("purged %d in batches %v, want the last old key in one batch of 1, then an empty batch", n, calls)
	}
	if left := count(t, gdb, `SELECT count(*) FROM idempotency_keys`); left != 4 {
		t.Fatalf("%d keys left, want 4", left)
	}
}

func TestHashRequest(t *testing.T) {
	t.Parallel()
	if bytes.Equal(db.HashRequest([]byte("ab"), []byte("c")), db.HashRequest([]byte("a"), []byte("bc"))) {
		t.Fatal("part boundaries do not change the hash")
	}
	if bytes.Equal(db.HashRequest([]byte("a")), db.HashRequest([]byte("a"), nil)) {
		t.Fatal("an empty trailing part does not change the hash")
	}
	if !bytes.Equal(db.HashRequest([]byte("x"), []byte("y")), db.HashRequest([]byte("x"), []byte("y"))) {
		t.Fatal("HashRequest is not deterministic")
	}
	if len(db.HashRequest()) != 32 {
		t.Fatal("not a SHA-256")
	}
}
