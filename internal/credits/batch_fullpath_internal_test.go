package credits

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/config"
	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/db/dbtest"
)

// The unhappy paths of runFull: a batch whose operations all come back
// 'defer' runs them through the full path, six customers' chains on four
// slots. In one chain an operation panics inside its transaction, after
// its draw; in another one runs out of its context while it waits for its
// balance row. Every call gets exactly one answer, run returns, what
// panicked or ran out of time wrote nothing (its key is free, so a retry
// applies it), the rest of their chains behave as runFull says, and the
// other customers' operations all apply.
func TestRunFullAnswersEachCallOnceWhenOnePanicsAndOneRunsOutOfTime(t *testing.T) {
	t.Parallel()
	gdb := dbtest.New(t)
	clock := time.Date(2026, 5, 1, 12, 0, 0, 0, time.UTC)
	s := New(Options{DB: gdb, Config: config.Default().Credits, Now: func() time.Time { return clock }})
	customers := []string{"late", "boom", "c1", "c2", "c3", "c4"}
	soon := clock.Add(time.Hour)
	for _, c := range customers {
		for i, in := range []GrantInput{
			{CustomerID: c, Amount: 20, Reason: "promo", Source: SourceService},
			{CustomerID: c, Amount: 1, Reason: "trial", Source: SourceService, ExpiresAt: &soon},
		} {
			b, _ := json.Marshal(in)
			if _, _, err := s.Grant(context.Background(), in, db.IdempotencyKey{Scope: "customer:" + c, Key: fmt.Sprint("g", i), RequestHash: db.HashRequest(b)}); err != nil {
				t.Fatal(err)
			}
		}
	}
	// The trial grants are due to expire: a batch leaves that to the full
	// path, so every operation below comes back 'defer'.
	clock = clock.Add(2 * time.Hour)

	call := func(customer, k string) *batchCall {
		in := ConsumeInput{CustomerID: customer, Amount: 1, Reason: "api call"}
		return s.consumeCall(context.Background(), in, batchKey(customer, k, in), "{}")
	}
	const panicMsg = "full path panicked after its draw"
	panicking := func(customer, k string) *batchCall {
		c := call(customer, k)
		in := ConsumeInput{CustomerID: customer, Amount: 1, Reason: "api call"}
		key := batchKey(customer, k, in)
		c.full = func(ctx context.Context) ([]byte, bool, error) {
			return onceRaw(ctx, s, key, func(tx *gorm.DB, threshold *int64) (consumeAnswer, error) {
				if _, err := consume(ctx, tx, s.now, in, threshold, key.Key, s.topUp); err != nil {
					return consumeAnswer{}, err
				}
				panic(panicMsg)
			})
		}
		return c
	}
	// The late customer's balance row is held by another transaction: its
	// first operation's own context runs out while it waits for it.
	const lateWait = 300 * time.Millisecond
	outOfTime := func(customer, k string) *batchCall {
		c := call(customer, k)
		fullPath := c.full
		c.full = func(ctx context.Context) ([]byte, bool, error) {
			ctx, cancel := context.WithTimeout(ctx, lateWait)
			defer cancel()
			return fullPath(ctx)
		}
		return c
	}
	blocker := lockBalanceRow(t, gdb, "late")
	defer blocker.Rollback()

	named := map[*batchCall]string{}
	add := func(name string, c *batchCall) *batchCall { named[c] = name; return c }
	late1, late2 := add("late/1", outOfTime("late", "1")), add("late/2", call("late", "2"))
	boom1, boom2, boom3 := add("boom/1", call("boom", "1")), add("boom/2", panicking("boom", "2")), add("boom/3", call("boom", "3"))
	batch := []*batchCall{late1, boom1}
	for i := 1; i <= 3; i++ {
		for _, c := range customers[2:] {
			batch = append(batch, add(fmt.Sprintf("%s/%d", c, i), call(c, fmt.Sprint(i))))
		}
		switch i {
		case 1:
			batch = append(batch, boom2, late2)
		case 2:
			batch = append(batch, boom3)
		}
	}

	ran := make(chan struct{})
	go func() {
		s.batch.run(batch)
		close(ran)
	}()
	// The late chain's second operation waits for the balance row until
	// its first has been answered.
	first := waitAnswer(t, late1)
	if err := blocker.Rollback().Error; err != nil {
		t.Fatal(err)
	}
	select {
	case <-ran:
	case <-time.After(time.Minute):
		t.Fatal("run did not return within a minute")
	}

	if n, m := s.batch.deferred.Load(), s.batch.fellBack.Load(); n != int64(len(batch)) || m != 0 {
		t.Fatalf("%d of %d operations deferred, %d fell back: want every one deferred", n, len(batch), m)
	}
	answers := map[string]batchDone{"late/1": first}
	for _, c := range batch {
		if c == late1 {
			continue
		}
		answers[named[c]] = waitAnswer(t, c)
	}
	for _, c := range batch {
		select {
		case d := <-c.done:
			t.Errorf("%s answered twice, again with %+v", named[c], d)
		default:
		}
	}

	if err := answers["late/1"].err; !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("late/1 answered %+v, want its context's deadline", answers["late/1"])
	}
	for _, name := range []string{"boom/2", "boom/3"} {
		if err := answers[name].err; err == nil || !strings.Contains(err.Error(), panicMsg) {
			t.Errorf("%s answered %+v, want the panic", name, answers[name])
		}
	}
	for name, d := range answers {
		if name == "late/1" || name == "boom/2" || name == "boom/3" {
			continue
		}
		if d.err != nil || d.replayed {
			t.Errorf("%s answered %+v, want it applied", name, d)
		}
	}
	// 21 granted, the trial credit expired: late and boom spent one each,
	// the others three.
	want := map[string]int64{"late": 19, "boom": 19, "c1": 17, "c2": 17, "c3": 17, "c4": 17}
	for c, w := range want {
		if b := balanceOf(t, gdb, c); b != w {
			t.Errorf("%s has %d, want %d", c, b, w)
		}
	}
	mustVerifyDB(t, gdb)

	// Nothing of the calls that failed was kept: their keys apply now.
	retries := []*batchCall{call("late", "1"), call("boom", "2"), call("boom", "3")}
	s.batch.run(retries)
	for i, c := range retries {
		if d := waitAnswer(t, c); d.err != nil || d.replayed {
			t.Errorf("retry %d answered %+v, want it applied", i, d)
		}
	}
	if balanceOf(t, gdb, "late") != 18 || balanceOf(t, gdb, "boom") != 17 {
		t.Errorf("after the retries late has %d, boom %d; want 18 and 17", balanceOf(t, gdb, "late"), balanceOf(t, gdb, "boom"))
	}
	mustVerifyDB(t, gdb)
}

