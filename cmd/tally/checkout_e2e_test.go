package main

import (
	"context"
	"maps"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tallybilling/tally/internal/catalog"
	"github.com/tallybilling/tally/internal/stripeapi/stripefake"
	"github.com/tallybilling/tally/pkg/client"
)

// writeCatalog writes a catalog file for one test and returns its path.
func writeCatalog(t testing.TB, yaml string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "catalog.yaml")
	if err := os.WriteFile(path, []byte(yaml), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// serveRefuses runs `tally serve` with env and returns the error it refused
// to start with; a server that starts listening fails the test.
func serveRefuses(t testing.TB, env map[string]string) error {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var out syncBuffer
	done := make(chan error, 1)
	listening := make(chan struct{}, 1)
	renv := environment{getenv: func(k string) string { return env[k] }, stdout: &out, stderr: &out,
		listening: func(string, string) { listening <- struct{}{} }}
	go func() { done <- runIn(ctx, []string{"tally", "serve"}, renv) }()
	select {
	case err := <-done:
		if err == nil {
			t.Fatalf("tally serve exited without an error\n%s", out.String())
		}
		return err
	case <-listening:
		cancel()
		<-done
		t.Fatalf("tally serve started\n%s", out.String())
		return nil
	}
}

// checkoutBody is a checkout of quantity × item for customer with allowed URLs.
func checkoutBody(customer, item string, quantity int64) client.CheckoutSessionCreate {
	return client.CheckoutSessionCreate{
		CustomerId: customer, Item: item, Quantity: &quantity,
		SuccessUrl: "https://app.example.com/paid", CancelUrl: "https://app.example.com/cancel",
	}
}

// A pack whose credits exceed the largest grant would take the money and
// then be parked forever: `tally serve` refuses to start with it, and a
// checkout of so many packs that their credits exceed it is answered 422
// before anything is written or Stripe is called.
func TestPacksTooLargeToCreditAreRefused(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)

	env := payEnv(t, fake.URL())
	env["TALLY_CATALOG_FILE"] = writeCatalog(t, `
redirect_url_prefixes: ["https://app.example.com/"]
credit_packs:
  - {id: too-big, name: Too big, amount: 100, currency: usd, credits: 1000000000001}
`)
	if err := serveRefuses(t, env); !strings.Contains(err.Error(), "credit_packs[0].credits") {
		t.Fatalf("tally serve with a pack beyond the largest grant: %v, want a refusal naming credit_packs[0].credits", err)
	}

	env = payEnv(t, fake.URL())
	env["TALLY_CATALOG_FILE"] = writeCatalog(t, `
redirect_url_prefixes: ["https://app.example.com/"]
credit_packs:
  - {id: whale, name: Whale, amount: 100, currency: usd, credits: 100000000000}
`)
	s := startServer(t, env)
	gdb := openDB(t, s)
	ctx := context.Background()
	for _, token := range []string{testServiceKey, userToken(t, "whale-1", time.Now().Add(time.Hour))} {
		r, err := s.client(t, token).CreateCheckoutSessionWithResponse(ctx, &client.CreateCheckoutSessionParams{}, checkoutBody("whale-1", "whale", 11))
		if err != nil {
			t.Fatal(err)
		}
		mustStatus(t, "11 whale packs", r.StatusCode(), r.Body, http.StatusUnprocessableEntity)
		if !strings.Contains(string(r.Body), `"code":"invalid_request"`) || !strings.Contains(string(r.Body), `"pointer":"/quantity"`) {
			t.Fatalf("11 whale packs: %s", r.Body)
		}
	}
	if n := countRows(t, gdb, `SELECT (SELECT count(*) FROM payments) + (SELECT count(*) FROM customers) + (SELECT count(*) FROM idempotency_keys)`); n != 0 {
		t.Fatalf("a refused checkout wrote %d rows", n)
	}
	if n := len(fake.Requests()); n != 0 {
		t.Fatalf("a refused checkout sent %d requests to Stripe", n)
	}
	// Ten packs are exactly the largest grant and go through.
	pay := checkout(t, s, "whale-1", "whale", 10)
	if p := getPayment(t, s, pay); p.Credits != 1_000_000_000_000 {
		t.Fatalf("10 whale packs: %+v", p)
	}
}

