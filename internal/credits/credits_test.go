package credits_test

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/config"
	"github.com/tallybilling/tally/internal/credits"
	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/db/dbtest"
	"github.com/tallybilling/tally/internal/errs"
)

// clock is a settable clock shared by the service under test and the test.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func newClock() *clock {
	return &clock{t: time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)}
}

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *clock) Set(t time.Time) {
	c.mu.Lock()
	c.t = t
	c.mu.Unlock()
}

type fixture struct {
	t     *testing.T
	ctx   context.Context
	db    *gorm.DB
	clock *clock
	cfg   config.CreditsConfig
	svc   *credits.Service
	sweep *credits.Sweeper
}

func newFixture(t *testing.T, cfg config.CreditsConfig) *fixture {
	t.Helper()
	gdb := dbtest.New(t)
	c := newClock()
	logger := dbtest.Logger(t)
	return &fixture{
		t: t, ctx: context.Background(), db: gdb, clock: c, cfg: cfg,
		svc:   credits.New(credits.Options{DB: gdb, Config: cfg, Now: c.Now, Logger: logger}),
		sweep: credits.NewSweeper(credits.SweeperOptions{DB: gdb, Config: cfg, Now: c.Now, Logger: logger}),
	}
}

// defaultCfg is the default credits configuration (config.Default).
func defaultCfg() config.CreditsConfig { return config.Default().Credits }

func key(customerID, k string, body any) db.IdempotencyKey {
	b, _ := json.Marshal(body)
	return db.IdempotencyKey{Scope: "customer:" + customerID, Key: k, RequestHash: db.HashRequest(b)}
}

var keySeq struct {
	mu sync.Mutex
	n  int
}

func freshKey() string {
	keySeq.mu.Lock()
	defer keySeq.mu.Unlock()
	keySeq.n++
	return fmt.Sprintf("k-%d", keySeq.n)
}

// grant gives credits through the HTTP-facing service method.
func (f *fixture) grant(customerID string, amount int64, expiresAt *time.Time) credits.GrantResult {
	f.t.Helper()
	in := credits.GrantInput{CustomerID: customerID, Amount: amount, Reason: "promo", Source: credits.SourceService, ExpiresAt: expiresAt}
	r, _, err := f.svc.Grant(f.ctx, in, key(customerID, freshKey(), in))
	if err != nil {
		f.t.Fatalf("grant %d to %s: %v", amount, customerID, err)
	}
	return r
}

func (f *fixture) consume(customerID string, amount int64) (credits.ConsumeResult, error) {
	in := credits.ConsumeInput{CustomerID: customerID, Amount: amount, Reason: "api call"}
	r, _, err := f.svc.Consume(f.ctx, in, key(customerID, freshKey(), in))
	return r, err
}

func (f *fixture) mustConsume(customerID string, amount int64) credits.ConsumeResult {
	f.t.Helper()
	r, err := f.consume(customerID, amount)
	if err != nil {
		f.t.Fatalf("consume %d from %s: %v", amount, customerID, err)
	}
	return r
}

func (f *fixture) balance(customerID string) credits.Balance {
	f.t.Helper()
	b, err := f.svc.Balance(f.ctx, customerID)
	if err != nil {
		f.t.Fatalf("balance of %s: %v", customerID, err)
	}
	return b
}

func (f *fixture) ledger(customerID string) []credits.LedgerEntry {
	f.t.Helper()
	p, err := f.svc.Ledger(f.ctx, customerID, "", 500)
	if err != nil {
		f.t.Fatalf("ledger of %s: %v", customerID, err)
	}
	return p.Entries
}

func (f *fixture) countEvents(typ string) int {
	f.t.Helper()
	var n int
	if err := f.db.Raw(`SELECT count(*) FROM events WHERE type = ?`, typ).Scan(&n).Error; err != nil {
		f.t.Fatalf("count events: %v", err)
	}
	return n
}

func (f *fixture) count(query string, args ...any) int {
	f.t.Helper()
	var n int
	if err := f.db.Raw(query, args...).Scan(&n).Error; err != nil {
		f.t.Fatalf("%s: %v", query, err)
	}
	return n
}

