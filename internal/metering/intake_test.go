package metering_test

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/errs"
	"github.com/tallybilling/tally/internal/metering"
)

func TestIngestRejectsEachBadEventAndStoresTheRest(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	now := time.Now()
	link(t, e.db, "alice")
	cases := []struct {
		in       metering.EventInput
		wantText string // in the detail; "" means accepted
	}{
		{ev("alice", "ok-1", 3), ""},
		{metering.EventInput{CustomerID: "alice", Meter: testMeter, Value: 1, Identifier: "old", Timestamp: new(now.Add(-36 * 24 * time.Hour))}, "more than 35 days old"},
		{metering.EventInput{CustomerID: "alice", Meter: testMeter, Value: 1, Identifier: "ahead", Timestamp: new(now.Add(6 * time.Minute))}, "more than 5 minutes in the future"},
		{ev("alice", "fraction", 1.5), "whole number"},
		{ev("alice", "negative", -1), "must not be negative"},
		{ev("alice", "huge", 1e16), "at most 9007199254740991"},
		{metering.EventInput{CustomerID: "alice", Meter: "nope", Value: 1, Identifier: "meter"}, `unknown meter "nope"`},
		{ev("bad customer!", "customer", 1), "customer_id"},
		{ev("alice", "", 1), "identifier must be 1 to 100"},
		{ev("alice", strings.Repeat("x", 101), 1), "identifier must be 1 to 100"},
		{ev("alice", "nul\x00", 1), "control characters"},
		{metering.EventInput{CustomerID: "alice", Meter: testMeter, Value: 1, Identifier: "zero", Timestamp: &time.Time{}}, "zero time"},
		{metering.EventInput{CustomerID: "alice", Meter: testMeter, Value: 0, Identifier: "ok-2", Timestamp: new(now.Add(-34 * 24 * time.Hour))}, ""},
		{metering.EventInput{CustomerID: "alice", Meter: testMeter, Value: 7, Identifier: "ok-3", Timestamp: new(now.Add(4 * time.Minute))}, ""},
	}
	in := make([]metering.EventInput, len(cases))
	for i, c := range cases {
		in[i] = c.in
	}
	res := ingest(t, e.svc, in...)
	if res.Accepted != 3 || res.Rejected != len(cases)-3 || res.Duplicates != 0 {
		t.Fatalf("counts accepted=%d rejected=%d duplicates=%d, want 3, %d, 0", res.Accepted, res.Rejected, res.Duplicates, len(cases)-3)
	}
	for i, c := range cases {
		r := res.Results[i]
		if r.Identifier != c.in.Identifier {
			t.Errorf("result %d is for %q, want %q (request order)", i, r.Identifier, c.in.Identifier)
		}
		if c.wantText == "" {
			if r.Status != metering.ResultAccepted {
				t.Errorf("%q: status %s (%s), want accepted", c.in.Identifier, r.Status, r.Detail)
			}
			continue
		}
		if r.Status != metering.ResultRejected || r.Code != errs.Invalid || !strings.Contains(r.Detail, c.wantText) {
			t.Errorf("%q: got %s %s %q, want rejected invalid_request mentioning %q", c.in.Identifier, r.Status, r.Code, r.Detail, c.wantText)
		}
	}
	if n := countRows(t, e.db, `true`); n != 3 {
		t.Errorf("%d rows stored, want only the 3 accepted", n)
	}
	if n := countRows(t, e.db, `identifier IN ('ok-1','ok-2','ok-3') AND status = 'pending'`); n != 3 {
		t.Errorf("%d accepted events of a linked customer pending, want 3", n)
	}
}

func TestIngestBatchOutsideLimitsStoresNothing(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	for _, n := range []int{0, metering.MaxBatch + 1} {
		evs := make([]metering.EventInput, n)
		for i := range evs {
			evs[i] = ev("bob", fmt.Sprintf("b-%d", i), 1)
		}
		_, _, err := e.svc.Ingest(context.Background(), evs, db.IdempotencyKey{})
		if !errs.Is(err, errs.Invalid) {
			t.Errorf("batch of %d: error %v, want invalid_request", n, err)
		}
	}
	if n := countRows(t, e.db, `true`); n != 0 {
		t.Errorf("%d rows stored, want 0", n)
	}
	var customers int64
	e.db.Raw(`SELECT count(*) FROM customers`).Scan(&customers)
	if customers != 0 {
		t.Errorf("%d customers created by refused batches, want 0", customers)
	}
}