// A checkout that failed at Stripe (502) stores nothing under its
// Idempotency-Key: retries sent at once, several concurrently, go through,
// exactly one of them creating the Checkout Session while the others are
// told it is in flight or replay it. Stripe's own 429 reaches the caller
// with its Retry-After.
func TestCheckoutRetryAfterAFailure(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	s := startServer(t, payEnv(t, fake.URL()))
	ctx := context.Background()
	checkout(t, s, "retry-1", "starter", 1) // links the Stripe customer

	var sessionCalls atomic.Int32
	fake.SetFault(func(r *http.Request) (int, string, bool) {
		if r.URL.Path == "/v1/checkout/sessions" && sessionCalls.Add(1) == 1 {
			return http.StatusInternalServerError, `{"error":{"type":"api_error","message":"injected"}}`, true
		}
		return 0, "", false
	})
	sessionsBefore := len(fake.CheckoutSessions())
	key := "job-42"
	body := checkoutBody("retry-1", "starter", 1)
	first, err := s.service(t).CreateCheckoutSessionWithResponse(ctx, &client.CreateCheckoutSessionParams{IdempotencyKey: &key}, body)
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "checkout while Stripe fails", first.StatusCode(), first.Body, http.StatusBadGateway)
	if n := countRows(t, openDB(t, s), `SELECT count(*) FROM idempotency_keys WHERE key = ?`, key); n != 0 {
		t.Fatalf("the failed checkout left %d rows under its key", n)
	}

	const retries = 6
	responses := make(chan *client.CreateCheckoutSessionResponse, retries)
	var wg sync.WaitGroup
	for range retries {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r, err := s.service(t).CreateCheckoutSessionWithResponse(ctx, &client.CreateCheckoutSessionParams{IdempotencyKey: &key}, body)
			if err != nil {
				t.Error(err)
				return
			}
			responses <- r
		}()
	}
	wg.Wait()
	close(responses)
	var created string
	var replayed []string
	for r := range responses {
		switch {
		case r.StatusCode() == http.StatusCreated && r.HTTPResponse.Header.Get("Idempotent-Replayed") == "":
			if created != "" {
				t.Fatalf("two retries created a checkout: %s and %s", created, r.JSON201.PaymentId)
			}
			created = r.JSON201.PaymentId
		case r.StatusCode() == http.StatusCreated:
			replayed = append(replayed, r.JSON201.PaymentId)
		case r.StatusCode() == http.StatusConflict && strings.Contains(string(r.Body), `"code":"idempotency_key_in_flight"`):
		default:
			t.Fatalf("a retry after the 502: %d %s", r.StatusCode(), r.Body)
		}
	}
	if created == "" {
		t.Fatal("no retry after the 502 went through")
	}
	later, err := s.service(t).CreateCheckoutSessionWithResponse(ctx, &client.CreateCheckoutSessionParams{IdempotencyKey: &key}, body)
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "a later retry", later.StatusCode(), later.Body, http.StatusCreated)
	for _, id := range append(replayed, later.JSON201.PaymentId) {
		if id != created {
			t.Fatalf("a replay answered payment %s, the checkout created %s", id, created)
		}
	}
	if n := len(fake.CheckoutSessions()) - sessionsBefore; n != 1 {
		t.Fatalf("Stripe created %d Checkout Sessions for the key, want 1", n)
	}

	// Stripe rate limiting: the caller gets 429 with Stripe's Retry-After.
	fake.FailNext(1, http.StatusTooManyRequests, "7")
	limited, err := s.service(t).CreateCheckoutSessionWithResponse(ctx, &client.CreateCheckoutSessionParams{}, body)
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "checkout while Stripe rate limits", limited.StatusCode(), limited.Body, http.StatusTooManyRequests)
	if ra := limited.HTTPResponse.Header.Get("Retry-After"); ra != "7" || !strings.Contains(string(limited.Body), `"retry_after_seconds":7`) {
		t.Fatalf("429 with Retry-After %q: %s; want 7 in the header and the body", ra, limited.Body)
	}
	assertInvariants(t, s)
}