// mustVerify fails the test unless every wallet invariant holds.
func (f *fixture) mustVerify() {
	f.t.Helper()
	rep, err := f.svc.Verify(f.ctx)
	if err != nil {
		f.t.Fatalf("verify: %v", err)
	}
	if !rep.OK || len(rep.Problems) > 0 {
		f.t.Fatalf("verify found problems: %+v", rep.Problems)
	}
}

func ptr[T any](v T) *T { return &v }

func TestConsumeDrawsFromSoonestExpiringGrantFirst(t *testing.T) {
	t.Parallel()
	f := newFixture(t, defaultCfg())
	now := f.clock.Now()
	later := f.grant("alice", 10, ptr(now.Add(30*24*time.Hour)))
	never := f.grant("alice", 10, nil)
	sooner := f.grant("alice", 10, ptr(now.Add(10*24*time.Hour)))

	r := f.mustConsume("alice", 15)
	if r.Balance != 15 || r.Amount != 15 {
		t.Fatalf("consume answered %+v, want amount 15 balance 15", r)
	}
	entries := f.ledger("alice")
	want := []credits.Draw{{GrantID: sooner.GrantID, Amount: 10}, {GrantID: later.GrantID, Amount: 5}}
	if got := entries[0].Draws; fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("draws %v, want %v (sooner-expiring grant first although granted last)", got, want)
	}
	b := f.balance("alice")
	if b.Balance != 15 || len(b.Grants) != 2 || b.Grants[0].ID != later.GrantID || b.Grants[0].Remaining != 5 ||
		b.Grants[1].ID != never.GrantID || b.Grants[1].Remaining != 10 {
		t.Fatalf("balance after draws: %+v", b)
	}
	if b.NextExpiry == nil || !b.NextExpiry.Equal(now.Add(30*24*time.Hour)) || *b.NextExpiryAmount != 5 {
		t.Fatalf("next expiry %v amount %v, want the later grant's 5", b.NextExpiry, b.NextExpiryAmount)
	}
	// Then the never-expiring grant, last.
	f.mustConsume("alice", 12)
	entries = f.ledger("alice")
	want = []credits.Draw{{GrantID: later.GrantID, Amount: 5}, {GrantID: never.GrantID, Amount: 7}}
	if got := entries[0].Draws; fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("second draws %v, want %v", got, want)
	}
	f.mustVerify()
}

func TestExpiredGrantIsNotSpendableBeforeTheSweeperRuns(t *testing.T) {
	t.Parallel()
	f := newFixture(t, defaultCfg())
	start := f.clock.Now()
	expiry := start.Add(time.Hour)
	g := f.grant("bob", 10, &expiry)
	f.grant("bob", 5, nil)

	f.clock.Set(expiry.Add(-time.Nanosecond))
	if b := f.balance("bob"); b.Balance != 15 {
		t.Fatalf("balance just before expiry %d, want 15", b.Balance)
	}

	// At the expiry instant the grant stops counting, sweeper or not.
	f.clock.Set(expiry)
	if b := f.balance("bob"); b.Balance != 5 || len(b.Grants) != 1 || b.NextExpiry != nil {
		t.Fatalf("balance at the expiry instant: %+v, want 5 with only the never-expiring grant", b)
	}
	_, err := f.consume("bob", 6)
	if !errs.Is(err, errs.InsufficientCredits) {
		t.Fatalf("consume 6 at expiry: %v, want insufficient_credits", err)
	}
	if e, _ := errs.As(err); e.Extra["balance"] != int64(5) {
		t.Fatalf("insufficient_credits carries balance %v, want 5", e.Extra["balance"])
	}
	if n := f.count(`SELECT count(*) FROM credit_ledger WHERE customer_id = 'bob' AND kind = 'expire'`); n != 0 {
		t.Fatalf("%d expire entries before the sweeper ran (refused consume must write nothing)", n)
	}

	// Many sweepers at once record the expiry exactly once.
	var wg sync.WaitGroup
	total := make([]int, 8)
	for i := range total {
		wg.Add(1)
		go func() {
			defer wg.Done()
			n, err := f.sweep.SweepOnce(f.ctx)
			if err != nil {
				t.Errorf("sweep: %v", err)
			}
			total[i] = n
		}()
	}
	wg.Wait()
	sum := 0
	for _, n := range total {
		sum += n
	}
	if sum != 1 {
		t.Fatalf("concurrent sweeps expired %d grants in total, want 1", sum)
	}
	entries := f.ledger("bob")
	if entries[0].Kind != credits.KindExpire || entries[0].Amount != -10 || entries[0].GrantID != g.GrantID || entries[0].BalanceAfter != 5 {
		t.Fatalf("newest entry %+v, want expire of 10 from %s leaving 5", entries[0], g.GrantID)
	}
	if n := f.count(`SELECT count(*) FROM credit_ledger WHERE kind = 'expire'`); n != 1 {
		t.Fatalf("%d expire entries, want 1", n)
	}
	if n := f.countEvents("credits.expired"); n != 1 {
		t.Fatalf("%d credits.expired events, want 1", n)
	}
	if n, err := f.sweep.SweepOnce(f.ctx); err != nil || n != 0 {
		t.Fatalf("a later sweep expired %d (%v), want 0", n, err)
	}
	f.mustConsume("bob", 5)
	f.mustVerify()
}

