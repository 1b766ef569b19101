package credits_test

import (
	"testing"
	"time"

	"github.com/tallybilling/tally/internal/credits"
	"github.com/tallybilling/tally/internal/errs"
)

func (f *fixture) grantWith(in credits.GrantInput) credits.GrantResult {
	f.t.Helper()
	if in.Reason == "" {
		in.Reason = "promo"
	}
	if in.Source == "" {
		in.Source = credits.SourceService
	}
	r, _, err := f.svc.Grant(f.ctx, in, key(in.CustomerID, freshKey(), in))
	if err != nil {
		f.t.Fatalf("grant %+v: %v", in, err)
	}
	return r
}

func TestDrawOrderIsPriorityThenSoonestExpiryThenOldest(t *testing.T) {
	t.Parallel()
	f := newFixture(t, defaultCfg())
	soon := f.clock.Now().Add(time.Hour)
	later := f.clock.Now().Add(2 * time.Hour)
	never := f.grantWith(credits.GrantInput{CustomerID: "pia", Amount: 5, Priority: ptr(10)})
	laterG := f.grantWith(credits.GrantInput{CustomerID: "pia", Amount: 5, Priority: ptr(10), ExpiresAt: &later})
	soonG := f.grantWith(credits.GrantInput{CustomerID: "pia", Amount: 5, Priority: ptr(10), ExpiresAt: &soon})
	cheap := f.grantWith(credits.GrantInput{CustomerID: "pia", Amount: 5, ExpiresAt: &soon}) // priority 50
	first := f.grantWith(credits.GrantInput{CustomerID: "pia", Amount: 5, Priority: ptr(0)})
	if first.Category != credits.CategoryPromotional || first.Priority != 0 || cheap.Priority != credits.DefaultPriority {
		t.Fatalf("grant answers %+v %+v", first, cheap)
	}
	f.mustConsume("pia", 21)
	entries := f.ledger("pia")
	got := []string{}
	for _, d := range entries[0].Draws {
		got = append(got, d.GrantID)
	}
	want := []string{first.GrantID, soonG.GrantID, laterG.GrantID, never.GrantID, cheap.GrantID}
	if len(got) != len(want) {
		t.Fatalf("draws %v, want %v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("draw %d from %s, want %s (order: priority, soonest expiry, oldest)", i, got[i], want[i])
		}
	}
	if entries[0].Draws[4].Amount != 1 {
		t.Errorf("last draw %+v, want 1 from the priority-50 grant", entries[0].Draws[4])
	}
	f.mustVerify()
}

func TestScheduledGrantIsPendingUntilItsTime(t *testing.T) {
	t.Parallel()
	f := newFixture(t, defaultCfg())
	f.grant("quin", 3, nil)
	at := f.clock.Now().Add(time.Hour)
	g := f.grantWith(credits.GrantInput{CustomerID: "quin", Amount: 10, EffectiveAt: &at})
	if g.EffectiveAt == nil || !g.EffectiveAt.Equal(at) {
		t.Fatalf("grant answer %+v", g)
	}
	b := f.balance("quin")
	if b.Balance != 13 || b.Pending != 10 || b.Available != 3 {
		t.Fatalf("balance %+v, want 13 owned, 10 pending, 3 available", b)
	}
	_, err := f.consume("quin", 4)
	wantCode(t, err, errs.InsufficientCredits)
	if e, _ := errs.As(err); e.Extra["available"] != int64(3) {
		t.Errorf("402 extras %v, want available 3", e.Extra)
	}
	_, err = f.hold("quin", 4, 0)
	wantCode(t, err, errs.InsufficientCredits)
	f.clock.Set(at)
	f.mustConsume("quin", 13)
	// A past effective_at, or one after the expiry, is refused.
	past := f.clock.Now().Add(-time.Minute)
	in := credits.GrantInput{CustomerID: "quin", Amount: 1, Reason: "x", Source: credits.SourceService, EffectiveAt: &past}
	_, _, err = f.svc.Grant(f.ctx, in, key("quin", freshKey(), in))
	wantCode(t, err, errs.Invalid)
	soon, later := f.clock.Now().Add(time.Hour), f.clock.Now().Add(2*time.Hour)
	in = credits.GrantInput{CustomerID: "quin", Amount: 1, Reason: "x", Source: credits.SourceService, EffectiveAt: &later, ExpiresAt: &soon}
	_, _, err = f.svc.Grant(f.ctx, in, key("quin", freshKey(), in))
	wantCode(t, err, errs.Invalid)
	f.mustVerify()
}