// One SPA user cannot flood Stripe with Checkout Sessions through many
// replicas: TALLY_CHECKOUT_RATE_LIMIT is per customer and counted in the
// database, so two instances together allow it once; past it the answer is
// 429 rate_limited with Retry-After, and other customers are not affected.
func TestCheckoutRateLimitAcrossInstances(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	envA := payEnv(t, fake.URL())
	envA["TALLY_CHECKOUT_RATE_LIMIT"] = "3"
	a := startServer(t, envA)
	envB := maps.Clone(envA)
	b := startServer(t, envB)
	gdb := openDB(t, a)
	ctx := context.Background()

	var created, limited int
	for i := range 8 {
		s := []*server{a, b}[i%2]
		r, err := s.client(t, userToken(t, "flooder", time.Now().Add(time.Hour))).CreateCheckoutSessionWithResponse(ctx,
			&client.CreateCheckoutSessionParams{}, checkoutBody("flooder", "starter", 1))
		if err != nil {
			t.Fatal(err)
		}
		switch r.StatusCode() {
		case http.StatusCreated:
			created++
		case http.StatusTooManyRequests:
			limited++
			ra, err := strconv.Atoi(r.HTTPResponse.Header.Get("Retry-After"))
			if err != nil || ra < 1 || ra > 20 || !strings.Contains(string(r.Body), `"code":"rate_limited"`) {
				t.Fatalf("checkout %d: 429 with Retry-After %q: %s", i, r.HTTPResponse.Header.Get("Retry-After"), r.Body)
			}
		default:
			t.Fatalf("checkout %d: %d %s", i, r.StatusCode(), r.Body)
		}
	}
	if created != 3 || limited != 5 {
		t.Fatalf("%d checkouts created and %d limited across two instances, want 3 and 5", created, limited)
	}
	if n := countRows(t, gdb, `SELECT count(*) FROM payments WHERE customer_id = 'flooder'`); n != 3 {
		t.Fatalf("%d payments written for the flooder, want 3", n)
	}
	if n := len(fake.CheckoutSessions()); n != 3 {
		t.Fatalf("%d Checkout Sessions created at Stripe, want 3", n)
	}
	checkout(t, b, "bystander", "starter", 1)
	assertInvariants(t, a)
}

// A PaymentIntent tally did not create, carrying a payment's metadata and
// the right amount, is parked and credits nothing: the Checkout Session
// tally created for the payment names another one. The genuine one credits.
func TestPaymentIntentTallyDidNotCreateIsParked(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	s := startServer(t, payEnv(t, fake.URL()))
	gdb := openDB(t, s)

	pay := checkout(t, s, "target-1", "starter", 1)
	paidAtStripe(t, fake, s, pay)
	forged := paymentIntent(pay, "target-1", "succeeded", starterAmount, starterAmount, "usd")
	forged["id"] = "pi_forged_by_someone_else"
	forgedEvent := newEventID()
	deliver(t, s, stripeEvent(forgedEvent, "payment_intent.succeeded", forged))
	if status, lastErr := eventStatus(t, gdb, forgedEvent); status != "parked" || !strings.Contains(lastErr, "tally did not create it") {
		t.Fatalf("the forged PaymentIntent's event: %s (%s), want parked", status, lastErr)
	}
	if got := balanceOf(t, gdb, "target-1"); got != 0 {
		t.Fatalf("the forged PaymentIntent credited %d", got)
	}
	if p := getPayment(t, s, pay); p.Status != client.PaymentStatusPending || p.PaymentIntentId != nil {
		t.Fatalf("after the forged PaymentIntent: %+v", p)
	}

	genuine := newEventID()
	deliver(t, s, stripeEvent(genuine, "payment_intent.succeeded", paymentIntent(pay, "target-1", "succeeded", starterAmount, starterAmount, "usd")))
	if status, lastErr := eventStatus(t, gdb, genuine); status != "processed" {
		t.Fatalf("the genuine PaymentIntent's event: %s (%s)", status, lastErr)
	}
	if got := balanceOf(t, gdb, "target-1"); got != starterCredits {
		t.Fatalf("balance = %d, want %d", got, starterCredits)
	}
	assertInvariants(t, s)
}

