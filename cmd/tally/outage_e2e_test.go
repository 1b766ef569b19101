package main

import (
	"context"
	"encoding/json"
	"net/http"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/stripeapi/stripefake"
	"github.com/tallybilling/tally/pkg/client"
)

func getStatus(t testing.TB, u string) int {
	t.Helper()
	resp, err := http.Get(u)
	if err != nil {
		t.Fatalf("GET %s: %v", u, err)
	}
	resp.Body.Close()
	return resp.StatusCode
}

func waitStatus(t testing.TB, u string, want int, within time.Duration) time.Duration {
	t.Helper()
	start := time.Now()
	for {
		if getStatus(t, u) == want {
			return time.Since(start)
		}
		if time.Since(start) > within {
			t.Fatalf("GET %s did not answer %d within %s", u, want, within)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// With the database gone, tally stays alive, reports not ready and answers
// 503 problem+json; when the database returns it recovers without a restart.
func TestDatabaseOutageAndRecovery(t *testing.T) {
	t.Parallel()
	env := baseEnv(t)
	proxy := behindDBProxy(t, env)
	s := startServer(t, env)
	ctx := context.Background()

	// Ready once the readiness check (a ping within a second) answers; a
	// loaded machine may miss the first.
	waitStatus(t, s.URL+"/readyz", http.StatusOK, patience)
	if got := getStatus(t, s.URL+"/readyz"); got != http.StatusOK {
		t.Fatalf("readyz before the outage = %d", got)
	}
	if r, err := s.service(t).UpsertCustomerWithResponse(ctx, "dave", client.CustomerUpsert{}); err != nil || r.StatusCode() != http.StatusCreated {
		t.Fatalf("create dave: %v %v", err, r)
	}
	// Many connections in the pool, each used a moment ago: the ones a
	// restarted database leaves dead without the pool knowing.
	if bad := readConcurrently(t, s, "dave"); bad != 0 {
		t.Fatalf("%d reads failed before the outage", bad)
	}

	proxy.down()
	took := waitStatus(t, s.URL+"/readyz", http.StatusServiceUnavailable, 5*time.Second)
	t.Logf("readyz went 503 %s after the database vanished", took)
	if got := getStatus(t, s.URL+"/healthz"); got != http.StatusOK {
		t.Fatalf("healthz during the outage = %d, want 200 (the process is alive)", got)
	}
	r, err := s.service(t).GetCustomerWithResponse(ctx, "dave")
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "read during the outage", r.StatusCode(), r.Body, http.StatusServiceUnavailable)
	var p client.Problem
	if err := json.Unmarshal(r.Body, &p); err != nil || p.Code != client.ErrorCodeUnavailable {
		t.Fatalf("outage problem = %s", r.Body)
	}

	proxy.up()
	// The server saw the database go (the 503s above), so every pooled
	// connection the outage killed is dropped before a request gets it:
	// right after the database returns, no read fails on one, although
	// each was used less than a second ago (when the pool would not check
	// it on its own).
	if bad := readConcurrently(t, s, "dave"); bad != 0 {
		t.Fatalf("%d reads failed right after the database returned, on connections the outage had killed", bad)
	}
	took = waitStatus(t, s.URL+"/readyz", http.StatusOK, patience)
	t.Logf("readyz back to 200 %s after the database returned", took)
	r, err = s.service(t).GetCustomerWithResponse(ctx, "dave")
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "read after recovery", r.StatusCode(), r.Body, http.StatusOK)
}

// readConcurrently reads customer id from s in 16 goroutines, 5 times each,
// and returns how many reads did not answer 200.
func readConcurrently(t *testing.T, s *server, id string) int64 {
	t.Helper()
	var bad atomic.Int64
	var wg sync.WaitGroup
	for range 16 {
		wg.Go(func() {
			for range 5 {
				r, err := s.service(t).GetCustomerWithResponse(context.Background(), id)
				if err != nil || r.StatusCode() != http.StatusOK {
					bad.Add(1)
				}
			}
		})
	}
	wg.Wait()
	return bad.Load()
}

// A database that stops answering without closing anything (a hung host,
// a network dropping packets) is answered 503 problem+json once the
// request's deadline (TALLY_REQUEST_TIMEOUT) passes, not held until the
// operating system gives up on the connection; when it answers again the
// service does too, without a restart.
func TestAStalledDatabaseIsAnsweredInTime(t *testing.T) {
	t.Parallel()
	env := baseEnv(t)
	env["TALLY_REQUEST_TIMEOUT"] = "2s"
	proxy := behindDBProxy(t, env)
	s := startServer(t, env)
	svc := s.service(t)
	if r, err := svc.UpsertCustomerWithResponse(context.Background(), "erin", client.CustomerUpsert{}); err != nil || r.StatusCode() != http.StatusCreated {
		t.Fatalf("create erin: %v %v", err, r)
	}

	proxy.stall()
	reads := map[string]func(ctx context.Context) (int, []byte, error){
		"a customer": func(ctx context.Context) (int, []byte, error) {
			r, err := svc.GetCustomerWithResponse(ctx, "erin")
			if err != nil {
				return 0, nil, err
			}
			return r.StatusCode(), r.Body, nil
		},
		"a balance": func(ctx context.Context) (int, []byte, error) {
			r, err := svc.GetBalanceWithResponse(ctx, "erin", nil)
			if err != nil {
				return 0, nil, err
			}
			return r.StatusCode(), r.Body, nil
		},
	}
	for what, read := range reads {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		start := time.Now()
		status, body, err := read(ctx)
		cancel()
		took := time.Since(start)
		if err != nil {
			t.Fatalf("reading %s with the database stalled: no answer after %s: %v", what, took, err)
		}
		mustUnavailable(t, "reading "+what, status, body, took)
		if took > 15*time.Second {
			t.Errorf("reading %s with the database stalled took %s against a 2s request timeout", what, took)
		}
	}

	proxy.resume()
	waitFor(t, "a customer read once the database answers again", func() bool {
		r, err := svc.GetCustomerWithResponse(context.Background(), "erin")
		return err == nil && r.StatusCode() == http.StatusOK
	})
}

// mustUnavailable is the problem of an answer given while the database
// was stalled, which must be 503 unavailable problem+json.
func mustUnavailable(t *testing.T, what string, status int, body []byte, took time.Duration) client.Problem {
	t.Helper()
	var p client.Problem
	if status != http.StatusServiceUnavailable || json.Unmarshal(body, &p) != nil || p.Code != client.ErrorCodeUnavailable {
		t.Fatalf("%s with the database stalled: %d %s after %s, want 503 unavailable", what, status, body, took)
	}
	t.Logf("%s answered %d after %s: %s", what, status, took.Round(time.Millisecond), deref(p.Detail))
	return p
}

// A checkout whose database stops answering while Stripe creates its
// session is still answered: the work that runs on once the payment is on
// record (recording the session under its Idempotency-Key, or marking the
// payment failed and giving the key back) keeps bounds of its own, as
// the request's deadline no longer reaches it. Without them it waited for
// the database as long as the database said nothing, and its caller with
// it, past the server's write timeout. A retry with the same key once the
// database answers ends in one checkout.
func TestACheckoutIsAnsweredWhenTheDatabaseStallsDuringItsStripeCall(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	env := payEnv(t, fake.URL())
	env["TALLY_REQUEST_TIMEOUT"] = "2s"
	proxy := behindDBProxy(t, env)
	s := startServer(t, env)
	svc := s.service(t)
	ctx := context.Background()
	var armed atomic.Bool
	fake.SetFault(func(r *http.Request) (int, string, bool) {
		if r.URL.Path == "/v1/checkout/sessions" && armed.CompareAndSwap(true, false) {
			proxy.stall() // the session is created; the database stops answering
		}
		return 0, "", false
	})
	checkoutDora := func(ctx context.Context) (*client.CreateCheckoutSessionResponse, error) {
		return svc.CreateCheckoutSessionWithResponse(ctx, &client.CreateCheckoutSessionParams{IdempotencyKey: ptr("dora-checkout-1")}, client.CheckoutSessionCreate{
			CustomerId: "dora", Item: "starter", SuccessUrl: "https://app.example.com/paid", CancelUrl: "https://app.example.com/cancel",
		})
	}

	armed.Store(true)
	type answer struct {
		r    *client.CreateCheckoutSessionResponse
		err  error
		took time.Duration
	}
	answered := make(chan answer, 1)
	go func() {
		start := time.Now()
		r, err := checkoutDora(ctx)
		answered <- answer{r, err, time.Since(start)}
	}()
	// Past the server's write timeout (60 s) an answer can no longer be
	// written; the stall lasts until then unless the checkout answers.
	var a answer
	select {
	case a = <-answered:
	case <-time.After(75 * time.Second):
		proxy.resume()
		a = <-answered
		t.Fatalf("a checkout with the database stalled during its Stripe call got no answer in 75 s (then %v, %v after %s)", a.err, a.r, a.took)
	}
	proxy.resume()
	if a.err != nil {
		t.Fatalf("a checkout with the database stalled during its Stripe call: no answer after %s: %v", a.took, a.err)
	}
	mustUnavailable(t, "a checkout stalled during its Stripe call", a.r.StatusCode(), a.r.Body, a.took)

	// The database answers again: the retry with the same key ends in a
	// checkout whose payment waits for the buyer, and nothing breaks an
	// invariant. The key could not be given back while the database said
	// nothing: until its lease ends a retry may be told it is in flight.
	var pay string
	seen := map[string]int{}
	waitForWithin(t, "the retried checkout", db.ReservationLease+patience, func() bool {
		r, err := checkoutDora(ctx)
		if err != nil {
			t.Fatalf("retrying the checkout: %v", err)
		}
		var p client.Problem
		switch {
		case r.StatusCode() == http.StatusCreated:
			pay = r.JSON201.PaymentId
			t.Logf("retries before the checkout: %v", seen)
			return true
		case r.StatusCode() == http.StatusConflict && json.Unmarshal(r.Body, &p) == nil && p.Code == client.ErrorCodeIdempotencyKeyInFlight:
		default:
			t.Fatalf("retrying the checkout: %d %s", r.StatusCode(), r.Body)
		}
		seen[string(p.Code)]++
		time.Sleep(time.Second)
		return false
	})
	if got := getPayment(t, s, pay); got.Status != "pending" || got.CheckoutSessionId == nil {
		t.Fatalf("the retried checkout's payment %s is %s with session %v, want pending with its session", pay, got.Status, got.CheckoutSessionId)
	}
	paidAtStripe(t, fake, s, pay)
	deliver(t, s, stripeEvent(newEventID(), "payment_intent.succeeded", paymentIntent(pay, "dora", "succeeded", starterAmount, starterAmount, "usd")))
	assertInvariants(t, s)
}

// A consume that a batch has taken when the database stops answering is
// answered 503 soon after its request's deadline, not when the batch gives
// up (30 s later, past the write timeout at the default deadline, where
// the caller got no answer at all); once the database answers, a retry
// with the same key applies it once.
func TestABatchedConsumeIsAnsweredNearItsDeadline(t *testing.T) {
	t.Parallel()
	env := baseEnv(t)
	env["TALLY_REQUEST_TIMEOUT"] = "2s"
	proxy := behindDBProxy(t, env)
	s := startServer(t, env)
	c := s.wideClient(t)
	grantOverHTTP(t, c, "fay", 50, "fay-grant")
	consume := func(ctx context.Context) (*client.ConsumeCreditsResponse, error) {
		return c.ConsumeCreditsWithResponse(ctx, "fay", &client.ConsumeCreditsParams{IdempotencyKey: "fay-consume-1"},
			client.ConsumeRequest{Amount: 3, Reason: "render"})
	}

	proxy.stall()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	start := time.Now()
	r, err := consume(ctx)
	cancel()
	took := time.Since(start)
	if err != nil {
		t.Fatalf("a consume with the database stalled: no answer after %s: %v", took, err)
	}
	mustUnavailable(t, "a consume", r.StatusCode(), r.Body, took)
	if took > 12*time.Second {
		t.Errorf("a consume with the database stalled was answered after %s against a 2s request timeout", took)
	}

	proxy.resume()
	waitForWithin(t, "the consume's retry with its key once the database answers again", 2*patience, func() bool {
		r, err := consume(context.Background())
		return err == nil && r.StatusCode() == http.StatusOK
	})
	b, err := c.GetBalanceWithResponse(context.Background(), "fay", nil)
	if err != nil || b.JSON200 == nil {
		t.Fatalf("balance: %v %v", err, b)
	}
	if bal, _ := b.JSON200.AsBalance(); bal.Balance != 47 {
		t.Errorf("balance after the stalled consume and its retry: %d, want 47 (applied once)", bal.Balance)
	}
}
