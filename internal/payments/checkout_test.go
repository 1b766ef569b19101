package payments_test

import (
	"context"
	"fmt"
	"net/http"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/config"
	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/db/dbtest"
	"github.com/tallybilling/tally/internal/errs"
	"github.com/tallybilling/tally/internal/payments"
	"github.com/tallybilling/tally/internal/stripeapi"
	"github.com/tallybilling/tally/internal/stripeapi/stripefake"
)

// whaleCatalog sells a pack of a tenth of the largest grant: ten of them are
// the most one checkout may buy.
const whaleCatalog = `
redirect_url_prefixes: ["https://app.example.com/"]
credit_packs:
  - {id: whale, name: Whale, amount: 100, currency: usd, credits: 100000000000}
  - {id: dear, name: Dear, amount: 10000000, currency: usd, credits: 1}
`

// payAtStripe is the buyer paying res's Checkout Session with PaymentIntent
// pi: the fake's session then names it, as Stripe's does.
func payAtStripe(t *testing.T, fake *stripefake.Fake, res payments.CheckoutResult, pi string) {
	t.Helper()
	if fake.PayCheckoutSession(res.CheckoutSessionID, pi) == nil {
		t.Fatalf("Stripe has no Checkout Session %s", res.CheckoutSessionID)
	}
}

func count(t *testing.T, gdb *gorm.DB, query string, args ...any) int64 {
	t.Helper()
	var n int64
	if err := gdb.Raw(query, args...).Scan(&n).Error; err != nil {
		t.Fatalf("%s: %v", query, err)
	}
	return n
}

// A quantity whose credits exceed the largest grant (or whose price exceeds
// what Stripe charges in one payment) is refused before anything is written
// or sent to Stripe, so money is never taken for credits that cannot be
// granted; the largest quantity that fits goes through.
func TestCheckoutRefusesQuantityBeyondTheLargestGrant(t *testing.T) {
	t.Parallel()
	gdb := dbtest.New(t)
	fake, stripe := fakeClient(t)
	svc := newServiceWith(t, gdb, stripe, whaleCatalog, nil)
	ctx := context.Background()

	for _, c := range []struct {
		item     string
		quantity int64
	}{{"whale", 11}, {"whale", 100}, {"dear", 10}} {
		_, _, err := svc.CreateCheckout(ctx, payments.CheckoutInput{
			CustomerID: "whale-buyer", Item: c.item, Quantity: c.quantity,
			SuccessURL: "https://app.example.com/ok", CancelURL: "https://app.example.com/no",
		}, db.IdempotencyKey{})
		e, ok := errs.As(err)
		if !ok || e.Code != errs.Invalid || !e.Unprocessable || len(e.Fields) != 1 || e.Fields[0].Pointer != "/quantity" {
			t.Fatalf("%d × %s: %v, want an unprocessable invalid_request naming /quantity", c.quantity, c.item, err)
		}
	}
	if n := count(t, gdb, `SELECT count(*) FROM payments`) + count(t, gdb, `SELECT count(*) FROM customers`); n != 0 {
		t.Fatalf("refused checkouts wrote %d rows", n)
	}
	if n := len(fake.Requests()); n != 0 {
		t.Fatalf("refused checkouts sent %d requests to Stripe", n)
	}

	res := buy(t, svc, "whale-buyer", "whale", 10)
	p, err := svc.Get(ctx, res.PaymentID)
	if err != nil || p.Credits != 1_000_000_000_000 {
		t.Fatalf("10 × whale = %+v, %v; want 1e12 credits", p, err)
	}
}

const expiryCatalog = `
redirect_url_prefixes: ["https://app.example.com/"]
credit_packs:
  - {id: yearly, name: Yearly, amount: 100, currency: usd, credits: 10}
  - {id: half, name: Half, amount: 100, currency: usd, credits: 10, expires_after: 6mo}
  - {id: month, name: Month, amount: 100, currency: usd, credits: 10, expires_after: 720h}
  - {id: forever, name: Forever, amount: 100, currency: usd, credits: 10, expires_after: never}
`

