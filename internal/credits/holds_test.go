package credits_test

import (
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tallybilling/tally/internal/credits"
	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/errs"
)

func (f *fixture) hold(customerID string, amount int64, expiresIn time.Duration) (credits.HoldResult, error) {
	in := credits.HoldInput{CustomerID: customerID, Amount: amount, Reason: "render", ExpiresIn: expiresIn}
	r, _, err := f.svc.Hold(f.ctx, in, key(customerID, freshKey(), in))
	return r, err
}

func (f *fixture) mustHold(customerID string, amount int64, expiresIn time.Duration) credits.HoldResult {
	f.t.Helper()
	r, err := f.hold(customerID, amount, expiresIn)
	if err != nil {
		f.t.Fatalf("hold %d of %s: %v", amount, customerID, err)
	}
	return r
}

func (f *fixture) capture(customerID, holdID string, amount *int64, k string) (credits.HoldEnd, bool, error) {
	in := credits.CaptureInput{CustomerID: customerID, HoldID: holdID, Amount: amount}
	return f.svc.Capture(f.ctx, in, key(customerID, k, in))
}

func (f *fixture) release(customerID, holdID string) (credits.HoldEnd, error) {
	r, _, err := f.svc.Release(f.ctx, customerID, holdID, db.IdempotencyKey{})
	return r, err
}

func wantCode(t *testing.T, err error, code errs.Code) {
	t.Helper()
	if e, ok := errs.As(err); !ok || e.Code != code {
		t.Fatalf("got %v, want %s", err, code)
	}
}

func TestHoldKeepsCreditsFromConsumeAndCaptureSpendsThem(t *testing.T) {
	t.Parallel()
	f := newFixture(t, defaultCfg())
	f.grant("ann", 100, nil)
	h := f.mustHold("ann", 70, 0)
	if h.Balance != 100 || h.Available != 30 || h.Status != credits.HoldActive {
		t.Fatalf("hold answer %+v, want balance 100 available 30 active", h)
	}
	if want := f.clock.Now().Add(time.Hour); !h.ExpiresAt.Equal(want) {
		t.Errorf("expires_at %s, want the default hour: %s", h.ExpiresAt, want)
	}
	b := f.balance("ann")
	if b.Balance != 100 || b.Held != 70 || b.Available != 30 {
		t.Fatalf("balance %+v, want 100 owned, 70 held, 30 available", b)
	}
	// Only the 30 not held can be consumed or held.
	_, err := f.consume("ann", 31)
	wantCode(t, err, errs.InsufficientCredits)
	if e, _ := errs.As(err); e.Extra["available"] != int64(30) || e.Extra["balance"] != int64(100) {
		t.Errorf("402 extras %v, want balance 100 available 30", e.Extra)
	}
	_, err = f.hold("ann", 31, 0)
	wantCode(t, err, errs.InsufficientCredits)
	f.mustConsume("ann", 30)

	// Capture 50 of the 70: one consume entry naming the hold, 20 released.
	end, replayed, err := f.capture("ann", h.HoldID, ptr(int64(50)), "cap-1")
	if err != nil || replayed {
		t.Fatalf("capture: %v (replayed %v)", err, replayed)
	}
	if end.Status != credits.HoldCaptured || end.Captured != 50 || end.Released != 20 || end.Balance != 20 || end.Available != 20 || end.TransactionID == "" {
		t.Fatalf("capture answer %+v", end)
	}
	entries := f.ledger("ann")
	if e := entries[0]; e.Kind != credits.KindConsume || e.Amount != -50 || e.HoldID != h.HoldID || e.ID != end.TransactionID {
		t.Errorf("newest entry %+v, want the capture's consume of 50 naming the hold", e)
	}
	// The same key replays; another key is a conflict, as is a release.
	again, replayed, err := f.capture("ann", h.HoldID, ptr(int64(50)), "cap-1")
	if err != nil || !replayed || again != end {
		t.Fatalf("replay: %+v replayed=%v err=%v, want %+v", again, replayed, err, end)
	}
	_, _, err = f.capture("ann", h.HoldID, ptr(int64(50)), "cap-2")
	wantCode(t, err, errs.Conflict)
	_, err = f.release("ann", h.HoldID)
	wantCode(t, err, errs.Conflict)
	if n := f.countEvents("credits.held") + f.countEvents("credits.captured"); n != 2 {
		t.Errorf("%d held+captured events, want 2", n)
	}
	f.mustVerify()
}

