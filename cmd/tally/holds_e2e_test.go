package main

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tallybilling/tally/pkg/client"
)

func holdOverHTTP(t testing.TB, c *client.ClientWithResponses, customerID string, amount int64, expiresIn *int, key string) *client.CreateHoldResponse {
	t.Helper()
	r, err := c.CreateHoldWithResponse(context.Background(), customerID, &client.CreateHoldParams{IdempotencyKey: key},
		client.HoldRequest{Amount: amount, Reason: "render video", ExpiresInSeconds: expiresIn})
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func mustHoldOverHTTP(t testing.TB, c *client.ClientWithResponses, customerID string, amount int64, expiresIn *int) client.HoldCreated {
	t.Helper()
	r := holdOverHTTP(t, c, customerID, amount, expiresIn, fmt.Sprintf("hold-%d", rand.Int64()))
	mustStatus(t, "hold", r.StatusCode(), r.Body, http.StatusCreated)
	return *r.JSON201
}

func captureOverHTTP(t testing.TB, c *client.ClientWithResponses, customerID, holdID string, amount *int64, key string) *client.CaptureHoldResponse {
	t.Helper()
	r, err := c.CaptureHoldWithResponse(context.Background(), customerID, holdID, &client.CaptureHoldParams{IdempotencyKey: key},
		client.CaptureRequest{Amount: amount})
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func releaseOverHTTP(t testing.TB, c *client.ClientWithResponses, customerID, holdID string) *client.ReleaseHoldResponse {
	t.Helper()
	r, err := c.ReleaseHoldWithResponse(context.Background(), customerID, holdID, nil)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func i64(n int64) *int64 { return &n }

// The bad day: 500 concurrent holds of 1 against 100 credits.
// Exactly 100 are granted, the rest are 402 with nothing available, and
// nothing overdraws.
func TestFiveHundredConcurrentHoldsOfOneAgainstAHundred(t *testing.T) {
	t.Parallel()
	s := startServer(t, baseEnv(t))
	c := s.wideClient(t)
	grantOverHTTP(t, c, "busy", 100, "grant-1")
	var ok, poor atomic.Int64
	var wg sync.WaitGroup
	for i := range 500 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r, err := c.CreateHoldWithResponse(context.Background(), "busy", &client.CreateHoldParams{IdempotencyKey: fmt.Sprintf("h-%d", i)},
				client.HoldRequest{Amount: 1, Reason: "job"})
			switch {
			case err != nil:
				t.Error(err)
			case r.StatusCode() == http.StatusCreated:
				ok.Add(1)
			case r.StatusCode() == http.StatusPaymentRequired:
				p := r.ApplicationproblemJSON402
				if p == nil || p.Available == nil || *p.Available != 0 || p.Balance == nil || *p.Balance != 100 {
					t.Errorf("402 without balance 100 and available 0: %s", r.Body)
				}
				poor.Add(1)
			default:
				t.Errorf("status %d: %s", r.StatusCode(), r.Body)
			}
		}()
	}
	wg.Wait()
	if ok.Load() != 100 || poor.Load() != 400 {
		t.Fatalf("%d holds granted, %d refused; want 100 and 400", ok.Load(), poor.Load())
	}
	b := balanceOverHTTP(t, c, "busy")
	if b.Balance != 100 || b.Held != 100 || b.Available != 0 {
		t.Fatalf("balance %+v, want 100 owned, all held", b)
	}
	mustVerifyClean(t, s)
}

// Holds race consumes, captures, releases and the sweeper (every 100ms,
// with holds that expire after a second) on one customer: no overdraft, no
// hold ended twice, and the balance is exactly what the successful answers
// say was spent.
func TestHoldsRaceConsumesCapturesReleasesAndTheSweeper(t *testing.T) {
	t.Parallel()
	env := baseEnv(t)
	env["TALLY_CREDITS_SWEEP_INTERVAL"] = "100ms"
	s := startServer(t, env)
	c := s.wideClient(t)
	grantOverHTTP(t, c, "racy", 300, "grant-1")
	var spent, ended, endedTwice atomic.Int64
	var wg sync.WaitGroup
	for w := range 24 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 8 {
				if w%4 == 0 {
					r, err := c.ConsumeCreditsWithResponse(context.Background(), "racy",
						&client.ConsumeCreditsParams{IdempotencyKey: fmt.Sprintf("c-%d-%d", w, i)}, client.ConsumeRequest{Amount: 2, Reason: "call"})
					if err != nil {
						t.Error(err)
						return
					}
					if r.StatusCode() == http.StatusOK {
						spent.Add(2)
					} else if r.StatusCode() != http.StatusPaymentRequired {
						t.Errorf("consume: %d %s", r.StatusCode(), r.Body)
					}
					continue
				}
				expires := 1
				var exp *int
				if i%3 == 0 {
					exp = &expires
				}
				h := holdOverHTTP(t, c, "racy", 5, exp, fmt.Sprintf("h-%d-%d", w, i))
				if h.StatusCode() == http.StatusPaymentRequired {
					continue
				}
				if h.StatusCode() != http.StatusCreated {
					t.Errorf("hold: %d %s", h.StatusCode(), h.Body)
					return
				}
				if exp != nil {
					time.Sleep(time.Duration(900+rand.IntN(300)) * time.Millisecond) // race its expiry
				}
				// Two enders race for each hold: a capture of 3 and a release.
				var wins atomic.Int64
				var inner sync.WaitGroup
				inner.Add(2)
				go func() {
					defer inner.Done()
					r := captureOverHTTP(t, c, "racy", h.JSON201.HoldId, i64(3), fmt.Sprintf("cap-%d-%d", w, i))
					switch r.StatusCode() {
					case http.StatusOK:
						wins.Add(1)
						spent.Add(r.JSON200.Captured)
					case http.StatusConflict:
					default:
						t.Errorf("capture: %d %s", r.StatusCode(), r.Body)
					}
				}()
				go func() {
					defer inner.Done()
					r := releaseOverHTTP(t, c, "racy", h.JSON201.HoldId)
					switch r.StatusCode() {
					case http.StatusOK:
						wins.Add(1)
					case http.StatusConflict:
					default:
						t.Errorf("release: %d %s", r.StatusCode(), r.Body)
					}
				}()
				inner.Wait()
				if wins.Load() > 1 {
					endedTwice.Add(1)
				}
				ended.Add(1)
			}
		}()
	}
	wg.Wait()
	if endedTwice.Load() > 0 {
		t.Fatalf("%d holds were ended twice", endedTwice.Load())
	}
	// Every hold ends: the expired ones by the sweeper within moments.
	deadline := time.Now().Add(10 * time.Second)
	for {
		b := balanceOverHTTP(t, c, "racy")
		if b.Held == 0 {
			if b.Balance != 300-spent.Load() || b.Available != b.Balance {
				t.Fatalf("balance %+v, want %d: 300 less what the successful answers spent", b, 300-spent.Load())
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("holds still held after 10s: %+v", b)
		}
		time.Sleep(100 * time.Millisecond)
	}
	gdb := openDB(t, s)
	waitFor(t, "the sweeper to record every expired hold", func() bool {
		return countRows(t, gdb, `SELECT count(*) FROM credit_holds WHERE status = 'active'`) == 0
	})
	mustVerifyClean(t, s)
}

