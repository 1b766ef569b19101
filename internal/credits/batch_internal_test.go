package credits

import (
	"context"
	"encoding/json"
	"fmt"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/config"
	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/db/dbtest"
	"github.com/tallybilling/tally/internal/errs"
)

// These tests drive the group commit itself: batches built by hand, so
// that what shares one statement is certain, not a matter of timing.

func batchService(t *testing.T) (*Service, *gorm.DB) {
	t.Helper()
	gdb := dbtest.New(t)
	return New(Options{DB: gdb, Config: config.Default().Credits}), gdb
}

func batchKey(customer, k string, in ConsumeInput) db.IdempotencyKey {
	b, _ := json.Marshal(in)
	return db.IdempotencyKey{Scope: "customer:" + customer, Key: k, RequestHash: db.HashRequest(b)}
}

func batchGrant(t *testing.T, s *Service, customer string, amount int64) {
	t.Helper()
	in := GrantInput{CustomerID: customer, Amount: amount, Reason: "promo", Source: SourceService}
	b, _ := json.Marshal(in)
	if _, _, err := s.Grant(context.Background(), in, db.IdempotencyKey{Scope: "customer:" + customer, Key: "grant-" + db.NewID("k"), RequestHash: db.HashRequest(b)}); err != nil {
		t.Fatal(err)
	}
}

// result is a call's answer, decoded.
type result struct {
	res      ConsumeResult
	replayed bool
	err      error
}

func wait(c *batchCall) result {
	d := <-c.done
	if d.err != nil {
		return result{err: d.err}
	}
	var a consumeAnswer
	if err := json.Unmarshal(d.answer, &a); err != nil {
		return result{err: err}
	}
	return result{res: ConsumeResult(a), replayed: d.replayed}
}

func balanceOf(t *testing.T, gdb *gorm.DB, customer string) int64 {
	t.Helper()
	var n int64
	if err := gdb.Raw(`SELECT balance FROM credit_balances WHERE customer_id = ?`, customer).Scan(&n).Error; err != nil {
		t.Fatal(err)
	}
	return n
}

func mustVerifyDB(t *testing.T, gdb *gorm.DB) {
	t.Helper()
	rep, err := Verify(context.Background(), gdb)
	if err != nil || !rep.OK {
		t.Fatalf("verify: %v %+v", err, rep.Problems)
	}
}

// One batch: refusals (402, 404, a reused key) write nothing and fail no
// neighbour; a duplicate key in the same batch spends once and replays the
// first answer; a refused key is not stored, so it can succeed later.
func TestOneBatchAnswersEachConsumeOnItsOwn(t *testing.T) {
	t.Parallel()
	s, gdb := batchService(t)
	call := func(customer string, amount int64, k string) *batchCall {
		in := ConsumeInput{CustomerID: customer, Amount: amount, Reason: "api call"}
		return s.consumeCall(context.Background(), in, batchKey(customer, k, in), "{}")
	}
	batchGrant(t, s, "rich", 10)
	batchGrant(t, s, "poor", 1)
	reusedBody := call("rich", 2, "a")
	reusedBody.item.Hash = "00"
	batch := []*batchCall{
		call("rich", 3, "a"),
		call("poor", 5, "b"), // 402
		call("rich", 3, "a"), // the same request again: a replay
		call("rich", 4, "c"),
		reusedBody,             // key a with another body
		call("ghost", 1, "g"),  // no such customer
		call("rich", 4, "d"),   // 3 left: 402
		call("poor", 1, "e"),   // the poor one's neighbours still run
		call("rich", 3, "f"),   // exactly what is left
		call("rich", 1, "h"),   // nothing left: 402
		call("poor", 1, "e"),   // replay of e
		call("poor", 1, "b2"),  // nothing left
		call("rich", 3, "a"),   // replay again, later in the batch
		call("ghost", 1, "g2"), // still no such customer
	}
	s.batch.run(batch)
	if n, m := s.batch.deferred.Load(), s.batch.fellBack.Load(); n != 0 || m != 0 {
		t.Errorf("%d consumes deferred, %d fell back: the batch did not apply them itself", n, m)
	}
	got := make([]result, len(batch))
	for i, c := range batch {
		got[i] = wait(c)
	}
	wantOK := func(i int, balance int64, replayed bool) {
		t.Helper()
		if got[i].err != nil || got[i].res.Balance != balance || got[i].replayed != replayed {
			t.Errorf("item %d: %+v, want balance %d replayed %t", i, got[i], balance, replayed)
		}
	}
	wantErr := func(i int, code errs.Code) {
		t.Helper()
		if e, ok := errs.As(got[i].err); !ok || e.Code != code {
			t.Errorf("item %d: %+v, want %s", i, got[i], code)
		}
	}
	wantOK(0, 7, false)
	wantErr(1, errs.InsufficientCredits)
	wantOK(2, 7, true)
	if got[2].res != got[0].res || got[12].res != got[0].res {
		t.Errorf("replays %+v and %+v of %+v", got[2].res, got[12].res, got[0].res)
	}
	wantOK(3, 3, false)
	wantErr(4, errs.IdempotencyKeyReused)
	wantErr(5, errs.NotFound)
	wantErr(6, errs.InsufficientCredits)
	if e, _ := errs.As(got[6].err); e.Extra["available"] != int64(3) || e.Extra["balance"] != int64(3) {
		t.Errorf("402 of item 6 says %v, want balance and available 3", e.Extra)
	}
	wantOK(7, 0, false)
	wantOK(8, 0, false)
	wantErr(9, errs.InsufficientCredits)
	wantOK(10, 0, true)
	wantErr(11, errs.InsufficientCredits)
	wantOK(12, 7, true)
	wantErr(13, errs.NotFound)
	if b := balanceOf(t, gdb, "rich"); b != 0 {
		t.Errorf("rich has %d, want 0", b)
	}
	var keys []string
	if err := gdb.Raw(`SELECT key FROM idempotency_keys WHERE scope IN ('customer:rich', 'customer:poor', 'customer:ghost') AND key NOT LIKE 'grant-%' ORDER BY key`).Scan(&keys).Error; err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(keys) != "[a c e f]" {
		t.Errorf("stored keys %v, want those of the consumes that spent: [a c e f]", keys)
	}
	// A refused key was not stored: after a top-up it spends.
	batchGrant(t, s, "poor", 5)
	retry := call("poor", 5, "b")
	s.batch.run([]*batchCall{retry})
	if d := wait(retry); d.err != nil || d.replayed || d.res.Balance != 0 {
		t.Fatalf("retry of the refused key after a top-up: %+v", d)
	}
	mustVerifyDB(t, gdb)
}