func TestCaptureMoreThanHeldIsRefusedAndChangesNothing(t *testing.T) {
	t.Parallel()
	f := newFixture(t, defaultCfg())
	f.grant("bo", 10, nil)
	h := f.mustHold("bo", 5, 0)
	_, _, err := f.capture("bo", h.HoldID, ptr(int64(6)), freshKey())
	wantCode(t, err, errs.Invalid)
	_, _, err = f.capture("bo", h.HoldID, ptr(int64(-1)), freshKey())
	wantCode(t, err, errs.Invalid)
	_, _, err = f.capture("bo", "hld_nope", nil, freshKey())
	wantCode(t, err, errs.NotFound)
	// Another customer's hold id is not found for this one.
	f.grant("cy", 10, nil)
	_, _, err = f.capture("cy", h.HoldID, nil, freshKey())
	wantCode(t, err, errs.NotFound)
	if b := f.balance("bo"); b.Held != 5 || b.Balance != 10 {
		t.Fatalf("balance after refusals %+v, want 5 of 10 still held", b)
	}
	end, _, err := f.capture("bo", h.HoldID, nil, freshKey())
	if err != nil || end.Captured != 5 || end.Released != 0 || end.Balance != 5 {
		t.Fatalf("capture all: %+v %v", end, err)
	}
	f.mustVerify()
}

func TestReleaseGivesCreditsBackAndCaptureOfZeroSpendsNothing(t *testing.T) {
	t.Parallel()
	f := newFixture(t, defaultCfg())
	f.grant("di", 10, nil)
	h := f.mustHold("di", 10, 0)
	end, err := f.release("di", h.HoldID)
	if err != nil || end.Status != credits.HoldReleased || end.Released != 10 || end.Available != 10 || end.Balance != 10 {
		t.Fatalf("release: %+v %v", end, err)
	}
	h2 := f.mustHold("di", 4, 0)
	end, _, err = f.capture("di", h2.HoldID, ptr(int64(0)), freshKey())
	if err != nil || end.Status != credits.HoldCaptured || end.Captured != 0 || end.TransactionID != "" || end.Balance != 10 {
		t.Fatalf("capture of 0: %+v %v", end, err)
	}
	got, err := f.svc.GetHold(f.ctx, "di", h.HoldID)
	if err != nil || got.Status != credits.HoldReleased || got.Released != 10 {
		t.Fatalf("get: %+v %v", got, err)
	}
	page, err := f.svc.ListHolds(f.ctx, "di", credits.HoldCaptured, "", 50)
	if err != nil || len(page.Holds) != 1 || page.Holds[0].ID != h2.HoldID {
		t.Fatalf("list captured: %+v %v", page, err)
	}
	f.mustVerify()
}

func TestOverdueHoldIsReleasedByTheNextWriteAndByTheSweeper(t *testing.T) {
	t.Parallel()
	f := newFixture(t, defaultCfg())
	f.grant("ed", 10, nil)
	f.grant("fay", 10, nil)
	h := f.mustHold("ed", 10, time.Minute)
	h2 := f.mustHold("fay", 10, time.Minute)
	f.clock.Set(f.clock.Now().Add(time.Minute))
	// Reads show it expired at once.
	if b := f.balance("ed"); b.Held != 0 || b.Available != 10 {
		t.Fatalf("balance of an overdue hold %+v, want nothing held", b)
	}
	// The next write releases it first: the consume gets all 10.
	f.mustConsume("ed", 10)
	_, _, err := f.capture("ed", h.HoldID, nil, freshKey())
	wantCode(t, err, errs.Conflict)
	// The sweeper releases the other.
	if _, err := f.sweep.SweepOnce(f.ctx); err != nil {
		t.Fatal(err)
	}
	got, err := f.svc.GetHold(f.ctx, "fay", h2.HoldID)
	if err != nil || got.Status != credits.HoldExpired || got.Released != 10 || got.EndedAt == nil {
		t.Fatalf("swept hold %+v %v", got, err)
	}
	if n := f.countEvents("credits.hold_expired"); n != 2 {
		t.Errorf("%d credits.hold_expired, want 2", n)
	}
	f.mustVerify()
}