func TestIngestDuplicatesAreStoredOnce(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	res := ingest(t, e.svc, ev("carol", "d-1", 1), ev("carol", "d-2", 2), ev("carol", "d-1", 1))
	if res.Accepted != 2 || res.Duplicates != 1 || res.Results[2].Status != metering.ResultDuplicate {
		t.Fatalf("first batch: %+v, want 2 accepted and the repeat of d-1 a duplicate", res)
	}
	res = ingest(t, e.svc, ev("carol", "d-2", 2), ev("carol", "d-3", 3))
	if res.Accepted != 1 || res.Duplicates != 1 || res.Results[0].Status != metering.ResultDuplicate {
		t.Fatalf("second batch: %+v, want d-2 a duplicate and d-3 accepted", res)
	}
	var total int64
	e.db.Raw(`SELECT sum(value) FROM usage_events`).Scan(&total)
	if n := countRows(t, e.db, `true`); n != 3 || total != 6 {
		t.Errorf("%d rows summing to %d, want 3 rows summing to 6 (each stored once)", n, total)
	}
}

// Many clients posting overlapping batches at once: every identifier is
// stored once, and exactly one post reports it accepted.
func TestIngestConcurrentOverlappingBatches(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	const posters, perBatch = 12, 100
	var mu sync.Mutex
	accepted := map[string]int{}
	var wg sync.WaitGroup
	for p := range posters {
		wg.Go(func() {
			// Poster p covers identifiers [p*50, p*50+100): each overlaps its neighbours.
			evs := make([]metering.EventInput, perBatch)
			for i := range evs {
				n := p*perBatch/2 + i
				evs[i] = ev(fmt.Sprintf("cust-%d", n%7), fmt.Sprintf("c-%04d", n), 1)
			}
			res, _, err := e.svc.Ingest(context.Background(), evs, db.IdempotencyKey{})
			if err != nil {
				t.Errorf("poster %d: %v", p, err)
				return
			}
			mu.Lock()
			defer mu.Unlock()
			for _, r := range res.Results {
				if r.Status == metering.ResultAccepted {
					accepted[r.Identifier]++
				}
			}
		})
	}
	wg.Wait()
	distinct := (posters + 1) * perBatch / 2
	if len(accepted) != distinct {
		t.Errorf("%d identifiers accepted, want %d", len(accepted), distinct)
	}
	for id, n := range accepted {
		if n != 1 {
			t.Errorf("%s accepted by %d posts, want 1", id, n)
		}
	}
	if n := countRows(t, e.db, `true`); n != int64(distinct) {
		t.Errorf("%d rows, want %d", n, distinct)
	}
}

func TestIngestIdempotencyKeyReplaysWholeBatch(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	key := func(body string) db.IdempotencyKey {
		return db.IdempotencyKey{Scope: "key:test", Key: "batch-1", RequestHash: db.HashRequest([]byte(body))}
	}
	batch := []metering.EventInput{ev("dan", "k-1", 1), ev("dan", "k-2", 2)}
	first, replayed, err := e.svc.Ingest(context.Background(), batch, key("a"))
	if err != nil || replayed || first.Accepted != 2 {
		t.Fatalf("first: %+v replayed=%v err=%v", first, replayed, err)
	}
	again, replayed, err := e.svc.Ingest(context.Background(), batch, key("a"))
	if err != nil || !replayed || again.Accepted != 2 || again.Duplicates != 0 {
		t.Fatalf("replay: %+v replayed=%v err=%v, want the first answer (2 accepted) replayed", again, replayed, err)
	}
	_, _, err = e.svc.Ingest(context.Background(), []metering.EventInput{ev("dan", "k-3", 1)}, key("b"))
	if !errs.Is(err, errs.IdempotencyKeyReused) {
		t.Fatalf("same key, other body: %v, want idempotency_key_reused", err)
	}
	if n := countRows(t, e.db, `true`); n != 2 {
		t.Errorf("%d rows, want 2", n)
	}
}