func TestVoidTakesWhatIsNotHeldAndTheRestWhenReleased(t *testing.T) {
	t.Parallel()
	f := newFixture(t, defaultCfg())
	g := f.grant("rae", 10, nil)
	f.grant("rae", 5, nil)
	h := f.mustHold("rae", 4, 0) // from the older grant g
	in := credits.VoidInput{CustomerID: "rae", GrantID: g.GrantID, Reason: "granted by mistake"}
	k := key("rae", "void-1", in)
	v, replayed, err := f.svc.Void(f.ctx, in, k)
	if err != nil || replayed || v.Voided != 6 || v.Balance != 9 || v.TransactionID == "" {
		t.Fatalf("void: %+v %v %v", v, replayed, err)
	}
	again, replayed, err := f.svc.Void(f.ctx, in, k)
	if err != nil || !replayed || again != v {
		t.Fatalf("void replay: %+v %v %v", again, replayed, err)
	}
	_, _, err = f.svc.Void(f.ctx, in, key("rae", "void-2", in))
	wantCode(t, err, errs.Conflict)
	// The hold's capture still spends from the voided grant; its release
	// of the rest voids that too.
	end, _, err := f.capture("rae", h.HoldID, ptr(int64(1)), freshKey())
	if err != nil || end.Balance != 5 || end.Available != 5 {
		t.Fatalf("capture from a voided grant: %+v %v", end, err)
	}
	b := f.balance("rae")
	if len(b.Grants) != 1 || b.Balance != 5 {
		t.Fatalf("balance %+v, want only the other grant left", b)
	}
	if n := f.countEvents("credits.voided"); n != 2 {
		t.Errorf("%d credits.voided, want 2", n)
	}
	_, _, err = f.svc.Void(f.ctx, credits.VoidInput{CustomerID: "rae", GrantID: "grt_nope", Reason: "x"}, key("rae", freshKey(), 1))
	wantCode(t, err, errs.NotFound)
	f.mustVerify()
}

func TestAdjustmentsEitherWay(t *testing.T) {
	t.Parallel()
	f := newFixture(t, defaultCfg())
	add := credits.AdjustInput{CustomerID: "sid", Amount: 20, Reason: "goodwill"}
	a, _, err := f.svc.Adjust(f.ctx, add, key("sid", "adj-1", add))
	if err != nil || a.Balance != 20 || a.GrantID == "" {
		t.Fatalf("positive adjustment: %+v %v", a, err)
	}
	take := credits.AdjustInput{CustomerID: "sid", Amount: -15, Reason: "double grant"}
	r, _, err := f.svc.Adjust(f.ctx, take, key("sid", "adj-2", take))
	if err != nil || r.Balance != 5 || r.Amount != -15 {
		t.Fatalf("negative adjustment: %+v %v", r, err)
	}
	again, replayed, err := f.svc.Adjust(f.ctx, take, key("sid", "adj-2", take))
	if err != nil || !replayed || again != r {
		t.Fatalf("replay: %+v %v %v", again, replayed, err)
	}
	tooMuch := credits.AdjustInput{CustomerID: "sid", Amount: -6, Reason: "x"}
	_, _, err = f.svc.Adjust(f.ctx, tooMuch, key("sid", freshKey(), tooMuch))
	wantCode(t, err, errs.InsufficientCredits)
	zero := credits.AdjustInput{CustomerID: "sid", Amount: 0, Reason: "x"}
	_, _, err = f.svc.Adjust(f.ctx, zero, key("sid", freshKey(), zero))
	wantCode(t, err, errs.Invalid)
	kinds := []string{}
	for _, e := range f.ledger("sid") {
		kinds = append(kinds, e.Kind)
	}
	if len(kinds) != 2 || kinds[0] != credits.KindAdjust || kinds[1] != credits.KindAdjust {
		t.Fatalf("ledger kinds %v, want two adjust entries", kinds)
	}
	f.mustVerify()
}

func TestBalanceAtAPastTimeAndCheckWriteNothing(t *testing.T) {
	t.Parallel()
	f := newFixture(t, defaultCfg())
	t0 := f.clock.Now()
	f.grant("tia", 10, nil)
	f.clock.Set(t0.Add(time.Hour))
	f.mustConsume("tia", 4)
	f.clock.Set(t0.Add(2 * time.Hour))
	for _, c := range []struct {
		at   time.Time
		want int64
	}{{t0.Add(-time.Second), 0}, {t0, 10}, {t0.Add(30 * time.Minute), 10}, {t0.Add(time.Hour), 6}, {t0.Add(2 * time.Hour), 6}} {
		b, err := f.svc.BalanceAt(f.ctx, "tia", c.at)
		if err != nil || b.Balance != c.want {
			t.Errorf("balance at %s: %+v %v, want %d", c.at, b, err, c.want)
		}
	}
	_, err := f.svc.BalanceAt(f.ctx, "tia", t0.Add(3*time.Hour))
	wantCode(t, err, errs.Invalid)
	entries := f.count(`SELECT count(*) FROM credit_ledger`)
	c, err := f.svc.Check(f.ctx, "tia", 6)
	if err != nil || !c.Allowed || c.Available != 6 {
		t.Fatalf("check 6: %+v %v", c, err)
	}
	c, err = f.svc.Check(f.ctx, "tia", 7)
	if err != nil || c.Allowed {
		t.Fatalf("check 7: %+v %v", c, err)
	}
	if n := f.count(`SELECT count(*) FROM credit_ledger`); n != entries {
		t.Fatalf("check wrote %d ledger entries", n-entries)
	}
}