func TestHeldCreditsOutliveTheirGrantsExpiryAndExpireWhenReleased(t *testing.T) {
	t.Parallel()
	f := newFixture(t, defaultCfg())
	exp := f.clock.Now().Add(time.Hour)
	f.grant("gus", 10, &exp)
	f.grant("gus", 5, nil)
	h := f.mustHold("gus", 8, 3*time.Hour) // from the expiring grant first
	h2 := f.mustHold("gus", 2, 3*time.Hour)
	f.clock.Set(exp.Add(time.Minute))
	if _, err := f.sweep.SweepOnce(f.ctx); err != nil {
		t.Fatal(err)
	}
	// The grant's unheld 0 expired; the held 10 stay owned.
	if b := f.balance("gus"); b.Balance != 15 || b.Held != 10 || b.Available != 5 {
		t.Fatalf("after the grant's expiry %+v, want 15 owned, 10 held", b)
	}
	// A capture after the expiry still spends what the hold kept.
	end, _, err := f.capture("gus", h.HoldID, ptr(int64(3)), freshKey())
	if err != nil || end.Captured != 3 {
		t.Fatalf("capture after expiry: %+v %v", end, err)
	}
	// ...and its released 5 expire at once, as do h2's 2 on release.
	if end.Balance != 7 || end.Available != 5 {
		t.Fatalf("after capture %+v, want balance 7 (5 + 2 held), available 5", end)
	}
	end, err = f.release("gus", h2.HoldID)
	if err != nil || end.Balance != 5 || end.Available != 5 {
		t.Fatalf("release after expiry: %+v %v", end, err)
	}
	if n := f.countEvents("credits.expired"); n != 2 {
		t.Errorf("%d credits.expired, want 2 (released credits of an expired grant)", n)
	}
	f.mustVerify()
}

func TestConcurrentHoldsNeverOverdraw(t *testing.T) {
	t.Parallel()
	f := newFixture(t, defaultCfg())
	f.grant("hal", 100, nil)
	var ok, refused atomic.Int64
	var wg sync.WaitGroup
	for i := 0; i < 200; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var err error
			if i%2 == 0 {
				_, err = f.hold("hal", 1, 0)
			} else {
				_, err = f.consume("hal", 1)
			}
			switch e, _ := errs.As(err); {
			case err == nil:
				ok.Add(1)
			case e != nil && e.Code == errs.InsufficientCredits:
				refused.Add(1)
			default:
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	if ok.Load() != 100 || refused.Load() != 100 {
		t.Fatalf("%d succeeded, %d refused; want 100 and 100", ok.Load(), refused.Load())
	}
	if b := f.balance("hal"); b.Available != 0 {
		t.Fatalf("balance %+v, want nothing available", b)
	}
	f.mustVerify()
}

func TestConcurrentCapturesAndReleasesEndAHoldOnce(t *testing.T) {
	t.Parallel()
	f := newFixture(t, defaultCfg())
	f.grant("ida", 100, nil)
	for round := 0; round < 5; round++ {
		h := f.mustHold("ida", 10, time.Minute)
		var ended atomic.Int64
		var wg sync.WaitGroup
		for i := 0; i < 12; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				var err error
				switch i % 4 {
				case 0:
					_, _, err = f.capture("ida", h.HoldID, ptr(int64(3)), freshKey())
				case 1:
					_, err = f.release("ida", h.HoldID)
				case 2:
					_, err = f.consume("ida", 1)
					if err == nil {
						return
					}
				case 3:
					if _, err := f.sweep.SweepOnce(f.ctx); err != nil {
						t.Error(err)
					}
					return
				}
				if err == nil {
					ended.Add(1)
				} else if e, _ := errs.As(err); e == nil || (e.Code != errs.Conflict && e.Code != errs.InsufficientCredits) {
					t.Error(err)
				}
			}()
		}
		if round%2 == 1 {
			f.clock.Set(f.clock.Now().Add(time.Minute)) // race the expiry too
		}
		wg.Wait()
		got, _ := f.svc.GetHold(f.ctx, "ida", h.HoldID)
		if ended.Load() > 1 || (ended.Load() == 0 && got.Status != credits.HoldExpired) {
			t.Fatalf("round %d: the hold ended %d times, status %s", round, ended.Load(), got.Status)
		}
	}
	f.mustVerify()
}

func TestCaptureWithOneKeyConcurrentlySpendsOnce(t *testing.T) {
	t.Parallel()
	f := newFixture(t, defaultCfg())
	f.grant("jo", 10, nil)
	h := f.mustHold("jo", 6, 0)
	var wg sync.WaitGroup
	answers := make([]credits.HoldEnd, 8)
	for i := range answers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r, _, err := f.capture("jo", h.HoldID, nil, "same-key")
			if err != nil {
				t.Error(err)
			}
			answers[i] = r
		}()
	}
	wg.Wait()
	for _, a := range answers[1:] {
		if a != answers[0] {
			t.Fatalf("answers differ: %+v vs %+v", a, answers[0])
		}
	}
	if b := f.balance("jo"); b.Balance != 4 {
		t.Fatalf("balance %d, want 4: one capture of 6", b.Balance)
	}
	f.mustVerify()
}