// A capture retried with its key replays; any other end of an ended hold
// is 409; bad amounts and foreign hold ids are refused and change nothing;
// an end user reads its own holds and nothing else, and cannot make or
// end one.
func TestHoldCaptureReplaysConflictsAndHostileInput(t *testing.T) {
	t.Parallel()
	s := startServer(t, baseEnv(t))
	c := s.service(t)
	grantOverHTTP(t, c, "ivy", 50, "g-ivy")
	grantOverHTTP(t, c, "oz", 50, "g-oz")
	h := mustHoldOverHTTP(t, c, "ivy", 20, nil)
	if h.Balance != 50 || h.Available != 30 || h.Status != client.HoldCreatedStatusActive {
		t.Fatalf("hold answer %+v", h)
	}
	foreign := mustHoldOverHTTP(t, c, "oz", 5, nil)

	// Hostile amounts and ids: each refused, nothing changed.
	for _, tc := range []struct {
		path, key, body string
		want            int
	}{
		{"/v1/customers/ivy/credits/holds/" + h.HoldId + "/capture", "x1", `{"amount":21}`, http.StatusUnprocessableEntity},
		{"/v1/customers/ivy/credits/holds/" + h.HoldId + "/capture", "x2", `{"amount":-1}`, http.StatusUnprocessableEntity},
		{"/v1/customers/ivy/credits/holds/" + h.HoldId + "/capture", "x3", `{"amount":1e30}`, http.StatusUnprocessableEntity},
		{"/v1/customers/ivy/credits/holds/" + h.HoldId + "/capture", "x4", `{"amount":"5"}`, http.StatusUnprocessableEntity},
		{"/v1/customers/ivy/credits/holds/" + h.HoldId + "/capture", "x5", `{"amount":2.5}`, http.StatusUnprocessableEntity},
		{"/v1/customers/ivy/credits/holds/" + h.HoldId + "/capture", "", `{}`, http.StatusBadRequest},
		{"/v1/customers/ivy/credits/holds/" + foreign.HoldId + "/capture", "x6", `{}`, http.StatusNotFound},
		{"/v1/customers/ivy/credits/holds/" + foreign.HoldId + "/release", "", ``, http.StatusNotFound},
		{"/v1/customers/ivy/credits/holds", "x7", `{"amount":0,"reason":"r"}`, http.StatusUnprocessableEntity},
		{"/v1/customers/ivy/credits/holds", "x8", `{"amount":-5,"reason":"r"}`, http.StatusUnprocessableEntity},
		{"/v1/customers/ivy/credits/holds", "x9", `{"amount":9999999999999,"reason":"r"}`, http.StatusUnprocessableEntity},
		{"/v1/customers/ivy/credits/holds", "x10", `{"amount":1,"reason":"r","expires_in_seconds":0}`, http.StatusUnprocessableEntity},
		{"/v1/customers/ivy/credits/holds", "x11", `{"amount":1,"reason":"r","expires_in_seconds":604801}`, http.StatusUnprocessableEntity},
		{"/v1/customers/ivy/credits/holds", "x12", `{"amount":31,"reason":"r"}`, http.StatusPaymentRequired},
		{"/v1/customers/ivy/credits/holds", "", `{"amount":1,"reason":"r"}`, http.StatusBadRequest},
		{"/v1/customers/nobody/credits/holds", "x13", `{"amount":1,"reason":"r"}`, http.StatusNotFound},
	} {
		if got, p := rawJSON(t, s, http.MethodPost, tc.path, tc.key, tc.body); got != tc.want {
			t.Errorf("POST %s %s: %d (%+v), want %d", tc.path, tc.body, got, p, tc.want)
		}
	}
	if b := balanceOverHTTP(t, c, "ivy"); b.Balance != 50 || b.Held != 20 {
		t.Fatalf("after hostile input %+v, want 20 of 50 held", b)
	}

	// An end user: reads its own holds, not another's; cannot hold or end.
	user := s.client(t, userToken(t, "ivy", time.Now().Add(time.Hour)))
	if r, err := user.GetHoldWithResponse(context.Background(), "ivy", h.HoldId); err != nil || r.StatusCode() != http.StatusOK || r.JSON200.Amount != 20 {
		t.Fatalf("own hold: %v %s", err, r.Body)
	}
	if r, err := user.ListHoldsWithResponse(context.Background(), "ivy", nil); err != nil || r.StatusCode() != http.StatusOK || len(r.JSON200.Data) != 1 {
		t.Fatalf("own holds: %v %s", err, r.Body)
	}
	if r, err := user.ListHoldsWithResponse(context.Background(), "oz", nil); err != nil || r.StatusCode() != http.StatusForbidden {
		t.Fatalf("another's holds: %v %d", err, r.StatusCode())
	}
	if r, err := user.GetHoldWithResponse(context.Background(), "oz", foreign.HoldId); err != nil || r.StatusCode() != http.StatusForbidden {
		t.Fatalf("another's hold: %v %d", err, r.StatusCode())
	}
	if r := holdOverHTTP(t, user, "ivy", 1, nil, "u1"); r.StatusCode() != http.StatusForbidden {
		t.Fatalf("end-user hold: %d", r.StatusCode())
	}
	if r := captureOverHTTP(t, user, "ivy", h.HoldId, nil, "u2"); r.StatusCode() != http.StatusForbidden {
		t.Fatalf("end-user capture: %d", r.StatusCode())
	}
	if r := releaseOverHTTP(t, user, "ivy", h.HoldId); r.StatusCode() != http.StatusForbidden {
		t.Fatalf("end-user release: %d", r.StatusCode())
	}
	// The end user may check its own balance against a cost.
	if r, err := user.CheckCreditsWithResponse(context.Background(), "ivy", client.CheckRequest{Amount: 31}); err != nil ||
		r.StatusCode() != http.StatusOK || r.JSON200.Allowed || r.JSON200.Available != 30 {
		t.Fatalf("check: %v %s", err, r.Body)
	}

	// Capture 12 of 20, concurrently with the same key: one capture.
	var wg sync.WaitGroup
	answers := make([]*client.CaptureHoldResponse, 6)
	for i := range answers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			answers[i] = captureOverHTTP(t, c, "ivy", h.HoldId, i64(12), "cap-ivy")
		}()
	}
	wg.Wait()
	for _, a := range answers {
		mustStatus(t, "capture", a.StatusCode(), a.Body, http.StatusOK)
		if string(a.Body) != string(answers[0].Body) {
			t.Fatalf("answers differ: %s vs %s", a.Body, answers[0].Body)
		}
	}
	got := answers[0].JSON200
	if got.Status != client.HoldEndedStatusCaptured || got.Captured != 12 || got.Released != 8 || got.Balance != 38 || got.Available != 38 || got.TransactionId == nil {
		t.Fatalf("capture answer %+v", got)
	}
	// The same key with another hold is a different request: 422.
	other := mustHoldOverHTTP(t, c, "ivy", 1, nil)
	if r := captureOverHTTP(t, c, "ivy", other.HoldId, i64(12), "cap-ivy"); r.StatusCode() != http.StatusUnprocessableEntity {
		t.Fatalf("same key, other hold: %d %s", r.StatusCode(), r.Body)
	}
	if r := captureOverHTTP(t, c, "ivy", h.HoldId, i64(12), "cap-ivy-2"); r.StatusCode() != http.StatusConflict {
		t.Fatalf("second capture: %d %s", r.StatusCode(), r.Body)
	}
	if r := releaseOverHTTP(t, c, "ivy", h.HoldId); r.StatusCode() != http.StatusConflict {
		t.Fatalf("release after capture: %d %s", r.StatusCode(), r.Body)
	}
	entries := ledgerOverHTTP(t, c, "ivy")
	if e := entries[0]; e.Kind != client.Consume || e.Amount != -12 || e.HoldId == nil || *e.HoldId != h.HoldId {
		t.Fatalf("newest ledger entry %+v, want the capture's consume naming the hold", e)
	}
	mustVerifyClean(t, s)
}