func TestIngestUnknownCustomerIsCreatedAndWaits(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ingest(t, e.svc, ev("erin", "w-1", 4))
	got, err := e.svc.Get(context.Background(), "w-1")
	if err != nil {
		t.Fatal(err)
	}
	if got.Status != metering.StatusWaitingCustomer || got.CustomerID != "erin" || got.Value != 4 {
		t.Errorf("event %+v, want erin's value 4 waiting_customer", got)
	}
	if _, err := e.svc.Get(context.Background(), "missing"); !errs.Is(err, errs.NotFound) {
		t.Errorf("unknown identifier: %v, want not_found", err)
	}
}

// FuzzValidateEvent feeds event validation arbitrary input: it must never
// panic, and whatever it accepts must meet Stripe's limits.
func FuzzValidateEvent(f *testing.F) {
	f.Add("alice", testMeter, 1.0, "id-1", int64(0))
	f.Add("alice", testMeter, 1.5, "id-2", int64(-60))
	f.Add("alice", testMeter, -1.0, "id-3", int64(60))
	f.Add("a:b@c.d", "unknown", 0.0, "", int64(-36*24*3600))
	f.Add("", testMeter, 9007199254740993.0, strings.Repeat("é", 100), int64(301))
	f.Add("x", otherMeter, 1e300, "nul\x00", int64(299))
	cat := testCatalog()
	now := time.Date(2026, 11, 23, 12, 0, 0, 0, time.UTC)
	f.Fuzz(func(t *testing.T, customer, meter string, value float64, identifier string, offset int64) {
		in := metering.EventInput{CustomerID: customer, Meter: meter, Value: value, Identifier: identifier}
		if offset != 0 {
			in.Timestamp = new(now.Add(time.Duration(offset) * time.Second))
		}
		err := in.Validate(cat, now)
		if err != nil {
			if !errs.Is(err, errs.Invalid) {
				t.Fatalf("error %v is not invalid_request", err)
			}
			return
		}
		if value < 0 || value != float64(int64(value)) || value > metering.MaxValue {
			t.Fatalf("accepted value %v", value)
		}
		if n := len([]rune(identifier)); n < 1 || n > metering.MaxIdentifierLen {
			t.Fatalf("accepted identifier of %d characters", n)
		}
		if _, ok := cat.PlanByMeter(meter); !ok {
			t.Fatalf("accepted unknown meter %q", meter)
		}
		if d := time.Duration(offset) * time.Second; d < -metering.DeliveryWindow || d > metering.MaxAhead {
			t.Fatalf("accepted timestamp offset %s", d)
		}
	})
}

// Stripe dedupes identifiers across the whole account. An identifier already
// stored for another event (another customer, meter, value or timestamp) is a
// conflict: nothing is stored and the first event stands. Only the same
// event again is a duplicate; a repeat that omits the timestamp matches the
// stored one whatever its time (a retried batch without timestamps).
func TestIngestIdentifierConflicts(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ts := time.Now().Add(-time.Hour).Truncate(time.Second)
	at := func(d time.Duration) *time.Time { t := ts.Add(d); return &t }
	first := ingest(t, e.svc,
		metering.EventInput{CustomerID: "alice", Meter: testMeter, Value: 5, Identifier: "u-1", Timestamp: at(0)},
		ev("alice", "u-2", 2))
	if first.Accepted != 2 {
		t.Fatalf("first batch %+v, want 2 accepted", first)
	}
	res := ingest(t, e.svc,
		metering.EventInput{CustomerID: "bob", Meter: testMeter, Value: 500, Identifier: "u-1", Timestamp: at(0)},  // another customer
		metering.EventInput{CustomerID: "alice", Meter: otherMeter, Value: 5, Identifier: "u-1", Timestamp: at(0)}, // another meter
		metering.EventInput{CustomerID: "alice", Meter: testMeter, Value: 6, Identifier: "u-1", Timestamp: at(0)},  // another value
		metering.EventInput{CustomerID: "alice", Meter: testMeter, Value: 5, Identifier: "u-1", Timestamp: at(time.Second)},
		metering.EventInput{CustomerID: "alice", Meter: testMeter, Value: 5, Identifier: "u-1", Timestamp: at(0)}, // the same event
		ev("alice", "u-1", 5), // the same event, timestamp omitted
		ev("alice", "u-2", 2), // stored without a timestamp; repeated without one
		// Within one batch: the first copy is taken, a different second is a conflict.
		ev("carol", "u-3", 1), ev("dave", "u-3", 1), ev("carol", "u-3", 1),
	)
	want := []metering.ResultStatus{
		metering.ResultConflict, metering.ResultConflict, metering.ResultConflict, metering.ResultConflict,
		metering.ResultDuplicate, metering.ResultDuplicate, metering.ResultDuplicate,
		metering.ResultAccepted, metering.ResultConflict, metering.ResultDuplicate,
	}
	for i, r := range res.Results {
		if r.Status != want[i] {
			t.Errorf("result %d (%s): %s %s, want %s", i, r.Identifier, r.Status, r.Detail, want[i])
		}
		if r.Status == metering.ResultConflict && (r.Code != errs.IdentifierConflict || !strings.Contains(r.Detail, "new identifier")) {
			t.Errorf("conflict %d: code %q detail %q, want identifier_conflict telling to use a new identifier", i, r.Code, r.Detail)
		}
		if r.Status == metering.ResultConflict && strings.Contains(r.Detail, "alice") {
			t.Errorf("conflict %d tells who holds the identifier: %q", i, r.Detail)
		}
	}
	if res.Accepted != 1 || res.Duplicates != 4 || res.Conflicts != 5 || res.Rejected != 0 {
		t.Errorf("counts %+v, want 1 accepted, 4 duplicates, 5 conflicts", res)
	}
	got, err := e.svc.Get(context.Background(), "u-1")
	if err != nil || got.CustomerID != "alice" || got.Value != 5 || !got.Timestamp.Equal(ts) {
		t.Errorf("u-1 is %+v %v, want alice's 5 at %s untouched", got, err, ts)
	}
	if n := countRows(t, e.db, `true`); n != 3 {
		t.Errorf("%d rows, want 3 (u-1, u-2, u-3)", n)
	}
	var bob int64
	e.db.Raw(`SELECT count(*) FROM customers WHERE id IN ('bob', 'dave')`).Scan(&bob)
	if bob != 0 {
		t.Errorf("customers of conflicting events were created (%d); a conflict stores nothing", bob)
	}
}

