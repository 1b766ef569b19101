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
	gdb := newLedgerDB(t)
	ctx := context.Background()
	// The caller's transaction rolls back: the key must vanish with the effect.
	_ = db.InTx(ctx, gdb, func(tx *gorm.DB) error {
		if _, _, err := db.Once(ctx, tx, key("nested", "a"), func(tx *gorm.DB) ([]byte, error) {
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
	gdb := newLedgerDB(t)
	ctx := context.Background()
	fn := func(*gorm.DB) ([]byte, error) { return nil, nil }
	for _, k := range []string{"", strings.Repeat("k", 256), "bad\x00key", "bad\xffutf8"} {
		if _, _, err := db.Once(ctx, gdb, key(k, "a"), fn); !errs.Is(err, errs.Invalid) {
			t.Errorf("Once with key %q = %v, want invalid_request", k, err)
		}
		if _, _, err := db.Reserve(ctx, gdb, key(k, "a")); !errs.Is(err, errs.Invalid) {
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

func TestReserveCompleteRelease(t *testing.T) {
	gdb := newLedgerDB(t)
	ctx := context.Background()
	k := key("checkout-1", `{"item":"starter"}`)

	res, replayed, err := db.Reserve(ctx, gdb, k)
	if err != nil || replayed || res != nil {
		t.Fatalf("first Reserve = %q, %v, %v", res, replayed, err)
	}
	if _, _, err := db.Reserve(ctx, gdb, k); !errs.Is(err, errs.IdempotencyKeyInFlight) {
		t.Fatalf("Reserve while in flight = %v, want idempotency_key_in_flight", err)
	}
	if _, _, err := db.Once(ctx, gdb, k, func(*gorm.DB) ([]byte, error) { return nil, errors.New("must not run") }); !errs.Is(err, errs.IdempotencyKeyInFlight) {
		t.Fatalf("Once on an in-flight reservation = %v, want in flight", err)
	}
	if _, _, err := db.Reserve(ctx, gdb, key("checkout-1", "other body")); !errs.Is(err, errs.IdempotencyKeyReused) {
		t.Fatalf("Reserve with another body = %v, want reused", err)
	}
	// A release by someone else's body does not free our key.
	if err := db.Release(ctx, gdb, key("checkout-1", "other body")); err != nil {
		t.Fatal(err)
	}
	if _, _, err := db.Reserve(ctx, gdb, k); !errs.Is(err, errs.IdempotencyKeyInFlight) {
		t.Fatalf("foreign Release freed the key: %v", err)
	}

	// Failure path: release, then the retry may reserve again.
	if err := db.Release(ctx, gdb, k); err != nil {
		t.Fatalf("Release: %v", err)
	}
	if _, replayed, err := db.Reserve(ctx, gdb, k); err != nil || replayed {
		t.Fatalf("Reserve after Release = %v, %v", replayed, err)
	}

	// Success path: complete, then every later Reserve replays.
	if err := db.Complete(ctx, gdb, k, []byte(`{"url":"https://checkout"}`)); err != nil {
		t.Fatalf("Complete: %v", err)
	}
	res, replayed, err = db.Reserve(ctx, gdb, k)
	if err != nil || !replayed || string(res) != `{"url":"https://checkout"}` {
		t.Fatalf("Reserve after Complete = %q, %v, %v", res, replayed, err)
	}
	if err := db.Complete(ctx, gdb, k, []byte("again")); !errs.Is(err, errs.Conflict) {
		t.Fatalf("second Complete = %v, want conflict", err)
	}
	if err := db.Release(ctx, gdb, k); err != nil {
		t.Fatalf("Release of a completed key: %v", err)
	}
	if res, replayed, _ := db.Reserve(ctx, gdb, k); !replayed || string(res) != `{"url":"https://checkout"}` {
		t.Fatal("Release deleted a completed result")
	}
	if err := db.Complete(ctx, gdb, key("never-reserved", "x"), nil); !errs.Is(err, errs.Conflict) {
		t.Fatalf("Complete without Reserve = %v, want conflict", err)
	}
}

// A request that died between Reserve and Complete/Release must not block
// its key for a day: after ReservationLease the key is taken over, while a
// live reservation still answers in_flight and a completed one still replays.
func TestReserveAbandonedAfterLease(t *testing.T) {
	gdb := newLedgerDB(t)
	ctx := context.Background()
	k := key("abandoned", "a")
	if _, _, err := db.Reserve(ctx, gdb, k); err != nil {
		t.Fatal(err)
	}
	if _, _, err := db.Reserve(ctx, gdb, k); !errs.Is(err, errs.IdempotencyKeyInFlight) {
		t.Fatalf("Reserve of a live reservation = %v, want in_flight", err)
	}
	mustExec(t, gdb, `UPDATE idempotency_keys SET created_at = now() - interval '3 minutes'`)
	if _, replayed, err := db.Reserve(ctx, gdb, k); err != nil || replayed {
		t.Fatalf("Reserve of an abandoned reservation = %v, %v; want it taken over", replayed, err)
	}
	if err := db.Complete(ctx, gdb, k, []byte("done")); err != nil {
		t.Fatal(err)
	}
	mustExec(t, gdb, `UPDATE idempotency_keys SET created_at = now() - interval '3 minutes'`)
	if got, replayed, err := db.Reserve(ctx, gdb, k); err != nil || !replayed || string(got) != "done" {
		t.Fatalf("Reserve of a completed key past the lease = %q, %v, %v; want the stored result replayed", got, replayed, err)
	}
	mustExec(t, gdb, `UPDATE idempotency_keys SET created_at = now() - interval '25 hours'`)
	if _, replayed, err := db.Reserve(ctx, gdb, k); err != nil || replayed {
		t.Fatalf("Reserve past the retention = %v, %v; want a fresh reservation", replayed, err)
	}
}

func TestReserveConcurrentOneWinner(t *testing.T) {
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
			_, replayed, err := db.Reserve(context.Background(), gdb, k)
			switch {
			case err == nil && !replayed:
				won.Add(1)
			case errs.Is(err, errs.IdempotencyKeyInFlight):
				inFlight.Add(1)
			default:
				t.Errorf("Reserve = %v, %v", replayed, err)
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
	gdb := newLedgerDB(t)
	ctx := context.Background()
	for i := range 7 {
		if _, _, err := db.Once(ctx, gdb, key(fmt.Sprint("p", i), "a"), func(*gorm.DB) ([]byte, error) { return nil, nil }); err != nil {
			t.Fatal(err)
		}
	}
	if _, _, err := db.Reserve(ctx, gdb, key("r-old", "a")); err != nil {
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