// A hold outlives its grant's expiry: the capture still spends what it
// kept, and what it releases expires at once.
func TestHoldAcrossItsGrantsExpiry(t *testing.T) {
	t.Parallel()
	s := startServer(t, baseEnv(t))
	c := s.service(t)
	// The hold must be placed before the grant expires. A loaded machine
	// (the suite runs beside other work) may take longer than the lead
	// between the two requests: then the refusal is right, and the story
	// starts again with a new customer and twice the lead. A refusal
	// before the expiry is a failure.
	var exp time.Time
	var h client.HoldCreated
	eve := ""
	for lead := 2 * time.Second; ; lead *= 2 {
		eve = fmt.Sprintf("eve-%s", lead)
		exp = time.Now().Add(lead)
		r, err := c.GrantCreditsWithResponse(context.Background(), eve, &client.GrantCreditsParams{IdempotencyKey: "g1"},
			client.GrantRequest{Amount: 10, Reason: "trial", ExpiresAt: &exp})
		if err != nil {
			t.Fatal(err)
		}
		mustStatus(t, "grant", r.StatusCode(), r.Body, http.StatusCreated)
		hr := holdOverHTTP(t, c, eve, 6, nil, fmt.Sprintf("hold-%d", rand.Int64()))
		if hr.StatusCode() == http.StatusCreated {
			h = *hr.JSON201
			break
		}
		if time.Now().Before(exp) || lead >= patience {
			mustStatus(t, "hold before the grant expired", hr.StatusCode(), hr.Body, http.StatusCreated)
		}
		t.Logf("the hold came %s after the grant, past its expiry: again with %s", lead, 2*lead)
	}
	time.Sleep(time.Until(exp) + 200*time.Millisecond)
	if b := balanceOverHTTP(t, c, eve); b.Balance != 6 || b.Held != 6 || b.Available != 0 {
		t.Fatalf("after the grant's expiry %+v, want the 6 held still owned", b)
	}
	cr := captureOverHTTP(t, c, eve, h.HoldId, i64(4), "cap")
	mustStatus(t, "capture", cr.StatusCode(), cr.Body, http.StatusOK)
	if cr.JSON200.Captured != 4 || cr.JSON200.Balance != 0 {
		t.Fatalf("capture after expiry %+v, want 4 spent and the released 2 expired", cr.JSON200)
	}
	kinds := []client.LedgerEntryKind{}
	for _, e := range ledgerOverHTTP(t, c, eve) {
		kinds = append(kinds, e.Kind)
	}
	if fmt.Sprint(kinds) != "[expire consume expire grant]" {
		t.Fatalf("ledger kinds newest first %v, want [expire consume expire grant]", kinds)
	}
	mustVerifyClean(t, s)
}