// A genuine payment whose charge includes Stripe Tax, or that Adaptive
// Pricing converted into the buyer's currency, is credited: the catalog
// price is compared with the session's amount before tax in the catalog
// currency, the PaymentIntent with the session's total. A real mismatch
// is still parked. The refund comes in the buyer's currency.
func TestTaxAndAdaptivePricingAreCredited(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	s := startServer(t, payEnv(t, fake.URL()))
	gdb := openDB(t, s)

	// Stripe Tax: $10.00 + $1.90 tax; the success arrives first, so tally
	// asks Stripe for the session.
	taxed := checkout(t, s, "taxed-1", "starter", 1)
	paidAtStripe(t, fake, s, taxed)
	fake.UpdateCheckoutSession(*getPayment(t, s, taxed).CheckoutSessionId, map[string]any{
		"amount_total":  1190,
		"total_details": map[string]any{"amount_discount": 0, "amount_shipping": 0, "amount_tax": 190},
	})
	taxedEvent := newEventID()
	deliver(t, s, stripeEvent(taxedEvent, "payment_intent.succeeded", paymentIntent(taxed, "taxed-1", "succeeded", 1190, 1190, "usd")))
	if status, lastErr := eventStatus(t, gdb, taxedEvent); status != "processed" {
		t.Fatalf("the taxed payment's success: %s (%s)", status, lastErr)
	}
	p := getPayment(t, s, taxed)
	if p.Status != client.PaymentStatusSucceeded || p.AmountReceived == nil || *p.AmountReceived != 1190 ||
		p.AmountTax == nil || *p.AmountTax != 190 || p.ReceivedCurrency == nil || *p.ReceivedCurrency != "usd" {
		t.Fatalf("taxed payment = %+v", p)
	}

	// Adaptive Pricing: the $10.00 pack paid as €9.20 + €0.30 tax; the
	// completed session arrives first and tells tally everything.
	euro := checkout(t, s, "euro-1", "starter", 1)
	paidAtStripe(t, fake, s, euro)
	cs := fake.UpdateCheckoutSession(*getPayment(t, s, euro).CheckoutSessionId, map[string]any{
		"currency": "eur", "amount_subtotal": 920, "amount_total": 950,
		"total_details":       map[string]any{"amount_discount": 0, "amount_shipping": 0, "amount_tax": 30},
		"currency_conversion": map[string]any{"source_currency": "usd", "amount_subtotal": 1000, "amount_total": 1033, "fx_rate": "0.92"},
	})
	deliver(t, s, stripeEvent(newEventID(), "checkout.session.completed", cs))
	gets := len(fake.Requests())
	euroEvent := newEventID()
	deliver(t, s, stripeEvent(euroEvent, "payment_intent.succeeded", paymentIntent(euro, "euro-1", "succeeded", 950, 950, "eur")))
	if status, lastErr := eventStatus(t, gdb, euroEvent); status != "processed" {
		t.Fatalf("the converted payment's success: %s (%s)", status, lastErr)
	}
	if n := len(fake.Requests()) - gets; n != 0 {
		t.Fatalf("%d calls to Stripe for a success whose session was known", n)
	}
	p = getPayment(t, s, euro)
	if p.Status != client.PaymentStatusSucceeded || p.AmountReceived == nil || *p.AmountReceived != 950 || p.ReceivedCurrency == nil || *p.ReceivedCurrency != "eur" {
		t.Fatalf("converted payment = %+v", p)
	}
	for _, c := range []struct{ customer string }{{"taxed-1"}, {"euro-1"}} {
		if got := balanceOf(t, gdb, c.customer); got != starterCredits {
			t.Fatalf("%s: balance = %d, want %d", c.customer, got, starterCredits)
		}
	}
	refund := refundedCharge(euro, 950, 950)
	refund["currency"] = "eur"
	deliver(t, s, stripeEvent(newEventID(), "charge.refunded", refund))
	if got := balanceOf(t, gdb, "euro-1"); got != 0 {
		t.Fatalf("balance after the full refund in EUR = %d, want 0", got)
	}

	// A PaymentIntent that did not collect the session's total is parked.
	short := checkout(t, s, "short-1", "starter", 1)
	paidAtStripe(t, fake, s, short)
	fake.UpdateCheckoutSession(*getPayment(t, s, short).CheckoutSessionId, map[string]any{"amount_total": 1190})
	shortEvent := newEventID()
	deliver(t, s, stripeEvent(shortEvent, "payment_intent.succeeded", paymentIntent(short, "short-1", "succeeded", 1000, 1000, "usd")))
	if status, lastErr := eventStatus(t, gdb, shortEvent); status != "parked" || !strings.Contains(lastErr, "amount_received 1000") {
		t.Fatalf("a PaymentIntent short of the session's total: %s (%s), want parked", status, lastErr)
	}
	if got := balanceOf(t, gdb, "short-1"); got != 0 {
		t.Fatalf("a parked success credited %d", got)
	}
	assertInvariants(t, s)
}