// A pack without expires_after grants credits that expire 12 calendar
// months after the purchase is confirmed; a pack may say otherwise, or
// never. The payment remembers the rule it was sold under.
func TestPurchasedCreditsExpireByThePacksRule(t *testing.T) {
	t.Parallel()
	gdb := dbtest.New(t)
	fake, stripe := fakeClient(t)
	confirmedAt := time.Date(2028, 2, 29, 12, 0, 0, 0, time.UTC)
	svc := newServiceWith(t, gdb, stripe, expiryCatalog, func(o *payments.Options) {
		o.Now = func() time.Time { return confirmedAt }
	})
	ctx := context.Background()
	for i, c := range []struct {
		item string
		want string // "" for never
	}{
		{"yearly", "2029-02-28T12:00:00Z"},
		{"half", "2028-08-29T12:00:00Z"},
		{"month", "2028-03-30T12:00:00Z"},
		{"forever", ""},
	} {
		res := buy(t, svc, "expiring", c.item, 1)
		pi := fmt.Sprintf("pi_expiry_%d", i)
		payAtStripe(t, fake, res, pi)
		if err := svc.PaymentIntentSucceeded(ctx, payments.EventRef{ID: "evt_" + pi, Type: "payment_intent.succeeded"},
			payments.PaymentIntent{ID: pi, AmountReceived: 100, Currency: "usd", Metadata: map[string]string{stripeapi.MetadataPaymentID: res.PaymentID}}); err != nil {
			t.Fatalf("%s: %v", c.item, err)
		}
		var grant struct{ ExpiresAt *time.Time }
		if r := gdb.Raw(`SELECT expires_at FROM credit_grants WHERE payment_id = ?`, res.PaymentID).Scan(&grant); r.Error != nil || r.RowsAffected != 1 {
			t.Fatalf("%s: grant: %v (%d rows)", c.item, r.Error, r.RowsAffected)
		}
		expires := grant.ExpiresAt
		switch {
		case c.want == "" && expires != nil:
			t.Errorf("%s: credits expire at %s, want never", c.item, expires)
		case c.want != "" && (expires == nil || expires.UTC().Format(time.RFC3339) != c.want):
			t.Errorf("%s: credits expire at %v, want %s", c.item, expires, c.want)
		}
	}
	verifyClean(t, gdb)
}

func checkoutInput(customer string) payments.CheckoutInput {
	return payments.CheckoutInput{CustomerID: customer, Item: "starter", Quantity: 1,
		SuccessURL: "https://app.example.com/ok", CancelURL: "https://app.example.com/no"}
}

// guardKey is the idempotency guard the HTTP layer builds for a checkout.
func guardKey(customer, k string) db.IdempotencyKey {
	return db.IdempotencyKey{Scope: "test:" + customer, Key: k, RequestHash: db.HashRequest([]byte("checkout"), []byte(customer))}
}

// failFirstSessions makes Stripe answer 500 to the first n Checkout Session
// creations.
func failFirstSessions(fake *stripefake.Fake, n int32) {
	var seen atomic.Int32
	fake.SetFault(func(r *http.Request) (int, string, bool) {
		if r.Method == http.MethodPost && r.URL.Path == "/v1/checkout/sessions" && seen.Add(1) <= n {
			return http.StatusInternalServerError, `{"error":{"type":"api_error","message":"injected"}}`, true
		}
		return 0, "", false
	})
}