// The sweeper releases an overdue hold by itself within its interval.
func TestSweeperReleasesAnOverdueHold(t *testing.T) {
	t.Parallel()
	env := baseEnv(t)
	env["TALLY_CREDITS_SWEEP_INTERVAL"] = "200ms"
	s := startServer(t, env)
	c := s.service(t)
	grantOverHTTP(t, c, "sam", 10, "g1")
	one := 1
	h := mustHoldOverHTTP(t, c, "sam", 10, &one)
	gdb := openDB(t, s)
	waitFor(t, "the sweeper to release the hold", func() bool {
		return countRows(t, gdb, `SELECT count(*) FROM credit_holds WHERE id = ? AND status = 'expired'`, h.HoldId) == 1
	})
	if n := countRows(t, gdb, `SELECT count(*) FROM events WHERE type = 'credits.hold_expired'`); n != 1 {
		t.Fatalf("%d credits.hold_expired events, want 1", n)
	}
	if r := captureOverHTTP(t, c, "sam", h.HoldId, nil, "late"); r.StatusCode() != http.StatusConflict {
		t.Fatalf("capture of an expired hold: %d %s", r.StatusCode(), r.Body)
	}
	mustVerifyClean(t, s)
}

// Operators' tools over HTTP: void and adjust with replays, priority and
// effective_at ordering, and the balance at a past time.
func TestVoidAdjustPriorityScheduleAndBalanceAt(t *testing.T) {
	t.Parallel()
	s := startServer(t, baseEnv(t))
	c := s.service(t)
	admin := s.admin(t)
	ctx := context.Background()
	grant := func(key string, body client.GrantRequest) client.GrantResult {
		t.Helper()
		r, err := c.GrantCreditsWithResponse(ctx, "opal", &client.GrantCreditsParams{IdempotencyKey: key}, body)
		if err != nil {
			t.Fatal(err)
		}
		mustStatus(t, "grant", r.StatusCode(), r.Body, http.StatusCreated)
		return *r.JSON201
	}
	low, promo := 10, client.GrantRequestCategoryPromotional
	first := grant("g-first", client.GrantRequest{Amount: 5, Reason: "spent first", Priority: &low, Category: &promo})
	normal := grant("g-normal", client.GrantRequest{Amount: 5, Reason: "default priority"})
	later := time.Now().Add(time.Hour)
	sched := grant("g-sched", client.GrantRequest{Amount: 7, Reason: "next month", EffectiveAt: &later})
	if first.Priority != 10 || normal.Priority != 50 || normal.Category != client.GrantResultCategoryPromotional || sched.EffectiveAt == nil {
		t.Fatalf("grant answers %+v %+v %+v", first, normal, sched)
	}
	b := balanceOverHTTP(t, c, "opal")
	if b.Balance != 17 || b.Pending != 7 || b.Available != 10 || b.Grants[0].Id != first.GrantId {
		t.Fatalf("balance %+v, want 17 owned, 7 pending, the priority-10 grant first", b)
	}
	beforeSpend := time.Now()
	time.Sleep(10 * time.Millisecond)
	r, err := c.ConsumeCreditsWithResponse(ctx, "opal", &client.ConsumeCreditsParams{IdempotencyKey: "c1"}, client.ConsumeRequest{Amount: 6, Reason: "call"})
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "consume", r.StatusCode(), r.Body, http.StatusOK)
	if r, _ := c.ConsumeCreditsWithResponse(ctx, "opal", &client.ConsumeCreditsParams{IdempotencyKey: "c2"}, client.ConsumeRequest{Amount: 5, Reason: "call"}); r.StatusCode() != http.StatusPaymentRequired {
		t.Fatalf("consume of pending credits: %d %s", r.StatusCode(), r.Body)
	}
	e := ledgerOverHTTP(t, c, "opal")[0]
	if (*e.Draws)[0].GrantId != first.GrantId || (*e.Draws)[0].Amount != 5 || (*e.Draws)[1].GrantId != normal.GrantId {
		t.Fatalf("draws %+v, want the priority-10 grant's 5 first", *e.Draws)
	}

	// Void the normal grant's 4 left: replay, then 409; another customer's
	// grant id is 404.
	void := func(key, grantID string) *client.VoidGrantResponse {
		r, err := c.VoidGrantWithResponse(ctx, "opal", grantID, &client.VoidGrantParams{IdempotencyKey: key}, client.VoidRequest{Reason: "mistake"})
		if err != nil {
			t.Fatal(err)
		}
		return r
	}
	v := void("v1", normal.GrantId)
	mustStatus(t, "void", v.StatusCode(), v.Body, http.StatusOK)
	if v.JSON200.Voided != 4 || v.JSON200.Balance != 7 {
		t.Fatalf("void %+v", v.JSON200)
	}
	if again := void("v1", normal.GrantId); again.StatusCode() != http.StatusOK || string(again.Body) != string(v.Body) || again.HTTPResponse.Header.Get("Idempotent-Replayed") != "true" {
		t.Fatalf("void replay: %d %s", again.StatusCode(), again.Body)
	}
	if again := void("v2", normal.GrantId); again.StatusCode() != http.StatusConflict {
		t.Fatalf("second void: %d %s", again.StatusCode(), again.Body)
	}
	if other := void("v3", "grt_not_hers"); other.StatusCode() != http.StatusNotFound {
		t.Fatalf("void of an unknown grant: %d", other.StatusCode())
	}

	// Adjustments: admin only, either sign, replayed, 402 when short.
	adjust := func(cl *client.ClientWithResponses, key string, amount int64) *client.AdjustCreditsResponse {
		r, err := cl.AdjustCreditsWithResponse(ctx, "opal", &client.AdjustCreditsParams{IdempotencyKey: key}, client.AdjustmentRequest{Amount: amount, Reason: "support ticket 42"})
		if err != nil {
			t.Fatal(err)
		}
		return r
	}
	if r := adjust(c, "a0", 5); r.StatusCode() != http.StatusForbidden {
		t.Fatalf("service-key adjustment: %d", r.StatusCode())
	}
	if r := adjust(admin, "a1", 0); r.StatusCode() != http.StatusUnprocessableEntity {
		t.Fatalf("zero adjustment: %d %s", r.StatusCode(), r.Body)
	}
	up := adjust(admin, "a2", 3)
	mustStatus(t, "adjust up", up.StatusCode(), up.Body, http.StatusCreated)
	if up.JSON201.Balance != 10 || up.JSON201.GrantId == nil {
		t.Fatalf("adjust up %+v", up.JSON201)
	}
	if r := adjust(admin, "a3", -4); r.StatusCode() != http.StatusPaymentRequired {
		t.Fatalf("adjust below available: %d %s", r.StatusCode(), r.Body)
	}
	down := adjust(admin, "a4", -3)
	mustStatus(t, "adjust down", down.StatusCode(), down.Body, http.StatusCreated)
	if again := adjust(admin, "a4", -3); string(again.Body) != string(down.Body) {
		t.Fatalf("adjust replay: %s vs %s", again.Body, down.Body)
	}

	// The balance at a time before the consume, and now.
	at, err := c.GetBalanceWithResponse(ctx, "opal", &client.GetBalanceParams{At: &beforeSpend})
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "balance at", at.StatusCode(), at.Body, http.StatusOK)
	past, err := at.JSON200.AsBalanceAt()
	if err != nil || past.Balance != 17 {
		t.Fatalf("balance before the consume: %+v %v (%s)", past, err, at.Body)
	}
	if b := balanceOverHTTP(t, c, "opal"); b.Balance != 7 || b.Available != 0 {
		t.Fatalf("balance now %+v, want the 7 scheduled", b)
	}
	future := time.Now().Add(time.Hour)
	if r, _ := c.GetBalanceWithResponse(ctx, "opal", &client.GetBalanceParams{At: &future}); r.StatusCode() != http.StatusBadRequest {
		t.Fatalf("balance at a future time: %d %s", r.StatusCode(), r.Body)
	}
	mustVerifyClean(t, s)
}