// A batch whose statement fails runs each of its consumes on its own: the
// one that fails fails alone, and the others spend once.
func TestAFailedBatchFailsOnlyTheConsumeThatFails(t *testing.T) {
	t.Parallel()
	s, gdb := batchService(t)
	call := func(customer string, amount int64, k string) *batchCall {
		in := ConsumeInput{CustomerID: customer, Amount: amount, Reason: "api call"}
		return s.consumeCall(context.Background(), in, batchKey(customer, k, in), "{}")
	}
	for _, c := range []string{"left", "cursed", "right"} {
		batchGrant(t, s, c, 10)
	}
	// A ledger that refuses the cursed customer's entries, as a broken
	// constraint would.
	if err := gdb.Exec(`CREATE FUNCTION curse() RETURNS trigger LANGUAGE plpgsql AS $$
		BEGIN IF NEW.customer_id = 'cursed' AND NEW.kind = 'consume' THEN RAISE EXCEPTION 'cursed'; END IF; RETURN NEW; END $$;
		CREATE TRIGGER curse BEFORE INSERT ON credit_ledger FOR EACH ROW EXECUTE FUNCTION curse()`).Error; err != nil {
		t.Fatal(err)
	}
	batch := []*batchCall{call("left", 1, "l"), call("cursed", 1, "c"), call("right", 1, "r"), call("left", 1, "l")}
	s.batch.run(batch)
	for i, c := range batch {
		d := wait(c)
		if (i == 1) != (d.err != nil) {
			t.Errorf("item %d: %+v", i, d)
		}
	}
	if balanceOf(t, gdb, "left") != 9 || balanceOf(t, gdb, "right") != 9 || balanceOf(t, gdb, "cursed") != 10 {
		t.Fatalf("balances %d %d %d, want 9 9 10", balanceOf(t, gdb, "left"), balanceOf(t, gdb, "right"), balanceOf(t, gdb, "cursed"))
	}
}

// Many goroutines, many duplicates: each key spends once, every copy gets
// the same answer, and exactly one copy is not a replay.
func TestConcurrentDuplicatesThroughTheBatchesSpendOnce(t *testing.T) {
	t.Parallel()
	s, gdb := batchService(t)
	customers := []string{"hot", "c1", "c2", "c3"}
	for _, c := range customers {
		batchGrant(t, s, c, 1000)
	}
	const keys, copies = 40, 5
	type answer struct {
		d   result
		key string
	}
	out := make(chan answer, keys*copies)
	var wg sync.WaitGroup
	for k := range keys {
		customer := customers[0]
		if k%2 == 1 {
			customer = customers[1+k%3]
		}
		for range copies {
			wg.Go(func() {
				in := ConsumeInput{CustomerID: customer, Amount: 3, Reason: "api call"}
				res, replayed, err := s.Consume(context.Background(), in, batchKey(customer, fmt.Sprint("k", k), in))
				out <- answer{result{res: res, replayed: replayed, err: err}, customer + "/" + fmt.Sprint(k)}
			})
		}
	}
	wg.Wait()
	close(out)
	first := map[string]ConsumeResult{}
	fresh := map[string]int{}
	for a := range out {
		if a.d.err != nil {
			t.Fatalf("%s: %v", a.key, a.d.err)
		}
		if r, ok := first[a.key]; ok && r != a.d.res {
			t.Fatalf("%s answered %+v and %+v", a.key, r, a.d.res)
		}
		first[a.key] = a.d.res
		if !a.d.replayed {
			fresh[a.key]++
		}
	}
	spent := map[string]int64{}
	for k, n := range fresh {
		if n != 1 {
			t.Fatalf("%s applied %d times", k, n)
		}
	}
	for k := range first {
		c, _, _ := strings.Cut(k, "/")
		spent[c] += 3
	}
	for _, c := range customers {
		if b := balanceOf(t, gdb, c); b != 1000-spent[c] {
			t.Errorf("%s has %d, want %d", c, b, 1000-spent[c])
		}
		var entries int64
		gdb.Raw(`SELECT count(*) FROM credit_ledger WHERE customer_id = ? AND kind = 'consume'`, c).Scan(&entries)
		if entries*3 != spent[c] {
			t.Errorf("%s has %d consume entries for %d spent", c, entries, spent[c])
		}
	}
	mustVerifyDB(t, gdb)
}