// A checkout that failed at Stripe stores nothing under its key: retries
// sent at once, many concurrently, go through; exactly one creates the
// Checkout Session and every other one is told it is in flight or replays
// that one answer.
func TestFailedCheckoutFreesItsKeyForConcurrentRetries(t *testing.T) {
	t.Parallel()
	gdb := dbtest.New(t)
	fake, stripe := fakeClient(t)
	svc := newService(t, gdb, stripe, config.ConfirmOnPaymentIntent)
	ctx := context.Background()
	k := guardKey("retrier", "job-42")

	failFirstSessions(fake, 1)
	if _, _, err := svc.CreateCheckout(ctx, checkoutInput("retrier"), k); !errs.Is(err, errs.PaymentProviderError) {
		t.Fatalf("first attempt: %v, want payment_provider_error", err)
	}

	const retries = 8
	type answer struct {
		res      payments.CheckoutResult
		replayed bool
		err      error
	}
	answers := make(chan answer, retries)
	start := make(chan struct{})
	var wg sync.WaitGroup
	for range retries {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			res, replayed, err := svc.CreateCheckout(ctx, checkoutInput("retrier"), k)
			answers <- answer{res, replayed, err}
		}()
	}
	close(start)
	wg.Wait()
	close(answers)
	var created []payments.CheckoutResult
	var replays []payments.CheckoutResult
	for a := range answers {
		switch {
		case a.err == nil && !a.replayed:
			created = append(created, a.res)
		case a.err == nil:
			replays = append(replays, a.res)
		case errs.Is(a.err, errs.IdempotencyKeyInFlight):
		default:
			t.Fatalf("a retry failed: %v", a.err)
		}
	}
	if len(created) != 1 {
		t.Fatalf("%d retries created a checkout, want exactly 1", len(created))
	}
	res, replayed, err := svc.CreateCheckout(ctx, checkoutInput("retrier"), k)
	if err != nil || !replayed {
		t.Fatalf("a later retry: %+v, %v, %v; want the replay", res, replayed, err)
	}
	for _, r := range append(replays, res) {
		if r != created[0] {
			t.Fatalf("a replay answered %+v, the created checkout was %+v", r, created[0])
		}
	}
	if n := len(fake.CheckoutSessions()); n != 1 {
		t.Fatalf("Stripe created %d Checkout Sessions, want 1", n)
	}
	if n := count(t, gdb, `SELECT count(*) FROM payments WHERE status = 'failed'`); n != 1 {
		t.Fatalf("%d failed payments on record, want the first attempt's", n)
	}
}

// A first attempt that waits on Stripe far longer than its reservation's
// lease keeps its key (the lease is renewed while it works): a retry meanwhile
// is told it is in flight instead of creating a second Checkout Session, and
// once the first answers, the retry replays it.
func TestSlowCheckoutIsNotOvertakenByItsRetry(t *testing.T) {
	t.Parallel()
	gdb := dbtest.New(t)
	fake, stripe := fakeClient(t)
	const lease = 300 * time.Millisecond
	svc := newServiceWith(t, gdb, stripe, catalogYAML, func(o *payments.Options) { o.ReservationLease = lease })
	ctx := context.Background()
	buy(t, svc, "patient", "starter", 1) // links the Stripe customer: only the session call is slow

	release := fake.HangUntilReleased()
	defer release()
	k := guardKey("patient", "slow-1")
	type answer struct {
		res payments.CheckoutResult
		err error
	}
	first := make(chan answer, 1)
	go func() {
		res, _, err := svc.CreateCheckout(ctx, checkoutInput("patient"), k)
		first <- answer{res, err}
	}()
	sessionRequests := func() int {
		n := 0
		for _, r := range fake.Requests() {
			if r.Path == "/v1/checkout/sessions" {
				n++
			}
		}
		return n
	}
	waitUntil(t, "the first attempt to reach Stripe", func() bool { return sessionRequests() == 2 })
	// Several leases pass while Stripe holds the first attempt.
	time.Sleep(4 * lease)

	second := make(chan answer, 1)
	go func() {
		res, _, err := svc.CreateCheckout(ctx, checkoutInput("patient"), k)
		second <- answer{res, err}
	}()
	var retried answer
	waitUntil(t, "the retry to answer or to reach Stripe", func() bool {
		select {
		case retried = <-second:
			return true
		default:
			return sessionRequests() > 2
		}
	})
	release()
	if retried.err == nil && retried.res == (payments.CheckoutResult{}) {
		retried = <-second
	}
	got := <-first
	if got.err != nil {
		t.Fatalf("the slow first attempt: %v", got.err)
	}
	if !errs.Is(retried.err, errs.IdempotencyKeyInFlight) {
		t.Fatalf("the retry while the first waited on Stripe: %+v; want idempotency_key_in_flight", retried)
	}
	res, replayed, err := svc.CreateCheckout(ctx, checkoutInput("patient"), k)
	if err != nil || !replayed || res != got.res {
		t.Fatalf("the retry after the first answered: %+v, %v, %v; want the replay of %+v", res, replayed, err, got.res)
	}
	if n := len(fake.CheckoutSessions()); n != 2 {
		t.Fatalf("Stripe created %d Checkout Sessions, want 2 (the warm-up and one for the key)", n)
	}
}