func TestConsumeAfterExpiryRecordsTheExpiryFirst(t *testing.T) {
	t.Parallel()
	f := newFixture(t, defaultCfg())
	expiry := f.clock.Now().Add(time.Minute)
	f.grant("carol", 10, &expiry)
	f.grant("carol", 10, nil)
	f.mustConsume("carol", 4)
	f.clock.Set(expiry.Add(time.Second))
	r := f.mustConsume("carol", 3)
	if r.Balance != 7 {
		t.Fatalf("balance after consume past expiry %d, want 7 (the 6 left of the expired grant gone)", r.Balance)
	}
	entries := f.ledger("carol")
	if entries[0].Kind != credits.KindConsume || entries[1].Kind != credits.KindExpire || entries[1].Amount != -6 || entries[1].BalanceAfter != 10 {
		t.Fatalf("ledger head %+v / %+v, want expire of 6 then the consume", entries[1], entries[0])
	}
	if n, _ := f.sweep.SweepOnce(f.ctx); n != 0 {
		t.Fatalf("sweeper expired %d after the consume already recorded it", n)
	}
	f.mustVerify()
}

func TestLowBalanceNoticeFiresOncePerCrossing(t *testing.T) {
	t.Parallel()
	cfg := defaultCfg()
	cfg.DefaultLowBalanceThreshold = 10
	f := newFixture(t, cfg)
	f.grant("dave", 20, nil)
	f.mustConsume("dave", 5) // 15
	if n := f.countEvents("credits.low_balance"); n != 0 {
		t.Fatalf("%d low-balance notices at 15 of threshold 10", n)
	}
	f.mustConsume("dave", 6) // 9: falls below
	f.mustConsume("dave", 1) // 8: still below, no second notice
	f.mustConsume("dave", 1) // 7
	if n := f.countEvents("credits.low_balance"); n != 1 {
		t.Fatalf("%d low-balance notices after one crossing, want 1", n)
	}
	f.grant("dave", 2, nil) // 9: still below, not re-armed
	f.mustConsume("dave", 1)
	if n := f.countEvents("credits.low_balance"); n != 1 {
		t.Fatalf("%d low-balance notices without rising to the threshold, want 1", n)
	}
	f.grant("dave", 10, nil) // 18: re-armed
	f.mustConsume("dave", 9) // 9: falls below again
	if n := f.countEvents("credits.low_balance"); n != 2 {
		t.Fatalf("%d low-balance notices after re-arming and falling again, want 2", n)
	}

	// A per-customer threshold wins over the default.
	if err := f.db.Exec(`UPDATE customers SET low_balance_threshold = 3 WHERE id = 'dave'`).Error; err != nil {
		t.Fatal(err)
	}
	f.grant("dave", 1, nil)  // 10: re-armed (>= 3)
	f.mustConsume("dave", 6) // 4: not below 3
	if n := f.countEvents("credits.low_balance"); n != 2 {
		t.Fatalf("%d notices at 4 with customer threshold 3, want 2", n)
	}
	f.mustConsume("dave", 2) // 2: below 3
	if n := f.countEvents("credits.low_balance"); n != 3 {
		t.Fatalf("%d notices at 2 with customer threshold 3, want 3", n)
	}
	var raw string
	if err := f.db.Raw(`SELECT data::text FROM events WHERE type = 'credits.low_balance' ORDER BY id DESC LIMIT 1`).Scan(&raw).Error; err != nil {
		t.Fatal(err)
	}
	var data map[string]any
	if err := json.Unmarshal([]byte(raw), &data); err != nil {
		t.Fatal(err)
	}
	if data["balance"] != float64(2) || data["threshold"] != float64(3) || data["customer_id"] != "dave" {
		t.Fatalf("low-balance event data %v", data)
	}
	f.mustVerify()
}