// snapshot is what a customer's credits look like in the database, with
// the customer's own ids left out, so two customers can be compared.
func snapshot(t *testing.T, gdb *gorm.DB, customer string) string {
	t.Helper()
	var out []string
	for _, q := range []string{
		`SELECT balance, held, next_expiry, next_hold_expiry, low_balance_notified, updated_at FROM credit_balances WHERE customer_id = ?`,
		`SELECT amount, remaining, held, expires_at FROM credit_grants WHERE customer_id = ? ORDER BY created_at, amount`,
		`SELECT l.kind, l.amount, l.balance_after, l.reason, l.metadata, l.hold_id IS NOT NULL AS for_hold, l.idempotency_key,
		        (SELECT jsonb_agg(jsonb_build_object('amount', d->'amount', 'grant', g.amount)) FROM jsonb_array_elements(l.draws) d
		         JOIN credit_grants g ON g.id = d->>'grant_id') AS draws, l.created_at
		 FROM credit_ledger l WHERE customer_id = ? ORDER BY seq`,
		`SELECT status, amount, captured, released, transaction_id IS NOT NULL AS has_tx, ended_at FROM credit_holds WHERE customer_id = ? ORDER BY created_at`,
		`SELECT type, data - 'id' - 'customer_id' - 'hold_id' - 'transaction_id' - 'grant_id' AS data FROM events WHERE customer_id = ? ORDER BY id`,
		`SELECT day, consumed FROM credit_consumption_daily WHERE customer_id = ?`,
	} {
		var rows []map[string]any
		if err := gdb.Raw(q, customer).Scan(&rows).Error; err != nil {
			t.Fatal(err)
		}
		out = append(out, fmt.Sprint(rows))
	}
	return strings.Join(out, "\n")
}

// A hold and a capture in a batch (credits_hold_one, credits_capture_one)
// write exactly what the full path (hold, endHold) writes: balance row,
// grants, ledger entry, hold, events, rollup, answers. Refusals in the same batch (an ended hold, too much, no such
// hold) write nothing, and a duplicate key replays.
func TestHoldAndCaptureInABatchWriteWhatTheFullPathWrites(t *testing.T) {
	t.Parallel()
	gdb := dbtest.New(t)
	clock := time.Date(2026, 5, 1, 12, 0, 0, 0, time.UTC)
	s := New(Options{DB: gdb, Config: config.Default().Credits, Now: func() time.Time { return clock }})
	later := clock.Add(48 * time.Hour)
	holds := map[string]string{}
	var heldAnswers []HoldResult
	for _, c := range []string{"fast", "slow"} {
		for _, g := range []GrantInput{
			{CustomerID: c, Amount: 5, Reason: "never expires", Source: SourceService},
			{CustomerID: c, Amount: 10, Reason: "expires", Source: SourceService, ExpiresAt: &later},
		} {
			b, _ := json.Marshal(g)
			if _, _, err := s.Grant(context.Background(), g, db.IdempotencyKey{Scope: "customer:" + c, Key: "g" + g.Reason, RequestHash: db.HashRequest(b)}); err != nil {
				t.Fatal(err)
			}
		}
		in := HoldInput{CustomerID: c, Amount: 12, Reason: "job", Metadata: map[string]string{"job": "7"}, ExpiresIn: 90 * time.Minute}
		b, _ := json.Marshal(in)
		key := db.IdempotencyKey{Scope: "customer:" + c, Key: "h", RequestHash: db.HashRequest(b)}
		var h HoldResult
		var err error
		if c == "fast" {
			h, _, err = s.Hold(context.Background(), in, key)
		} else {
			var raw []byte
			raw, _, err = onceRaw(context.Background(), s, key, func(tx *gorm.DB, threshold *int64) (HoldResult, error) {
				return hold(context.Background(), tx, s.now, in, threshold, key.Key, s.topUp)
			})
			_ = json.Unmarshal(raw, &h)
		}
		if err != nil {
			t.Fatal(err)
		}
		holds[c] = h.HoldID
		h.HoldID = ""
		heldAnswers = append(heldAnswers, h)
	}
	if heldAnswers[0] != heldAnswers[1] || heldAnswers[0].Available != 3 {
		t.Errorf("the batch's hold answered %+v, the full path's %+v", heldAnswers[0], heldAnswers[1])
	}
	clock = clock.Add(time.Minute)
	capture := func(customer, hold, k string, amount *int64) *batchCall {
		in := CaptureInput{CustomerID: customer, HoldID: hold, Amount: amount}
		b, _ := json.Marshal(in)
		key := db.IdempotencyKey{Scope: "customer:" + customer, Key: k, RequestHash: db.HashRequest(b)}
		item := newBatchItem(kindCapture, customer, key)
		item.Amount, item.Hold = amount, hold
		return newBatchCall(context.Background(), item, func(ctx context.Context) ([]byte, bool, error) {
			return onceRaw(ctx, s, key, func(tx *gorm.DB, threshold *int64) (HoldEnd, error) {
				return endHold(ctx, tx, s.now, customer, hold, true, amount, threshold, key.Key, s.topUp)
			})
		})
	}
	eleven, nine := int64(11), int64(13)
	slow := capture("slow", holds["slow"], "c", &eleven)
	if d := full(context.Background(), slow); d.err != nil {
		t.Fatal(d.err)
	}
	batch := []*batchCall{
		capture("fast", holds["fast"], "x", &nine),     // more than held
		capture("fast", "hld_nosuch", "y", nil),        // no such hold
		capture("fast", holds["fast"], "c", &eleven),   // the capture
		capture("fast", holds["fast"], "c", &eleven),   // its duplicate: a replay
		capture("fast", holds["fast"], "z", nil),       // the hold has ended
		capture("nobody", holds["fast"], "n", &eleven), // no such customer
	}
	s.batch.run(batch)
	if n, m := s.batch.deferred.Load(), s.batch.fellBack.Load(); n != 0 || m != 0 {
		t.Errorf("%d operations deferred, %d fell back: the batch did not apply them itself", n, m)
	}
	var answers []batchDone
	for _, c := range batch {
		answers = append(answers, <-c.done)
	}
	for i, code := range map[int]errs.Code{0: errs.Invalid, 1: errs.NotFound, 4: errs.Conflict, 5: errs.NotFound} {
		if e, ok := errs.As(answers[i].err); !ok || e.Code != code {
			t.Errorf("item %d: %+v, want %s", i, answers[i], code)
		}
	}
	if answers[2].err != nil || answers[2].replayed || answers[3].err != nil || !answers[3].replayed || string(answers[2].answer) != string(answers[3].answer) {
		t.Fatalf("capture and its duplicate: %+v / %+v", answers[2], answers[3])
	}
	var fast, slowEnd HoldEnd
	_ = json.Unmarshal(answers[2].answer, &fast)
	d := full(context.Background(), slow) // a replay now
	_ = json.Unmarshal(d.answer, &slowEnd)
	fast.HoldID, fast.TransactionID, slowEnd.HoldID, slowEnd.TransactionID = "", "", "", ""
	if fast != slowEnd || fast.Captured != 11 || fast.Released != 1 || fast.Balance != 4 || fast.Available != 4 {
		t.Errorf("batch answered %+v, the full path %+v", fast, slowEnd)
	}
	if a, b := snapshot(t, gdb, "fast"), snapshot(t, gdb, "slow"); a != b {
		t.Errorf("the batch wrote\n%s\nthe full path\n%s", a, b)
	}
	mustVerifyDB(t, gdb)
}

