package main

import (
	"context"
	"encoding/json"
	"net/http"
	"sync"
	"sync/atomic"
	"testing"
	"time"

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
		var p client.Problem
		if status != http.StatusServiceUnavailable || json.Unmarshal(body, &p) != nil || p.Code != client.ErrorCodeUnavailable {
			t.Fatalf("reading %s with the database stalled: %d %s, want 503 unavailable", what, status, body)
		}
		if took > 15*time.Second {
			t.Errorf("reading %s with the database stalled took %s against a 2s request timeout", what, took)
		}
		t.Logf("%s answered %d after %s: %s", what, status, took.Round(time.Millisecond), deref(p.Detail))
	}

	proxy.resume()
	deadline := time.Now().Add(patience)
	for {
		r, err := svc.GetCustomerWithResponse(context.Background(), "erin")
		if err == nil && r.StatusCode() == http.StatusOK {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the database answers again, but reading a customer still fails after %s: %v %v", patience, err, r)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