func TestLowBalanceNoticeFiresWhenExpiryCrossesTheThreshold(t *testing.T) {
	t.Parallel()
	cfg := defaultCfg()
	cfg.DefaultLowBalanceThreshold = 10
	f := newFixture(t, cfg)
	expiry := f.clock.Now().Add(time.Hour)
	f.grant("erin", 20, &expiry)
	f.grant("erin", 5, nil)
	f.clock.Set(expiry)
	if _, err := f.sweep.SweepOnce(f.ctx); err != nil {
		t.Fatal(err)
	}
	if n := f.countEvents("credits.low_balance"); n != 1 {
		t.Fatalf("%d low-balance notices after expiry left 5 of threshold 10, want 1", n)
	}
	f.mustConsume("erin", 1)
	if n := f.countEvents("credits.low_balance"); n != 1 {
		t.Fatalf("%d notices after a further consume, want still 1", n)
	}
	f.mustVerify()
}

func TestExpiringNoticeFiresOncePerGrant(t *testing.T) {
	t.Parallel()
	cfg := defaultCfg()
	cfg.ExpiringNotice = 7 * 24 * time.Hour
	f := newFixture(t, cfg)
	start := f.clock.Now()
	soon := f.grant("fay", 10, ptr(start.Add(10*24*time.Hour)))
	f.grant("fay", 10, ptr(start.Add(30*24*time.Hour)))
	f.grant("fay", 10, nil)

	if _, err := f.sweep.SweepOnce(f.ctx); err != nil {
		t.Fatal(err)
	}
	if n := f.countEvents("credits.expiring"); n != 0 {
		t.Fatalf("%d expiring notices 10 days ahead of a 7-day notice", n)
	}
	f.clock.Set(start.Add(3*24*time.Hour + time.Second))
	for range 3 {
		if _, err := f.sweep.SweepOnce(f.ctx); err != nil {
			t.Fatal(err)
		}
	}
	if n := f.countEvents("credits.expiring"); n != 1 {
		t.Fatalf("%d expiring notices after three sweeps inside the window, want 1", n)
	}
	var raw string
	if err := f.db.Raw(`SELECT data->>'grant_id' FROM events WHERE type = 'credits.expiring'`).Scan(&raw).Error; err != nil || raw != soon.GrantID {
		t.Fatalf("expiring notice names %q (%v), want %s", raw, err, soon.GrantID)
	}
	// A grant spent in full before its window gets no notice.
	f.mustConsume("fay", 20) // drains the two expiring grants
	f.clock.Set(start.Add(25 * 24 * time.Hour))
	if _, err := f.sweep.SweepOnce(f.ctx); err != nil {
		t.Fatal(err)
	}
	if n := f.countEvents("credits.expiring"); n != 1 {
		t.Fatalf("%d expiring notices, want 1 (the spent grant has nothing to expire)", n)
	}
	f.mustVerify()
}

func purchase(t *testing.T, f *fixture, customerID, paymentID string, amount int64) credits.GrantResult {
	t.Helper()
	var r credits.GrantResult
	err := db.InTx(f.ctx, f.db, func(tx *gorm.DB) error {
		var err error
		r, err = credits.Grant(f.ctx, tx, f.clock.Now, credits.GrantInput{
			CustomerID: customerID, Amount: amount, Reason: "pack", Source: credits.SourcePurchase, PaymentID: paymentID,
		})
		return err
	})
	if err != nil {
		t.Fatalf("purchase grant: %v", err)
	}
	return r
}