// Many clients claim one identifier at once, each for another customer:
// exactly one event is stored, every other post is answered conflict, and
// the stored event is the one answered accepted.
func TestIngestConcurrentConflictsStoreOneEvent(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	const posters = 16
	results := make([]metering.IntakeResult, posters)
	var wg sync.WaitGroup
	for p := range posters {
		wg.Go(func() {
			res, _, err := e.svc.Ingest(context.Background(), []metering.EventInput{
				ev(fmt.Sprintf("racer-%02d", p), "contested", float64(p)),
				ev(fmt.Sprintf("racer-%02d", p), fmt.Sprintf("own-%02d", p), 1),
			}, db.IdempotencyKey{})
			if err != nil {
				t.Errorf("poster %d: %v", p, err)
			}
			results[p] = res
		})
	}
	wg.Wait()
	winner := -1
	for p, res := range results {
		switch res.Results[0].Status {
		case metering.ResultAccepted:
			if winner >= 0 {
				t.Errorf("posters %d and %d both accepted", winner, p)
			}
			winner = p
		case metering.ResultConflict:
		default:
			t.Errorf("poster %d: %+v, want accepted or conflict", p, res.Results[0])
		}
		if res.Results[1].Status != metering.ResultAccepted {
			t.Errorf("poster %d's own event: %+v, want accepted", p, res.Results[1])
		}
	}
	if winner < 0 {
		t.Fatal("nobody's event was accepted")
	}
	got, err := e.svc.Get(context.Background(), "contested")
	if err != nil || got.CustomerID != fmt.Sprintf("racer-%02d", winner) || got.Value != int64(winner) {
		t.Errorf("stored %+v %v, want poster %d's event", got, err, winner)
	}
	if n := countRows(t, e.db, `true`); n != posters+1 {
		t.Errorf("%d rows, want %d", n, posters+1)
	}
}