// Credits bought with a pack that does not say otherwise expire 12
// calendar months after the purchase; a pack may say they never expire.
// The catalog tells clients which rule applies.
func TestPackCreditsExpireAfterTwelveMonthsByDefault(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	s := startServer(t, payEnv(t, fake.URL())) // deploy/catalog.example.yaml: starter by default, pro never
	ctx := context.Background()

	cat, err := s.service(t).GetCatalogWithResponse(ctx)
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "catalog", cat.StatusCode(), cat.Body, http.StatusOK)
	for _, p := range cat.JSON200.CreditPacks {
		switch p.Id {
		case "starter":
			if p.ExpiresAfterMonths == nil || *p.ExpiresAfterMonths != 12 || p.ExpiresAfterSeconds != nil {
				t.Fatalf("starter pack = %s", cat.Body)
			}
		case "pro":
			if p.ExpiresAfterMonths != nil || p.ExpiresAfterSeconds != nil {
				t.Fatalf("pro pack = %s", cat.Body)
			}
		}
	}

	for _, c := range []struct {
		customer, item string
		amount         int64
		never          bool
	}{{"yearly-1", "starter", starterAmount, false}, {"forever-1", "pro", 5000, true}} {
		pay := checkout(t, s, c.customer, c.item, 1)
		paidAtStripe(t, fake, s, pay)
		before := time.Now()
		deliver(t, s, stripeEvent(newEventID(), "payment_intent.succeeded", paymentIntent(pay, c.customer, "succeeded", c.amount, c.amount, "usd")))
		after := time.Now()
		b := balanceOverHTTP(t, s.service(t), c.customer)
		if len(b.Grants) != 1 {
			t.Fatalf("%s: grants = %+v", c.customer, b.Grants)
		}
		expires := b.Grants[0].ExpiresAt
		if c.never {
			if expires != nil {
				t.Fatalf("%s: credits expire at %s, want never", c.customer, expires)
			}
			continue
		}
		year := catalog.Expiry{Months: 12}
		earliest, latest := year.After(before.Add(-time.Second)), year.After(after.Add(time.Second))
		if expires == nil || expires.Before(*earliest) || expires.After(*latest) {
			t.Fatalf("%s: credits expire at %v, want 12 calendar months after the purchase (between %s and %s)", c.customer, expires, earliest, latest)
		}
	}
	assertInvariants(t, s)
}