func TestPurchaseGrantIsCreditedOncePerPayment(t *testing.T) {
	t.Parallel()
	f := newFixture(t, defaultCfg())
	purchase(t, f, "gus", "pay_1", 100)
	err := db.InTx(f.ctx, f.db, func(tx *gorm.DB) error {
		_, err := credits.Grant(f.ctx, tx, f.clock.Now, credits.GrantInput{
			CustomerID: "gus", Amount: 100, Reason: "pack", Source: credits.SourcePurchase, PaymentID: "pay_1",
		})
		return err
	})
	if !errs.Is(err, errs.Conflict) {
		t.Fatalf("second purchase grant for pay_1: %v, want conflict", err)
	}
	counts, err := credits.PurchaseGrantCounts(f.ctx, f.db)
	if err != nil || len(counts) != 1 || counts["pay_1"] != 1 {
		t.Fatalf("purchase grant counts %v (%v), want pay_1: 1", counts, err)
	}
	if b := f.balance("gus"); b.Balance != 100 || b.Grants[0].PaymentID != "pay_1" || b.Grants[0].Source != credits.SourcePurchase {
		t.Fatalf("balance %+v", b)
	}
	f.mustVerify()
}

func TestConcurrentConsumesNeverOverdraw(t *testing.T) {
	t.Parallel()
	f := newFixture(t, defaultCfg())
	now := f.clock.Now()
	f.grant("ivy", 40, ptr(now.Add(48*time.Hour)))
	f.grant("ivy", 40, nil)
	f.grant("ivy", 20, ptr(now.Add(24*time.Hour)))
	const n = 150
	var (
		wg             sync.WaitGroup
		mu             sync.Mutex
		ok, refused    int
		spent          int64
		unexpectedErrs []error
	)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			amount := int64(1 + i%3)
			_, err := f.consume("ivy", amount)
			mu.Lock()
			defer mu.Unlock()
			switch {
			case err == nil:
				ok++
				spent += amount
			case errs.Is(err, errs.InsufficientCredits):
				refused++
			default:
				unexpectedErrs = append(unexpectedErrs, err)
			}
		}()
	}
	wg.Wait()
	if len(unexpectedErrs) > 0 {
		t.Fatalf("unexpected errors: %v", unexpectedErrs)
	}
	b := f.balance("ivy")
	if spent+b.Balance != 100 || b.Balance > 2 {
		t.Fatalf("spent %d, balance %d: want spent + balance = 100 and less than the largest ask left", spent, b.Balance)
	}
	if ok+refused != n || refused == 0 {
		t.Fatalf("%d succeeded, %d refused of %d", ok, refused, n)
	}
	f.mustVerify()
}

func TestConsumeWithOneKeyConcurrentlySpendsOnce(t *testing.T) {
	t.Parallel()
	f := newFixture(t, defaultCfg())
	f.grant("jo", 100, nil)
	in := credits.ConsumeInput{CustomerID: "jo", Amount: 7, Reason: "export", Metadata: map[string]string{"job": "42"}}
	k := key("jo", "same-key", in)
	results := make([]credits.ConsumeResult, 20)
	replays := make([]bool, 20)
	var wg sync.WaitGroup
	for i := range results {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r, replayed, err := f.svc.Consume(f.ctx, in, k)
			if err != nil {
				t.Errorf("consume: %v", err)
			}
			results[i], replays[i] = r, replayed
		}()
	}
	wg.Wait()
	fresh := 0
	for i, r := range results {
		if r != results[0] {
			t.Fatalf("answer %d %+v differs from %+v", i, r, results[0])
		}
		if !replays[i] {
			fresh++
		}
	}
	if fresh != 1 {
		t.Fatalf("%d answers not marked replayed, want exactly 1", fresh)
	}
	if n := f.count(`SELECT count(*) FROM credit_ledger WHERE kind = 'consume'`); n != 1 {
		t.Fatalf("%d consume entries, want 1", n)
	}
	if b := f.balance("jo"); b.Balance != 93 {
		t.Fatalf("balance %d, want 93", b.Balance)
	}
	// Same key, different request.
	other := in
	other.Amount = 8
	if _, _, err := f.svc.Consume(f.ctx, other, key("jo", "same-key", other)); !errs.Is(err, errs.IdempotencyKeyReused) {
		t.Fatalf("same key, different body: %v, want idempotency_key_reused", err)
	}
	f.mustVerify()
}