// A hot customer's batch (credits_consume_run: one read, one write of each
// row for the whole run) writes and answers what the full path writes and
// answers one consume at a time: draws across grants in draw order, a
// duplicate key inside the run replayed, a refusal in the middle that
// leaves the rest running; and, where a consume of the run has a
// low-balance notice to fire, the run applies what came before it and
// leaves it and the rest (their keys claimed with the run's, then given
// back) to the full path, in order.
func TestAHotCustomersBatchWritesWhatOneByOneWrites(t *testing.T) {
	t.Parallel()
	type step struct {
		key    string
		amount int64
	}
	for _, tc := range []struct {
		name      string
		threshold int64
		steps     []step
		deferred  bool
	}{
		{"applied whole", 0, []step{{"a", 3}, {"b", 4}, {"a", 3}, {"c", 50}, {"d", 6}, {"b", 4}, {"e", 5}, {"f", 1}, {"g", 1}}, false},
		// 19 credits, the notice below 10: "d" crosses it.
		// 19 credits: refusals in the middle (each leaves its key free for
		// another body under it), a key three times with two bodies, and
		// the credits run out exactly.
		{"refusals and repeats", 0, []step{{"a", 3}, {"x", 100}, {"x", 2}, {"x", 2}, {"y", 100}, {"y", 100}, {"a", 4}, {"x", 5}, {"z", 14}, {"w", 1}, {"z", 14}}, false},
		{"a notice in the middle", 10, []step{{"a", 3}, {"b", 4}, {"c", 1}, {"d", 2}, {"e", 1}, {"a", 3}, {"b", 5}, {"f", 1}}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			gdb := dbtest.New(t)
			clock := time.Date(2026, 5, 1, 12, 0, 0, 0, time.UTC)
			cfg := config.Default().Credits
			cfg.DefaultLowBalanceThreshold = tc.threshold
			s := New(Options{DB: gdb, Config: cfg, Now: func() time.Time { return clock }})
			later := clock.Add(48 * time.Hour)
			for _, c := range []string{"fast", "slow"} {
				for _, g := range []GrantInput{
					{CustomerID: c, Amount: 5, Reason: "never expires", Source: SourceService},
					{CustomerID: c, Amount: 10, Reason: "expires", Source: SourceService, ExpiresAt: &later},
					{CustomerID: c, Amount: 4, Reason: "first", Source: SourceService, Priority: ptr(1)},
				} {
					b, _ := json.Marshal(g)
					if _, _, err := s.Grant(context.Background(), g, db.IdempotencyKey{Scope: "customer:" + c, Key: "g" + g.Reason, RequestHash: db.HashRequest(b)}); err != nil {
						t.Fatal(err)
					}
				}
			}
			clock = clock.Add(time.Minute)
			calls := func(customer string) []*batchCall {
				var out []*batchCall
				for _, st := range tc.steps {
					in := ConsumeInput{CustomerID: customer, Amount: st.amount, Reason: "call " + st.key, Metadata: map[string]string{"k": st.key}}
					meta, _ := metadataJSON(in.Metadata)
					out = append(out, s.consumeCall(context.Background(), in, batchKey(customer, st.key, in), meta))
				}
				return out
			}
			fast, slow := calls("fast"), calls("slow")
			s.batch.run(fast)
			if n, m := s.batch.deferred.Load(), s.batch.fellBack.Load(); (n != 0) != tc.deferred || m != 0 {
				t.Errorf("%d consumes deferred (want some: %t), %d fell back", n, tc.deferred, m)
			}
			for i := range tc.steps {
				f, sl := wait(fast[i]), full(context.Background(), slow[i])
				var a consumeAnswer
				if sl.err == nil {
					_ = json.Unmarshal(sl.answer, &a)
				}
				f.res.TransactionID, a.TransactionID = "", ""
				fe, _ := errs.As(f.err)
				se, _ := errs.As(sl.err)
				if f.res != ConsumeResult(a) || f.replayed != sl.replayed || (f.err == nil) != (sl.err == nil) ||
					(fe != nil && (fe.Code != se.Code || fmt.Sprint(fe.Extra) != fmt.Sprint(se.Extra))) {
					t.Errorf("step %d %+v: the run answered %+v %v, one by one %+v %v", i, tc.steps[i], f, f.err, a, sl.err)
				}
			}
			if a, b := snapshot(t, gdb, "fast"), snapshot(t, gdb, "slow"); strings.ReplaceAll(a, "fast", "X") != strings.ReplaceAll(b, "slow", "X") {
				t.Errorf("the run wrote\n%s\none by one\n%s", a, b)
			}
			mustVerifyDB(t, gdb)
		})
	}
}

func ptr[T any](v T) *T { return &v }