func TestVerifyDetectsHeldThatNoHoldKeeps(t *testing.T) {
	t.Parallel()
	f := newFixture(t, defaultCfg())
	g := f.grant("kai", 10, nil)
	f.mustHold("kai", 4, 0)
	f.mustVerify()
	if err := f.db.Exec(`UPDATE credit_grants SET held = held + 1 WHERE id = ?`, g.GrantID).Error; err != nil {
		t.Fatal(err)
	}
	rep, err := f.svc.Verify(f.ctx)
	if err != nil {
		t.Fatal(err)
	}
	if rep.OK || len(rep.Problems) == 0 || rep.Problems[0].Kind != credits.ProblemHeldMismatch {
		t.Fatalf("report %+v, want held_mismatch", rep)
	}
}

func TestVerifyDetectsAHoldLeftActiveAfterALaterWrite(t *testing.T) {
	t.Parallel()
	f := newFixture(t, defaultCfg())
	f.grant("lu", 10, nil)
	h := f.mustHold("lu", 4, time.Minute)
	// Stand for a writer that forgot to release overdue holds.
	if err := f.db.Exec(`UPDATE credit_balances SET updated_at = ?, next_hold_expiry = NULL WHERE customer_id = 'lu'`,
		f.clock.Now().Add(2*time.Minute)).Error; err != nil {
		t.Fatal(err)
	}
	rep, err := f.svc.Verify(f.ctx)
	if err != nil {
		t.Fatal(err)
	}
	if rep.OK || rep.Problems[0].Kind != credits.ProblemOverdueHold {
		t.Fatalf("report %+v, want overdue_hold for %s", rep, h.HoldID)
	}
}

func TestHoldInputIsValidated(t *testing.T) {
	t.Parallel()
	f := newFixture(t, defaultCfg())
	f.grant("mo", 10, nil)
	for _, in := range []credits.HoldInput{
		{CustomerID: "mo", Amount: 0, Reason: "x"},
		{CustomerID: "mo", Amount: -5, Reason: "x"},
		{CustomerID: "mo", Amount: 1e13, Reason: "x"},
		{CustomerID: "mo", Amount: 1, Reason: ""},
		{CustomerID: "mo", Amount: 1, Reason: "x", ExpiresIn: 604801 * time.Second},
		{CustomerID: "mo", Amount: 1, Reason: "x", ExpiresIn: 500 * time.Millisecond},
	} {
		_, _, err := f.svc.Hold(f.ctx, in, key("mo", freshKey(), in))
		wantCode(t, err, errs.Invalid)
	}
	_, err := f.hold("nobody", 1, 0)
	wantCode(t, err, errs.NotFound)
	if n := f.count(`SELECT count(*) FROM credit_holds`); n != 0 {
		t.Fatalf("%d holds written by refusals", n)
	}
}

// The balance shows, grant by grant, what the customer's live holds keep:
// each hold's draws summed per grant, not another customer's holds nor a
// hold past its expiry.
func TestBalanceShowsWhatLiveHoldsKeepOfEachGrant(t *testing.T) {
	t.Parallel()
	f := newFixture(t, defaultCfg())
	soon, later := f.clock.Now().Add(time.Hour), f.clock.Now().Add(2*time.Hour)
	first := f.grant("hal", 10, &soon)
	second := f.grant("hal", 10, &later)
	f.grant("ivy", 10, &soon)
	f.mustHold("hal", 15, time.Hour)    // 10 of the first grant, 5 of the second
	f.mustHold("hal", 3, time.Hour)     // 3 more of the second
	f.mustHold("hal", 1, 5*time.Minute) // past its expiry below
	f.mustHold("ivy", 4, time.Hour)     // another customer's
	f.clock.Set(f.clock.Now().Add(10 * time.Minute))
	b := f.balance("hal")
	type kept struct {
		id              string
		remaining, held int64
	}
	var got []kept
	for _, g := range b.Grants {
		got = append(got, kept{g.ID, g.Remaining, g.Held})
	}
	want := []kept{{first.GrantID, 10, 10}, {second.GrantID, 10, 8}}
	if len(got) != len(want) || got[0] != want[0] || got[1] != want[1] {
		t.Fatalf("grants (id, remaining, held) %v, want %v", got, want)
	}
	if b.Balance != 20 || b.Held != 18 || b.Available != 2 {
		t.Errorf("balance %d held %d available %d, want 20, 18, 2", b.Balance, b.Held, b.Available)
	}
}