func TestRefusedConsumeIsNotStoredSoARetryAfterTopUpSucceeds(t *testing.T) {
	t.Parallel()
	f := newFixture(t, defaultCfg())
	f.grant("kim", 5, nil)
	in := credits.ConsumeInput{CustomerID: "kim", Amount: 8, Reason: "render"}
	k := key("kim", "retry-me", in)
	if _, _, err := f.svc.Consume(f.ctx, in, k); !errs.Is(err, errs.InsufficientCredits) {
		t.Fatalf("first try: %v, want insufficient_credits", err)
	}
	f.grant("kim", 5, nil)
	r, replayed, err := f.svc.Consume(f.ctx, in, k)
	if err != nil || replayed || r.Balance != 2 {
		t.Fatalf("retry after top-up: %+v replayed=%v err=%v, want balance 2", r, replayed, err)
	}
	f.mustVerify()
}

// A grant retried after its expires_at has passed still replays its first
// answer: within 24 h the same key and body always get the same response.
func TestGrantReplayAfterItsExpiryPassedReplaysTheFirstAnswer(t *testing.T) {
	t.Parallel()
	f := newFixture(t, defaultCfg())
	exp := f.clock.Now().Add(time.Hour)
	in := credits.GrantInput{CustomerID: "lee", Amount: 10, Reason: "promo", ExpiresAt: &exp}
	k := db.IdempotencyKey{Scope: "customer:lee", Key: "promo-1", RequestHash: db.HashRequest([]byte("promo-1"))}
	first, replayed, err := f.svc.Grant(f.ctx, in, k)
	if err != nil || replayed {
		t.Fatalf("first grant: %+v replayed=%v err=%v", first, replayed, err)
	}
	f.clock.Set(exp.Add(time.Minute))
	again, replayed, err := f.svc.Grant(f.ctx, in, k)
	if err != nil || !replayed || again.TransactionID != first.TransactionID || again.GrantID != first.GrantID ||
		again.Balance != first.Balance || again.ExpiresAt == nil || !again.ExpiresAt.Equal(exp) {
		t.Fatalf("retry after expiry: %+v replayed=%v err=%v, want %+v replayed", again, replayed, err, first)
	}
	other := db.IdempotencyKey{Scope: "customer:lee", Key: "promo-2", RequestHash: db.HashRequest([]byte("promo-2"))}
	if _, _, err := f.svc.Grant(f.ctx, in, other); !errs.Is(err, errs.Invalid) {
		t.Fatalf("a new grant expiring in the past: %v, want invalid_request", err)
	}
	f.mustVerify()
}