// One batch mixing every case the insert meets: known customers, a new
// customer, an identifier a new customer names that is already taken (by
// the same event and by another), and a copy within the batch. The new
// customer whose only event is taken is not created.
func TestIngestMixedBatchOfKnownAndNewCustomers(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ingest(t, e.svc, ev("known", "m-taken-same", 1), ev("known", "m-taken-other", 2))
	res := ingest(t, e.svc,
		ev("known", "m-1", 3),
		ev("fresh", "m-2", 4),
		ev("ghost", "m-taken-same", 1),   // another customer: a conflict
		ev("known", "m-taken-same", 1),   // the same event: a duplicate
		ev("ghost2", "m-taken-other", 9), // a conflict, and ghost2 is never created
		ev("fresh", "m-2", 4),            // a copy in the batch
		ev("fresh", "m-3", 5),
	)
	want := []metering.ResultStatus{metering.ResultAccepted, metering.ResultAccepted, metering.ResultConflict,
		metering.ResultDuplicate, metering.ResultConflict, metering.ResultDuplicate, metering.ResultAccepted}
	for i, r := range res.Results {
		if r.Status != want[i] {
			t.Errorf("event %d (%s): %s, want %s", i, r.Identifier, r.Status, want[i])
		}
	}
	if res.Accepted != 3 || res.Duplicates != 2 || res.Conflicts != 2 {
		t.Errorf("counts %+v", res)
	}
	if n := countRows(t, e.db, "customer_id = 'fresh'"); n != 2 {
		t.Errorf("fresh has %d events, want 2", n)
	}
	for _, c := range []string{"ghost", "ghost2"} {
		var n int64
		if err := e.db.Raw(`SELECT count(*) FROM customers WHERE id = ?`, c).Scan(&n).Error; err != nil || n != 0 {
			t.Errorf("customer %s: %d rows (%v), want none: all its events were taken", c, n, err)
		}
	}
}

// Usage events have no foreign key to customers (migration 00043: the
// insert joins customers instead); what the key also guarded, that a
// customer with usage never goes, a trigger keeps.
func TestCustomerWithUsageCannotBeDeleted(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ingest(t, e.svc, ev("keeper", "k-1", 1))
	err := e.db.Exec(`DELETE FROM customers WHERE id = 'keeper'`).Error
	if err == nil || !strings.Contains(err.Error(), "has usage events") {
		t.Fatalf("delete of a customer with usage: %v, want refused", err)
	}
	if n := countRows(t, e.db, "customer_id = 'keeper'"); n != 1 {
		t.Errorf("keeper has %d events, want 1", n)
	}
}

// Batches naming hundreds of customers new to tally create each once, with
// one customer.created each, also when several batches name the same new
// customers at once, in opposite orders and with a customer twice.
func TestIngestManyNewCustomersAtOnce(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	const customers, batches = 300, 6
	names := make([]string, customers)
	for i := range names {
		names[i] = fmt.Sprintf("newcomer-%03d", i)
	}
	var wg sync.WaitGroup
	errc := make(chan error, batches)
	for b := range batches {
		evs := make([]metering.EventInput, 0, customers+1)
		for i := range customers {
			c := names[i]
			if b%2 == 1 {
				c = names[customers-1-i]
			}
			evs = append(evs, ev(c, fmt.Sprintf("nc-%d-%d", b, i), 1))
		}
		evs = append(evs, ev(evs[0].CustomerID, fmt.Sprintf("nc-%d-again", b), 1))
		wg.Add(1)
		go func() {
			defer wg.Done()
			res, _, err := e.svc.Ingest(context.Background(), evs, db.IdempotencyKey{})
			if err == nil && res.Accepted != customers+1 {
				err = fmt.Errorf("batch %d: %+v, want every event accepted", b, res)
			}
			errc <- err
		}()
	}
	wg.Wait()
	close(errc)
	for err := range errc {
		if err != nil {
			t.Error(err)
		}
	}
	var made, announced int64
	if err := e.db.Raw(`SELECT count(*) FROM customers WHERE id LIKE 'newcomer-%'`).Scan(&made).Error; err != nil {
		t.Fatal(err)
	}
	if err := e.db.Raw(`SELECT count(DISTINCT customer_id) FILTER (WHERE n = 1) FROM (
		SELECT customer_id, count(*) AS n FROM events WHERE type = 'customer.created' AND customer_id LIKE 'newcomer-%' GROUP BY customer_id) c`).
		Scan(&announced).Error; err != nil {
		t.Fatal(err)
	}
	if made != customers || announced != customers {
		t.Errorf("%d customers created and %d announced exactly once, want %d each", made, announced, customers)
	}
	if n := countRows(t, e.db, "customer_id LIKE 'newcomer-%'"); n != batches*(customers+1) {
		t.Errorf("%d usage events stored, want %d", n, batches*(customers+1))
	}
}