// waitUntil polls cond until it holds, failing the test after a minute.
func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("gave up waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// A customer may start RateLimit checkouts a minute, paced evenly: past the
// burst, the next is refused with rate_limited and how long to wait, which
// is exactly when it is allowed again. Refused, invalid and replayed
// requests spend nothing, and other customers are not affected.
func TestCheckoutRateLimitPerCustomer(t *testing.T) {
	t.Parallel()
	gdb := dbtest.New(t)
	fake, stripe := fakeClient(t)
	now := time.Date(2027, 5, 1, 12, 0, 0, 0, time.UTC)
	svc := newServiceWith(t, gdb, stripe, catalogYAML, func(o *payments.Options) {
		o.Config.RateLimit = 2
		o.Now = func() time.Time { return now }
	})
	ctx := context.Background()
	start := func(customer, key string) (bool, error) {
		t.Helper()
		var k db.IdempotencyKey
		if key != "" {
			k = guardKey(customer, key)
		}
		_, replayed, err := svc.CreateCheckout(ctx, checkoutInput(customer), k)
		return replayed, err
	}
	limited := func(err error) time.Duration {
		t.Helper()
		e, ok := errs.As(err)
		if !ok || e.Code != errs.RateLimited {
			t.Fatalf("%v, want rate_limited", err)
		}
		return e.RetryAfter
	}

	if _, err := start("flooder", "a"); err != nil {
		t.Fatal(err)
	}
	if _, err := start("flooder", ""); err != nil {
		t.Fatal(err)
	}
	// Not counted: an invalid request, and a replay of a completed key.
	bad := checkoutInput("flooder")
	bad.Item = "platinum"
	if _, _, err := svc.CreateCheckout(ctx, bad, db.IdempotencyKey{}); !errs.Is(err, errs.Invalid) {
		t.Fatalf("unknown item: %v", err)
	}
	if replayed, err := start("flooder", "a"); err != nil || !replayed {
		t.Fatalf("replay while at the limit: %v, %v; want the replay", replayed, err)
	}
	if wait := limited(func() error { _, err := start("flooder", "b"); return err }()); wait != 30*time.Second {
		t.Fatalf("third checkout in a minute: retry after %s, want 30s", wait)
	}
	// The refused key is free for the retry.
	if _, err := start("other", ""); err != nil {
		t.Fatalf("another customer: %v", err)
	}
	now = now.Add(29 * time.Second)
	limited(func() error { _, err := start("flooder", "b"); return err }())
	now = now.Add(time.Second)
	if _, err := start("flooder", "b"); err != nil {
		t.Fatalf("after the advertised wait: %v", err)
	}
	if wait := limited(func() error { _, err := start("flooder", ""); return err }()); wait != 30*time.Second {
		t.Fatalf("right after: retry after %s, want 30s", wait)
	}
	if n := count(t, gdb, `SELECT count(*) FROM payments WHERE customer_id = 'flooder'`); n != 3 {
		t.Fatalf("%d payments written for flooder, want 3", n)
	}
	if n := len(fake.CheckoutSessions()); n != 4 {
		t.Fatalf("%d Checkout Sessions, want 4", n)
	}
}