// Self-attack on the operators' tools: concurrent voids of one grant with
// different keys void it once; a void races captures, consumes and new
// holds without taking held credits; end users may neither void nor
// adjust; hostile adjustment amounts are refused.
func TestVoidsRacingHoldsAndHostileCorrections(t *testing.T) {
	t.Parallel()
	s := startServer(t, baseEnv(t))
	c := s.wideClient(t)
	ctx := context.Background()
	g := grantOverHTTP(t, c, "rex", 100, "g1")
	grantOverHTTP(t, c, "rex", 50, "g2")
	h := mustHoldOverHTTP(t, s.service(t), "rex", 30, nil) // from g1, the older

	var voided, conflicts atomic.Int64
	var wg sync.WaitGroup
	for i := range 24 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			switch i % 4 {
			case 0:
				r, err := c.VoidGrantWithResponse(ctx, "rex", g.GrantId, &client.VoidGrantParams{IdempotencyKey: fmt.Sprintf("v-%d", i)},
					client.VoidRequest{Reason: "duplicate grant"})
				switch {
				case err != nil:
					t.Error(err)
				case r.StatusCode() == http.StatusOK:
					voided.Add(1)
				case r.StatusCode() == http.StatusConflict:
					conflicts.Add(1)
				default:
					t.Errorf("void: %d %s", r.StatusCode(), r.Body)
				}
			case 1:
				r, err := c.ConsumeCreditsWithResponse(ctx, "rex", &client.ConsumeCreditsParams{IdempotencyKey: fmt.Sprintf("c-%d", i)},
					client.ConsumeRequest{Amount: 3, Reason: "call"})
				if err != nil || (r.StatusCode() != http.StatusOK && r.StatusCode() != http.StatusPaymentRequired) {
					t.Errorf("consume: %v %v", err, r)
				}
			case 2:
				r := holdOverHTTP(t, c, "rex", 4, nil, fmt.Sprintf("h-%d", i))
				if r.StatusCode() != http.StatusCreated && r.StatusCode() != http.StatusPaymentRequired {
					t.Errorf("hold: %d %s", r.StatusCode(), r.Body)
				}
			case 3:
				if i == 3 {
					r := captureOverHTTP(t, c, "rex", h.HoldId, i64(10), "cap")
					if r.StatusCode() != http.StatusOK {
						t.Errorf("capture from a grant being voided: %d %s", r.StatusCode(), r.Body)
					}
				}
			}
		}()
	}
	wg.Wait()
	if voided.Load() != 1 || conflicts.Load() != 5 {
		t.Fatalf("%d voids, %d conflicts; want 1 and 5", voided.Load(), conflicts.Load())
	}
	// The voided grant keeps nothing the balance shows, once holds end.
	holds, err := c.ListHoldsWithResponse(ctx, "rex", &client.ListHoldsParams{Status: ptrTo(client.ListHoldsParamsStatusActive)})
	if err != nil {
		t.Fatal(err)
	}
	for _, ah := range holds.JSON200.Data {
		mustStatus(t, "release", releaseOverHTTP(t, c, "rex", ah.Id).StatusCode(), nil, http.StatusOK)
	}
	for _, gs := range balanceOverHTTP(t, c, "rex").Grants {
		if gs.Id == g.GrantId {
			t.Fatalf("the voided grant still shows %+v", gs)
		}
	}

	user := s.client(t, userToken(t, "rex", time.Now().Add(time.Hour)))
	if r, err := user.VoidGrantWithResponse(ctx, "rex", g.GrantId, &client.VoidGrantParams{IdempotencyKey: "u"}, client.VoidRequest{Reason: "x"}); err != nil || r.StatusCode() != http.StatusForbidden {
		t.Fatalf("end-user void: %v %d", err, r.StatusCode())
	}
	if r, err := user.AdjustCreditsWithResponse(ctx, "rex", &client.AdjustCreditsParams{IdempotencyKey: "u"}, client.AdjustmentRequest{Amount: 1000, Reason: "x"}); err != nil || r.StatusCode() != http.StatusForbidden {
		t.Fatalf("end-user adjustment: %v %d", err, r.StatusCode())
	}
	admin := func(body string) int {
		req, _ := http.NewRequest(http.MethodPost, s.URL+"/v1/customers/rex/credits/adjustments", strings.NewReader(body))
		req.Header.Set("Authorization", "Bearer "+testAdminKey)
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("Idempotency-Key", fmt.Sprintf("adm-%d", rand.Int64()))
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	for body, want := range map[string]int{
		`{"amount":0,"reason":"x"}`:                                      http.StatusUnprocessableEntity,
		`{"amount":-1000000000001,"reason":"x"}`:                         http.StatusUnprocessableEntity,
		`{"amount":1000000000001,"reason":"x"}`:                          http.StatusUnprocessableEntity,
		`{"amount":"ten","reason":"x"}`:                                  http.StatusUnprocessableEntity,
		`{"amount":1.5,"reason":"x"}`:                                    http.StatusUnprocessableEntity,
		`{"amount":5}`:                                                   http.StatusUnprocessableEntity,
		`{"amount":-5,"reason":"x","expires_at":"2099-01-01T00:00:00Z"}`: http.StatusUnprocessableEntity,
		`{"amount":-1000000,"reason":"x"}`:                               http.StatusPaymentRequired,
	} {
		if got := admin(body); got != want {
			t.Errorf("adjustment %s: %d, want %d", body, got, want)
		}
	}
	mustVerifyClean(t, s)
}