// A consume whose request ends while it waits for its customer's running
// batch is taken out of the queue and applies nothing; the batch it waited
// behind still completes.
func TestAConsumeCanceledWhileQueuedAppliesNothing(t *testing.T) {
	t.Parallel()
	s, gdb := batchService(t)
	batchGrant(t, s, "x", 10)
	// An open transaction holds key k1, so the batch that claims it waits.
	blocker := gdb.Begin()
	defer blocker.Rollback()
	if err := blocker.Exec(`INSERT INTO idempotency_keys (scope, key, request_hash) VALUES ('customer:x', 'k1', '\x00')`).Error; err != nil {
		t.Fatal(err)
	}
	first := make(chan error, 1)
	go func() {
		in := ConsumeInput{CustomerID: "x", Amount: 1, Reason: "api call"}
		_, _, err := s.Consume(context.Background(), in, batchKey("x", "k1", in))
		first <- err
	}()
	waitFor(t, func() bool {
		var n int64
		gdb.Raw(`SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'`).Scan(&n)
		return n > 0
	})
	ctx, cancel := context.WithCancel(context.Background())
	second := make(chan error, 1)
	go func() {
		in := ConsumeInput{CustomerID: "x", Amount: 1, Reason: "api call"}
		_, _, err := s.Consume(ctx, in, batchKey("x", "k2", in))
		second <- err
	}()
	waitFor(t, func() bool {
		s.batch.mu.Lock()
		defer s.batch.mu.Unlock()
		return len(s.batch.queue) == 1
	})
	cancel()
	if err := <-second; err == nil {
		t.Fatal("a consume canceled while queued answered success")
	}
	if err := blocker.Rollback().Error; err != nil {
		t.Fatal(err)
	}
	if err := <-first; err != nil {
		t.Fatal(err)
	}
	var entries int64
	gdb.Raw(`SELECT count(*) FROM credit_ledger WHERE customer_id = 'x' AND kind = 'consume'`).Scan(&entries)
	if entries != 1 || balanceOf(t, gdb, "x") != 9 {
		t.Fatalf("%d consume entries, balance %d: want the first consume only", entries, balanceOf(t, gdb, "x"))
	}
	mustVerifyDB(t, gdb)
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met within a minute")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// A batch of many customers, one consume each (consume-many), goes through
// credits_consume_set (migration 00049) where it can and one by one where
// it cannot; either way each customer ends exactly as a twin that took the
// same consume through the full path: rows, events, answers and refusals.
// The cases: a plain draw, one beside a hold, one that needs two grants,
// one that crosses the low-balance threshold, one with grants due to
// expire, one whose credits are not effective yet, a 402, a replay, a key
// reused with another body and an unknown customer.
func TestManyCustomersInOneBatchWriteWhatTheFullPathWrites(t *testing.T) {
	t.Parallel()
	gdb := dbtest.New(t)
	clock := time.Date(2026, 5, 1, 12, 0, 0, 0, time.UTC)
	cfg := config.Default().Credits
	cfg.DefaultLowBalanceThreshold = 5
	s := New(Options{DB: gdb, Config: cfg, Now: func() time.Time { return clock }})
	soon, tomorrow := clock.Add(time.Hour), clock.Add(24*time.Hour)
	type grant struct {
		amount   int64
		priority *int
		expires  *time.Time
		from     *time.Time
	}
	type tcase struct {
		name   string
		grants []grant
		hold   int64
		amount int64
		// before is a consume of this amount under the same key, applied
		// first (a replay when equal to amount, a reused key when not).
		before int64
		// set: credits_consume_set applies it; otherwise it is left to
		// the loop.
		set bool
	}
	cases := []tcase{
		{name: "plain", grants: []grant{{amount: 20}}, amount: 3, set: true},
		{name: "beside-hold", grants: []grant{{amount: 20}}, hold: 4, amount: 6, set: true},
		{name: "two-grants", grants: []grant{{amount: 2, priority: ptr(1)}, {amount: 20}}, amount: 5},
		{name: "low", grants: []grant{{amount: 7}}, amount: 3},
		{name: "expiring", grants: []grant{{amount: 20}, {amount: 4, expires: &soon}}, amount: 3},
		{name: "scheduled", grants: []grant{{amount: 3}, {amount: 20, from: &tomorrow}}, amount: 5},
		{name: "short", grants: []grant{{amount: 8}}, amount: 9},
		{name: "replay", grants: []grant{{amount: 20}}, amount: 2, before: 2},
		{name: "reused", grants: []grant{{amount: 20}}, amount: 2, before: 1},
		{name: "ghost", amount: 1},
	}
	consume := func(customer string, amount int64, k string) *batchCall {
		in := ConsumeInput{CustomerID: customer, Amount: amount, Reason: "api call", Metadata: map[string]string{"case": customer[:len(customer)-2]}}
		meta, _ := metadataJSON(in.Metadata)
		return s.consumeCall(context.Background(), in, batchKey(customer, k, in), meta)
	}
	for _, c := range cases {
		for _, twin := range []string{"-f", "-s"} {
			customer := c.name + twin
			for i, g := range c.grants {
				in := GrantInput{CustomerID: customer, Amount: g.amount, Reason: fmt.Sprint("grant ", i), Source: SourceService,
					Priority: g.priority, ExpiresAt: g.expires, EffectiveAt: g.from}
				b, _ := json.Marshal(in)
				if _, _, err := s.Grant(context.Background(), in, db.IdempotencyKey{Scope: "customer:" + customer, Key: fmt.Sprint("g", i), RequestHash: db.HashRequest(b)}); err != nil {
					t.Fatal(err)
				}
			}
			if c.hold > 0 {
				in := HoldInput{CustomerID: customer, Amount: c.hold, Reason: "job", ExpiresIn: 3 * time.Hour}
				b, _ := json.Marshal(in)
				if _, _, err := s.Hold(context.Background(), in, db.IdempotencyKey{Scope: "customer:" + customer, Key: "h", RequestHash: db.HashRequest(b)}); err != nil {
					t.Fatal(err)
				}
			}
			if c.before > 0 {
				if d := full(context.Background(), consume(customer, c.before, "k")); d.err != nil {
					t.Fatal(d.err)
				}
			}
		}
	}
	clock = clock.Add(2 * time.Hour) // the expiring grant is due now

	// What credits_consume_set itself takes of such a batch (rolled back).
	var fast, slow []*batchCall
	for _, c := range cases {
		fast = append(fast, consume(c.name+"-f", c.amount, "k"))
		slow = append(slow, consume(c.name+"-s", c.amount, "k"))
	}
	items := make([]batchItem, len(fast))
	for i, c := range fast {
		items[i] = c.item
		items[i].ID = db.NewID("ctx")
	}
	js, _ := json.Marshal(items)
	// It answers a row for each item it applied, and one with no result
	// for each item whose balance row it locked but left (migration 00052).
	var took, left []int
	rollback := fmt.Errorf("roll back")
	err := gdb.Transaction(func(tx *gorm.DB) error {
		var rows []struct {
			Pos     int
			Applied bool
		}
		if err := tx.Raw(`SELECT pos, result IS NOT NULL AS applied FROM credits_consume_set(?::jsonb, ?, ?, true, 120) ORDER BY pos`, string(js), clock, cfg.DefaultLowBalanceThreshold).Scan(&rows).Error; err != nil {
			return err
		}
		for _, r := range rows {
			if r.Applied {
				took = append(took, r.Pos)
			} else {
				left = append(left, r.Pos)
			}
		}
		return rollback
	})
	if err != rollback {
		t.Fatal(err)
	}
	var want []int
	for i, c := range cases {
		if c.set {
			want = append(want, i)
		}
	}
	if fmt.Sprint(took) != fmt.Sprint(want) {
		t.Errorf("credits_consume_set applied items %v, want %v", took, want)
	}
	var wantLeft []int
	for i, c := range cases {
		if !c.set && c.name != "ghost" {
			wantLeft = append(wantLeft, i)
		}
	}
	if fmt.Sprint(left) != fmt.Sprint(wantLeft) {
		t.Errorf("credits_consume_set locked and left items %v, want %v", left, wantLeft)
	}

	s.batch.run(fast)
	if n, m := s.batch.deferred.Load(), s.batch.fellBack.Load(); n != 2 || m != 0 {
		t.Errorf("%d consumes deferred, %d fell back: want the low and the expiring one deferred", n, m)
	}
	for i, c := range cases {
		f, sl := <-fast[i].done, full(context.Background(), slow[i])
		var fa, sa consumeAnswer
		_ = json.Unmarshal(f.answer, &fa)
		_ = json.Unmarshal(sl.answer, &sa)
		if (fa.TransactionID == "") != (sa.TransactionID == "") {
			t.Errorf("%s: transaction ids %q and %q", c.name, fa.TransactionID, sa.TransactionID)
		}
		fa.TransactionID, sa.TransactionID = "", ""
		fe, _ := errs.As(f.err)
		se, _ := errs.As(sl.err)
		if fa != sa || f.replayed != sl.replayed || (f.err == nil) != (sl.err == nil) ||
			(fe != nil && (se == nil || fe.Code != se.Code || fmt.Sprint(fe.Extra) != fmt.Sprint(se.Extra))) {
			t.Errorf("%s: the batch answered %+v %v %v, the full path %+v %v %v", c.name, fa, f.replayed, f.err, sa, sl.replayed, sl.err)
		}
		if a, b := snapshot(t, gdb, c.name+"-f"), snapshot(t, gdb, c.name+"-s"); strings.ReplaceAll(a, c.name+"-f", "X") != strings.ReplaceAll(b, c.name+"-s", "X") {
			t.Errorf("%s: the batch wrote\n%s\nthe full path\n%s", c.name, a, b)
		}
		// The stored answers replay alike.
		var keys []string
		gdb.Raw(`SELECT (result IS NOT NULL)::text || ' ' || (completed_at = created_at)::text || ' ' || (lease_expires_at > created_at)::text || ' ' || (holder IS NULL)::text
			FROM idempotency_keys WHERE scope IN (?, ?) AND key = 'k' ORDER BY scope`, "customer:"+c.name+"-f", "customer:"+c.name+"-s").Scan(&keys)
		if len(keys) == 2 && keys[0] != keys[1] {
			t.Errorf("%s: key rows %v", c.name, keys)
		}
	}
	mustVerifyDB(t, gdb)
}

// Many customers at once, as consume-many sends them, attacked: each key
// sent three times at once (the copies meet in one batch, where their
// customer is not alone and goes one by one, or in two, where the later
// one finds the key taken), a copy with another body, and customers whose
// balance runs out, so 402s stand next to successes. Each key spends once,
// its copies replay its answer, the other body is refused, the balances
// and the ledger agree.
func TestManyCustomersConcurrentDuplicatesReusesAndRefusals(t *testing.T) {
	t.Parallel()
	s, gdb := batchService(t)
	const customers, keysEach, copies = 60, 4, 3
	for c := range customers {
		// Every third customer can pay for only two of its four consumes.
		amount := int64(100)
		if c%3 == 0 {
			amount = 4
		}
		batchGrant(t, s, fmt.Sprint("m", c), amount)
	}
	type answer struct {
		key      string
		res      ConsumeResult
		replayed bool
		err      error
		other    bool
	}
	out := make(chan answer, customers*keysEach*(copies+1))
	var wg sync.WaitGroup
	for k := range keysEach {
		for c := range customers {
			customer := fmt.Sprint("m", c)
			for i := range copies + 1 {
				wg.Go(func() {
					in := ConsumeInput{CustomerID: customer, Amount: 2, Reason: "api call"}
					key := batchKey(customer, fmt.Sprint("k", k), in)
					other := i == copies
					if other {
						key.RequestHash = db.HashRequest([]byte("another body"))
					}
					res, replayed, err := s.Consume(context.Background(), in, key)
					out <- answer{customer + "/" + fmt.Sprint(k), res, replayed, err, other}
				})
			}
		}
	}
	wg.Wait()
	close(out)
	// Per key: exactly one copy applied (not a replay), whichever body
	// came first. The copies with the winner's body replay its answer;
	// those with the other body are refused as a reused key. A 402 is
	// not stored: its copies may each be refused, or (none applied) not.
	byKey := map[string][]answer{}
	for a := range out {
		byKey[a.key] = append(byKey[a.key], a)
	}
	applied := map[string]bool{}
	for k, as := range byKey {
		var winner *answer
		for i, a := range as {
			if a.err == nil && !a.replayed {
				if winner != nil {
					t.Fatalf("%s applied twice: %+v and %+v", k, *winner, a)
				}
				winner = &as[i]
			}
		}
		for _, a := range as {
			e, _ := errs.As(a.err)
			switch {
			case winner == nil:
				if e == nil || e.Code != errs.InsufficientCredits {
					t.Errorf("%s: nothing applied, yet a copy answered %+v", k, a)
				}
			case a.other == winner.other:
				if a.err != nil || a.res != winner.res {
					t.Errorf("%s: a copy answered %+v, the winner %+v", k, a, *winner)
				}
			default:
				if e == nil || e.Code != errs.IdempotencyKeyReused {
					t.Errorf("%s: a copy with the other body answered %+v", k, a)
				}
			}
		}
		applied[k] = winner != nil
	}
	for c := range customers {
		customer := fmt.Sprint("m", c)
		var got struct{ Spent, Entries int64 }
		if err := gdb.Raw(`SELECT COALESCE(-sum(amount), 0) AS spent, count(*) AS entries FROM credit_ledger WHERE customer_id = ? AND kind = 'consume'`, customer).Scan(&got).Error; err != nil {
			t.Fatal(err)
		}
		var n int64
		for k := range keysEach {
			if applied[customer+"/"+fmt.Sprint(k)] {
				n++
			}
		}
		granted := int64(100)
		if c%3 == 0 {
			granted = 4
		}
		if b := balanceOf(t, gdb, customer); b != granted-2*n || got.Entries != n || got.Spent != 2*n {
			t.Errorf("%s: balance %d, %d entries spending %d, %d keys applied, granted %d", customer, b, got.Entries, got.Spent, n, granted)
		}
		if want := min(int64(keysEach), granted/2); n != want {
			t.Errorf("%s: %d keys applied, want %d", customer, n, want)
		}
	}
	mustVerifyDB(t, gdb)
}

// A database URL may choose pgx's protocol (default_query_exec_mode, the
// usual setting behind PgBouncer). The batch's statement must work in
// every mode, not fall back to running its consumes one by one: in the
// exec and simple protocol modes pgx sends a []byte argument as bytea,
// which jsonb does not take.
func TestConsumeBatchAppliesInEveryQueryExecMode(t *testing.T) {
	t.Parallel()
	for _, mode := range []string{"cache_statement", "cache_describe", "describe_exec", "exec", "simple_protocol"} {
		t.Run(mode, func(t *testing.T) {
			t.Parallel()
			gdb := openWithParam(t, dbtest.NewURL(t), "default_query_exec_mode", mode)
			s := New(Options{DB: gdb, Config: config.Default().Credits})
			batchGrant(t, s, "c1", 10)
			batchGrant(t, s, "c2", 10)
			call := func(customer, k string) *batchCall {
				in := ConsumeInput{CustomerID: customer, Amount: 3, Reason: "api call"}
				return s.consumeCall(context.Background(), in, batchKey(customer, k, in), "{}")
			}
			batch := []*batchCall{call("c1", "a"), call("c2", "b"), call("c1", "c")}
			s.batch.run(batch)
			for i, c := range batch {
				if r := wait(c); r.err != nil {
					t.Errorf("consume %d: %v", i, r.err)
				}
			}
			if n, m := s.batch.deferred.Load(), s.batch.fellBack.Load(); n != 0 || m != 0 {
				t.Errorf("%d consumes deferred, %d fell back: the batch's statement did not run in mode %s", n, m, mode)
			}
			if got := balanceOf(t, gdb, "c1"); got != 4 {
				t.Errorf("c1's balance %d, want 4", got)
			}
			mustVerifyDB(t, gdb)
		})
	}
}

// openWithParam opens a pool on dbURL with one more connection parameter.
// lockBalanceRow holds customer's balance row in a transaction of gdb,
// as a concurrent writer would, until the caller rolls it back.
func lockBalanceRow(t *testing.T, gdb *gorm.DB, customer string) *gorm.DB {
	t.Helper()
	tx := gdb.Begin()
	if err := tx.Exec(`SELECT 1 FROM credit_balances WHERE customer_id = ? FOR UPDATE`, customer).Error; err != nil {
		t.Fatal(err)
	}
	return tx
}

func openWithParam(t *testing.T, dbURL, key, value string) *gorm.DB {
	t.Helper()
	u, err := url.Parse(dbURL)
	if err != nil {
		t.Fatal(err)
	}
	q := u.Query()
	q.Set(key, value)
	u.RawQuery = q.Encode()
	gdb, err := db.Open(context.Background(), u.String(), 4, dbtest.Logger(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = db.Close(gdb) })
	return gdb
}

// An operator's statement_timeout cancels a consume that waits too long
// for its customer's balance (another transaction holds it): the consume
// answers unavailable (503, retry), not internal (500), and writes
// nothing; the same key retried once the lock is gone applies once.
func TestConsumeCancelledByStatementTimeoutIsUnavailable(t *testing.T) {
	t.Parallel()
	dbURL := dbtest.NewURL(t)
	gdb := openWithParam(t, dbURL, "statement_timeout", "300")
	s := New(Options{DB: gdb, Config: config.Default().Credits})
	batchGrant(t, s, "c1", 10)

	tx := lockBalanceRow(t, openWithParam(t, dbURL, "application_name", "holder"), "c1")
	in := ConsumeInput{CustomerID: "c1", Amount: 3, Reason: "api call"}
	key := batchKey("c1", "k1", in)
	_, _, err := s.Consume(context.Background(), in, key)
	if errs.CodeOf(err) != errs.Unavailable {
		t.Errorf("a consume cancelled by statement_timeout: %v (code %s), want unavailable", err, errs.CodeOf(err))
	}
	if err := tx.Rollback().Error; err != nil {
		t.Fatal(err)
	}
	if got := balanceOf(t, gdb, "c1"); got != 10 {
		t.Errorf("balance %d after the cancelled consume, want 10", got)
	}
	res, replayed, err := s.Consume(context.Background(), in, key)
	if err != nil || replayed || res.Balance != 7 {
		t.Errorf("the retry: %+v replayed %v err %v, want balance 7, applied now", res, replayed, err)
	}
	mustVerifyDB(t, gdb)
}

// A consume whose request ended while its batch was still applying it is
// answered Unavailable, but the batch applies it all the same (a retry
// replays it): the credits it spent count in tally_credits_consumed_total
// then, as they do for a caller that waited.
func TestAConsumeAppliedAfterItsRequestEndedIsCounted(t *testing.T) {
	t.Parallel()
	gdb := dbtest.New(t)
	reg := prometheus.NewRegistry()
	s := New(Options{DB: gdb, Config: config.Default().Credits, Registry: reg})
	consumed := func() float64 { return counterValue(t, reg, "tally_credits_consumed_total") }
	batchGrant(t, s, "c1", 10)

	// The balance row is held: the batch leaves the consume to the full
	// path, which waits for the row past the request's end and its grace.
	tx := lockBalanceRow(t, gdb, "c1")
	in := ConsumeInput{CustomerID: "c1", Amount: 3, Reason: "api call"}
	key := batchKey("c1", "k1", in)
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if _, _, err := s.Consume(ctx, in, key); errs.CodeOf(err) != errs.Unavailable {
		t.Fatalf("a consume whose request ended first: %v (code %s), want unavailable", err, errs.CodeOf(err))
	}
	if err := tx.Rollback().Error; err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for balanceOf(t, gdb, "c1") != 7 {
		if time.Now().After(deadline) {
			t.Fatal("the consume was never applied")
		}
		time.Sleep(20 * time.Millisecond)
	}
	// The counter is added once the batch has answered the call.
	for consumed() != 3 {
		if time.Now().After(deadline) {
			t.Fatalf("tally_credits_consumed_total is %v after the consume was applied, want 3", consumed())
		}
		time.Sleep(20 * time.Millisecond)
	}
	if _, replayed, err := s.Consume(context.Background(), in, key); err != nil || !replayed {
		t.Fatalf("the retry: replayed %v, %v", replayed, err)
	}
	if got := consumed(); got != 3 {
		t.Errorf("tally_credits_consumed_total is %v after the replay, want 3 (a replay spends nothing)", got)
	}
}

// A batch the server cancels (an operator's statement_timeout) rolled back
// on a working connection: its consumes go the full path one by one, where
// each smaller statement may pass, instead of all answering unavailable as
// for a lost connection. A trigger makes a ledger insert cost 100 ms a
// row, so the batch's one insert of 20 rows passes the 1 s timeout and each
// consume's own does not.
//
// The margins are wide (the trigger 100 ms a row, the timeout 1 s): with
// 10 ms a row and a 100 ms timeout, a full suite on a loaded machine took
// 149 and 227 ms for a single consume's statement, which then answered
// unavailable too.
func TestCancelledBatchRunsItsConsumesOnTheFullPath(t *testing.T) {
	t.Parallel()
	dbURL := dbtest.NewURL(t)
	gdb := openWithParam(t, dbURL, "statement_timeout", "1000")
	s := New(Options{DB: gdb, Config: config.Default().Credits})
	const n = 20
	for i := range n {
		batchGrant(t, s, fmt.Sprintf("c%d", i), 10)
	}
	err := gdb.Exec(`CREATE FUNCTION slow_ledger() RETURNS trigger LANGUAGE plpgsql AS $$
		BEGIN PERFORM pg_sleep(0.1 * (SELECT count(*) FROM added)); RETURN NULL; END $$;
		CREATE TRIGGER slow_ledger AFTER INSERT ON credit_ledger REFERENCING NEW TABLE AS added
		FOR EACH STATEMENT EXECUTE FUNCTION slow_ledger()`).Error
	if err != nil {
		t.Fatal(err)
	}
	batch := make([]*batchCall, n)
	for i := range batch {
		customer := fmt.Sprintf("c%d", i)
		in := ConsumeInput{CustomerID: customer, Amount: 3, Reason: "api call"}
		batch[i] = s.consumeCall(context.Background(), in, batchKey(customer, "k", in), "{}")
	}
	s.batch.run(batch)
	for i, c := range batch {
		if r := wait(c); r.err != nil || r.res.Balance != 7 {
			t.Errorf("consume %d: %+v, want balance 7", i, r)
		}
	}
	if m := s.batch.fellBack.Load(); m != n {
		t.Errorf("%d consumes fell back to the full path, want %d (the batch was not cancelled, or its consumes answered unavailable)", m, n)
	}
	mustVerifyDB(t, gdb)
}