func TestBadInputChangesNothing(t *testing.T) {
	t.Parallel()
	f := newFixture(t, defaultCfg())
	f.grant("lee", 10, nil)
	past := f.clock.Now().Add(-time.Second)
	cases := []struct {
		name string
		call func() error
		code errs.Code
	}{
		{"zero amount", func() error { _, err := f.consume("lee", 0); return err }, errs.Invalid},
		{"negative amount", func() error { _, err := f.consume("lee", -5); return err }, errs.Invalid},
		{"huge amount", func() error { _, err := f.consume("lee", 10_000_000_000_000); return err }, errs.Invalid},
		{"missing reason", func() error {
			in := credits.ConsumeInput{CustomerID: "lee", Amount: 1}
			_, _, err := f.svc.Consume(f.ctx, in, key("lee", freshKey(), in))
			return err
		}, errs.Invalid},
		{"NUL in reason", func() error {
			in := credits.ConsumeInput{CustomerID: "lee", Amount: 1, Reason: "a\x00b"}
			_, _, err := f.svc.Consume(f.ctx, in, key("lee", freshKey(), in))
			return err
		}, errs.Invalid},
		{"missing key", func() error {
			_, _, err := f.svc.Consume(f.ctx, credits.ConsumeInput{CustomerID: "lee", Amount: 1, Reason: "x"}, db.IdempotencyKey{})
			return err
		}, errs.Invalid},
		{"unknown customer", func() error { _, err := f.consume("nobody", 1); return err }, errs.NotFound},
		{"grant expiring in the past", func() error {
			in := credits.GrantInput{CustomerID: "lee", Amount: 1, Reason: "x", Source: credits.SourceService, ExpiresAt: &past}
			_, _, err := f.svc.Grant(f.ctx, in, key("lee", freshKey(), in))
			return err
		}, errs.Invalid},
		{"purchase grant without payment", func() error {
			return db.InTx(f.ctx, f.db, func(tx *gorm.DB) error {
				_, err := credits.Grant(f.ctx, tx, f.clock.Now, credits.GrantInput{CustomerID: "lee", Amount: 1, Reason: "x", Source: credits.SourcePurchase})
				return err
			})
		}, errs.Invalid},
		{"too much metadata", func() error {
			meta := map[string]string{}
			for i := range 51 {
				meta[fmt.Sprint("k", i)] = "v"
			}
			in := credits.ConsumeInput{CustomerID: "lee", Amount: 1, Reason: "x", Metadata: meta}
			_, _, err := f.svc.Consume(f.ctx, in, key("lee", freshKey(), in))
			return err
		}, errs.Invalid},
	}
	for _, c := range cases {
		if err := c.call(); !errs.Is(err, c.code) {
			t.Errorf("%s: %v, want %s", c.name, err, c.code)
		}
	}
	if n := f.count(`SELECT count(*) FROM credit_ledger`); n != 1 {
		t.Fatalf("%d ledger entries after bad input, want only the grant", n)
	}
	if n := f.count(`SELECT count(*) FROM customers WHERE id = 'nobody'`); n != 0 {
		t.Fatalf("consume created the unknown customer")
	}
	if n := f.count(`SELECT count(*) FROM idempotency_keys`); n != 1 {
		t.Fatalf("%d idempotency keys stored, want only the grant's", n)
	}
	if b := f.balance("lee"); b.Balance != 10 {
		t.Fatalf("balance %d, want 10", b.Balance)
	}
	if _, err := f.svc.Balance(f.ctx, "nobody"); !errs.Is(err, errs.NotFound) {
		t.Fatalf("balance of unknown customer: %v", err)
	}
	if _, err := f.svc.Ledger(f.ctx, "nobody", "", 10); !errs.Is(err, errs.NotFound) {
		t.Fatalf("ledger of unknown customer: %v", err)
	}
}

func TestConsumeOfKnownCustomerWithoutGrantsIsInsufficient(t *testing.T) {
	t.Parallel()
	f := newFixture(t, defaultCfg())
	if err := f.db.Exec(`INSERT INTO customers (id) VALUES ('mia')`).Error; err != nil {
		t.Fatal(err)
	}
	_, err := f.consume("mia", 1)
	if e, ok := errs.As(err); !ok || e.Code != errs.InsufficientCredits || e.Extra["balance"] != int64(0) {
		t.Fatalf("consume with no grants: %v, want insufficient_credits with balance 0", err)
	}
	if b := f.balance("mia"); b.Balance != 0 || len(b.Grants) != 0 {
		t.Fatalf("balance %+v", b)
	}
}

func TestLedgerPagesNewestFirst(t *testing.T) {
	t.Parallel()
	f := newFixture(t, defaultCfg())
	f.grant("ned", 100, nil)
	for i := range 6 {
		f.mustConsume("ned", int64(i+1))
	}
	var got []credits.LedgerEntry
	cursor := ""
	pages := 0
	for {
		p, err := f.svc.Ledger(f.ctx, "ned", cursor, 3)
		if err != nil {
			t.Fatal(err)
		}
		pages++
		got = append(got, p.Entries...)
		if p.NextCursor == "" {
			break
		}
		cursor = p.NextCursor
	}
	if pages != 3 || len(got) != 7 {
		t.Fatalf("%d pages, %d entries; want 3 pages of 7 entries", pages, len(got))
	}
	for i, e := range got[:6] {
		if e.Kind != credits.KindConsume || e.Amount != -int64(6-i) {
			t.Fatalf("entry %d: %+v, want consume of %d", i, e, 6-i)
		}
	}
	if got[6].Kind != credits.KindGrant || got[6].BalanceAfter != 100 || got[0].BalanceAfter != 100-21 {
		t.Fatalf("oldest %+v newest %+v", got[6], got[0])
	}
	if _, err := f.svc.Ledger(f.ctx, "ned", "not-a-cursor", 3); !errs.Is(err, errs.Invalid) {
		t.Fatalf("bad cursor: %v", err)
	}
	// The page size a request leaves out is the API's default (one place,
	// in httpapi); the wallet takes only a size, as the other lists do.
	for _, limit := range []int{0, 501} {
		if _, err := f.svc.Ledger(f.ctx, "ned", "", limit); !errs.Is(err, errs.Invalid) {
			t.Fatalf("limit %d: %v, want invalid_request", limit, err)
		}
	}
}