// waitAnswer is c's answer, failing the test when none comes within a minute.
func waitAnswer(t *testing.T, c *batchCall) batchDone {
	t.Helper()
	select {
	case d := <-c.done:
		return d
	case <-time.After(time.Minute):
		t.Fatal("no answer within a minute")
		return batchDone{}
	}
}

// A batch that panics before its statement (here its clock) answers every
// call in it with the panic, once; the batcher goes on: consumes sent at
// once to many customers through Consume all return, those of the other
// batches apply, the panicked ones wrote nothing and apply when retried.
func TestAPanickingBatchAnswersEachCallAndTheBatcherGoesOn(t *testing.T) {
	t.Parallel()
	gdb := dbtest.New(t)
	var armed atomic.Bool
	const panicMsg = "the clock broke"
	now := func() time.Time {
		if armed.CompareAndSwap(true, false) {
			panic(panicMsg)
		}
		return time.Now()
	}
	s := New(Options{DB: gdb, Config: config.Default().Credits, Now: now})
	customers := []string{"a", "b", "c", "d", "e", "f"}
	for _, c := range customers {
		batchGrant(t, s, c, 100)
	}
	type outcome struct {
		customer, key string
		err           error
	}
	consume := func(customer, k string) error {
		in := ConsumeInput{CustomerID: customer, Amount: 1, Reason: "api call"}
		_, _, err := s.Consume(context.Background(), in, batchKey(customer, k, in))
		return err
	}
	armed.Store(true)
	const perCustomer = 10
	out := make(chan outcome, len(customers)*perCustomer)
	var wg sync.WaitGroup
	for _, c := range customers {
		for i := range perCustomer {
			wg.Go(func() {
				k := fmt.Sprint("k", i)
				out <- outcome{c, k, consume(c, k)}
			})
		}
	}
	returned := make(chan struct{})
	go func() { wg.Wait(); close(returned) }()
	select {
	case <-returned:
	case <-time.After(time.Minute):
		t.Fatal("consumes still waiting after a minute")
	}
	close(out)
	spent := map[string]int64{}
	var panicked []outcome
	for o := range out {
		switch {
		case o.err == nil:
			spent[o.customer]++
		case strings.Contains(o.err.Error(), "consume batch panicked: "+panicMsg):
			panicked = append(panicked, o)
		default:
			t.Errorf("%s/%s: %v", o.customer, o.key, o.err)
		}
	}
	if len(panicked) == 0 || armed.Load() {
		t.Fatalf("%d consumes got the panic (clock still armed: %t); want the first batch's", len(panicked), armed.Load())
	}
	for _, c := range customers {
		if b := balanceOf(t, gdb, c); b != 100-spent[c] {
			t.Errorf("%s has %d after %d consumes applied", c, b, spent[c])
		}
	}
	for _, o := range panicked {
		if err := consume(o.customer, o.key); err != nil {
			t.Errorf("retry of %s/%s: %v", o.customer, o.key, err)
		}
	}
	for _, c := range customers {
		if b := balanceOf(t, gdb, c); b != 100-perCustomer {
			t.Errorf("%s has %d after the retries, want %d", c, b, 100-perCustomer)
		}
	}
	mustVerifyDB(t, gdb)
}