func TestVerifyDetectsATamperedBalance(t *testing.T) {
	t.Parallel()
	f := newFixture(t, defaultCfg())
	f.grant("oli", 10, nil)
	f.mustConsume("oli", 3)
	f.mustVerify()
	if err := f.db.Exec(`UPDATE credit_balances SET balance = balance + 5 WHERE customer_id = 'oli'`).Error; err != nil {
		t.Fatal(err)
	}
	rep, err := f.svc.Verify(f.ctx)
	if err != nil {
		t.Fatal(err)
	}
	if rep.OK || len(rep.Problems) != 1 || rep.Problems[0].Kind != credits.ProblemBalanceLedgerMismatch || rep.Problems[0].CustomerID != "oli" {
		t.Fatalf("report %+v, want one balance_ledger_mismatch for oli", rep)
	}
	// A grant whose remainder was changed behind the ledger's back.
	if err := f.db.Exec(`UPDATE credit_balances SET balance = balance - 5 WHERE customer_id = 'oli'`).Error; err != nil {
		t.Fatal(err)
	}
	if err := f.db.Exec(`UPDATE credit_grants SET remaining = remaining - 1 WHERE customer_id = 'oli'`).Error; err != nil {
		t.Fatal(err)
	}
	rep, err = f.svc.Verify(f.ctx)
	if err != nil {
		t.Fatal(err)
	}
	kinds := map[string]bool{}
	for _, p := range rep.Problems {
		kinds[p.Kind] = true
	}
	if rep.OK || !kinds[credits.ProblemLedgerGrantsMismatch] || !kinds[credits.ProblemGrantAccounting] {
		t.Fatalf("report %+v, want ledger_grants_mismatch and grant_accounting", rep)
	}
	// The ledger refuses to be rewritten.
	if err := f.db.Exec(`UPDATE credit_ledger SET amount = 1`).Error; err == nil {
		t.Fatalf("credit_ledger accepted an UPDATE; it must be append-only")
	}
}

func TestVerifyRunsExtraCheckersInTheSameSnapshot(t *testing.T) {
	t.Parallel()
	f := newFixture(t, defaultCfg())
	purchase(t, f, "pam", "pay_x", 10)
	extra := func(ctx context.Context, tx *gorm.DB) ([]credits.VerifyProblem, int64, error) {
		counts, err := credits.PurchaseGrantCounts(ctx, tx)
		if err != nil {
			return nil, 0, err
		}
		return []credits.VerifyProblem{{Kind: "payment_check", PaymentID: "pay_x", Detail: fmt.Sprint(counts["pay_x"])}}, 4, nil
	}
	rep, err := credits.Verify(f.ctx, f.db, extra)
	if err != nil {
		t.Fatal(err)
	}
	if rep.OK || rep.PaymentsChecked != 4 || rep.CustomersChecked != 1 || len(rep.Problems) != 1 || rep.Problems[0].Detail != "1" {
		t.Fatalf("report %+v", rep)
	}
}

// Settings come from config, which holds every default: a zero setting in a
// hand-built CreditsConfig is a programming error that the constructors
// refuse, naming it, rather than quietly choosing a value of their own.
func TestConstructorsRefuseUnsetSettings(t *testing.T) {
	t.Parallel()
	for name, build := range map[string]func(config.CreditsConfig){
		"New":        func(cfg config.CreditsConfig) { credits.New(credits.Options{Config: cfg}) },
		"NewSweeper": func(cfg config.CreditsConfig) { credits.NewSweeper(credits.SweeperOptions{Config: cfg}) },
	} {
		t.Run(name, func(t *testing.T) {
			cfg := defaultCfg()
			cfg.SweepInterval = 0
			defer func() {
				if msg := fmt.Sprint(recover()); !strings.Contains(msg, "TALLY_CREDITS_SWEEP_INTERVAL") {
					t.Fatalf("%s panicked with %q, want the unset TALLY_CREDITS_SWEEP_INTERVAL named", name, msg)
				}
			}()
			build(cfg)
		})
	}
}