// What goes the full path is exported: the operations a batch deferred
// (here three consumes of a customer whose grant is due to expire, beside
// one the batch applies itself) and those of a batch whose statement failed.
func TestFullPathOperationsAreCountedInTheMetrics(t *testing.T) {
	t.Parallel()
	gdb := dbtest.New(t)
	clock := time.Date(2026, 5, 1, 12, 0, 0, 0, time.UTC)
	reg := prometheus.NewRegistry()
	s := New(Options{DB: gdb, Config: config.Default().Credits, Now: func() time.Time { return clock }, Registry: reg})
	soon := clock.Add(time.Hour)
	in := GrantInput{CustomerID: "expiring", Amount: 5, Reason: "trial", Source: SourceService, ExpiresAt: &soon}
	b, _ := json.Marshal(in)
	if _, _, err := s.Grant(context.Background(), in, db.IdempotencyKey{Scope: "customer:expiring", Key: "g", RequestHash: db.HashRequest(b)}); err != nil {
		t.Fatal(err)
	}
	batchGrant(t, s, "expiring", 20)
	batchGrant(t, s, "plain", 20)
	clock = clock.Add(2 * time.Hour)
	call := func(customer, k string) *batchCall {
		in := ConsumeInput{CustomerID: customer, Amount: 1, Reason: "api call"}
		return s.consumeCall(context.Background(), in, batchKey(customer, k, in), "{}")
	}
	for name, want := range map[string]float64{"tally_credits_batch_deferred_total": 0, "tally_credits_batch_fell_back_total": 0} {
		if got := counterValue(t, reg, name); got != want {
			t.Errorf("%s = %v before any batch, want %v", name, got, want)
		}
	}

	batch := []*batchCall{call("expiring", "1"), call("plain", "1"), call("expiring", "2"), call("expiring", "3")}
	s.batch.run(batch)
	for _, c := range batch {
		if d := waitAnswer(t, c); d.err != nil {
			t.Fatal(d.err)
		}
	}
	if got := counterValue(t, reg, "tally_credits_batch_deferred_total"); got != 3 {
		t.Errorf("tally_credits_batch_deferred_total = %v after a batch that deferred 3, want 3", got)
	}
	if got := counterValue(t, reg, "tally_credits_batch_fell_back_total"); got != 0 {
		t.Errorf("tally_credits_batch_fell_back_total = %v, want 0", got)
	}

	// A ledger that refuses the plain customer's consumes fails the batch's
	// statement: both of its operations run one by one.
	if err := gdb.Exec(`CREATE FUNCTION curse() RETURNS trigger LANGUAGE plpgsql AS $$
		BEGIN IF NEW.customer_id = 'plain' AND NEW.kind = 'consume' THEN RAISE EXCEPTION 'cursed'; END IF; RETURN NEW; END $$;
		CREATE TRIGGER curse BEFORE INSERT ON credit_ledger FOR EACH ROW EXECUTE FUNCTION curse()`).Error; err != nil {
		t.Fatal(err)
	}
	batch = []*batchCall{call("plain", "2"), call("expiring", "4")}
	s.batch.run(batch)
	for _, c := range batch {
		waitAnswer(t, c)
	}
	if got := counterValue(t, reg, "tally_credits_batch_fell_back_total"); got != 2 {
		t.Errorf("tally_credits_batch_fell_back_total = %v after a failed batch of 2, want 2", got)
	}
	if got := counterValue(t, reg, "tally_credits_batch_deferred_total"); got != 3 {
		t.Errorf("tally_credits_batch_deferred_total = %v, want still 3", got)
	}
}

// counterValue reads the counter name from reg, failing the test when reg
// does not export it.
func counterValue(t *testing.T, reg *prometheus.Registry, name string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name && len(mf.GetMetric()) == 1 && mf.GetMetric()[0].GetCounter() != nil {
			return mf.GetMetric()[0].GetCounter().GetValue()
		}
	}
	t.Fatalf("the registry exports no counter %s", name)
	return 0
}
