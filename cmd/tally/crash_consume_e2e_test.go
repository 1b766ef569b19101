package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net/http"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tallybilling/tally/internal/stripeapi/stripefake"
)

// The crash test, for consumes (issue 11): the process is killed (SIGKILL)
// while consumes are being gathered into batches, some of them duplicated
// (two copies of one key at once), then restarted on the same database.
// No consume that was answered 200 is lost: its ledger entry is there, and
// a retry of its key replays the same answer. Every other key, retried,
// applies exactly once. tally verify is clean.
func TestCrashMidConsumeBatchThenRestart(t *testing.T) {
	t.Parallel()
	bin := buildTally(t)
	fake := stripefake.New(t)
	env := baseEnv(t)
	env["TALLY_STRIPE_API_URL"] = fake.URL()
	env["TALLY_DB_MAX_OPEN_CONNS"] = "10"
	run := &crashRun{t: t}
	first := startChild(t, bin, env)
	run.children = append(run.children, first)
	srv := &server{URL: first.URL, DBURL: env["TALLY_DATABASE_URL"], env: env}
	gdb := openDB(t, srv)

	const (
		grantEach = 1_000_000
		workers   = 48
		planned   = 3000 // keys; the kill comes long before they are done
	)
	customers := []string{"crash-hot", "crash-a", "crash-b", "crash-c"}
	for _, c := range customers {
		grantOverHTTP(t, srv.service(t), c, grantEach, "crash-grant-"+c)
	}
	type key struct {
		customer, key string
		amount        int64
	}
	keys := make([]key, planned)
	for i := range keys {
		c := customers[0]
		if i%2 == 1 {
			c = customers[1+i%3]
		}
		keys[i] = key{customer: c, key: fmt.Sprintf("crash-consume-%04d", i), amount: int64(1 + i%3)}
	}
	type answer struct {
		TransactionID string `json:"transaction_id"`
		Amount        int64  `json:"amount"`
		Balance       int64  `json:"balance"`
	}
	hc := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: workers}}
	t.Cleanup(hc.CloseIdleConnections)
	consume := func(base string, k key) (int, answer, string, error) {
		body, _ := json.Marshal(map[string]any{"amount": k.amount, "reason": "crash"})
		req, err := http.NewRequest(http.MethodPost, base+"/v1/customers/"+k.customer+"/credits/consume", bytes.NewReader(body))
		if err != nil {
			return 0, answer{}, "", err
		}
		req.Header.Set("Authorization", "Bearer "+testServiceKey)
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("Idempotency-Key", k.key)
		resp, err := hc.Do(req)
		if err != nil {
			return 0, answer{}, "", err
		}
		defer resp.Body.Close()
		var a answer
		if resp.StatusCode == http.StatusOK {
			if err := json.NewDecoder(resp.Body).Decode(&a); err != nil {
				return 0, answer{}, "", err
			}
		}
		return resp.StatusCode, a, resp.Header.Get("Idempotent-Replayed"), nil
	}

	var (
		mu     sync.Mutex
		acked  = map[string]answer{} // key -> the answer a 200 gave
		other  = map[int]int{}
		oks    atomic.Int64
		next   atomic.Int64
		killed atomic.Bool
		wg     sync.WaitGroup
	)
	for range workers {
		wg.Go(func() {
			for !killed.Load() {
				i := int(next.Add(1)) - 1
				if i >= planned {
					return
				}
				k := keys[i]
				// One key in four is sent twice at once, so copies of a key
				// meet in one batch or in two.
				copies := 1
				if i%4 == 0 {
					copies = 2
				}
				var inner sync.WaitGroup
				for range copies {
					inner.Go(func() {
						st, a, _, err := consume(first.URL, k)
						mu.Lock()
						defer mu.Unlock()
						switch {
						case err != nil:
						case st == http.StatusOK:
							if prev, ok := acked[k.key]; ok && prev != a {
								t.Errorf("%s answered %+v and %+v", k.key, prev, a)
							}
							acked[k.key] = a
							oks.Add(1)
						default:
							other[st]++
						}
					})
				}
				inner.Wait()
			}
		})
	}
	killAt := int64(200 + rand.IntN(600))
	for oks.Load() < killAt && next.Load() < planned {
		time.Sleep(time.Millisecond)
	}
	time.Sleep(rand.N(20 * time.Millisecond))
	first.kill()
	killed.Store(true)
	wg.Wait()
	mu.Lock()
	t.Logf("SIGKILL after %d answered consumes (%d distinct keys), %d keys started; other statuses %v", oks.Load(), len(acked), next.Load(), other)
	if len(other) > 0 {
		mu.Unlock()
		run.fatalf("consumes refused during the storm: %v", other)
	}
	if int(next.Load()) >= planned {
		mu.Unlock()
		run.fatalf("every key was sent before the kill: the kill came too late")
	}
	mu.Unlock()

	// Nothing answered is lost: each acknowledged consume's entry is there.
	for k, a := range acked {
		if n := countRows(t, gdb, `SELECT count(*) FROM credit_ledger WHERE id = ? AND idempotency_key = ?`, a.TransactionID, k); n != 1 {
			run.fatalf("acknowledged consume %s (%+v) has %d ledger entries after the kill", k, a, n)
		}
	}

	second := startChild(t, bin, env)
	run.children = append(run.children, second)
	srv2 := &server{URL: second.URL, DBURL: env["TALLY_DATABASE_URL"], env: env}
	// The client retries every key it sent (and the rest): an acknowledged
	// one replays its answer, any other applies once.
	sent := int(next.Load())
	retry := make(chan key, planned)
	for _, k := range keys {
		retry <- k
	}
	close(retry)
	var failures []string
	var rg sync.WaitGroup
	for range 16 {
		rg.Go(func() {
			for k := range retry {
				st, a, replayed, err := consume(second.URL, k)
				mu.Lock()
				prev, wasAcked := acked[k.key]
				switch {
				case err != nil || st != http.StatusOK:
					failures = append(failures, fmt.Sprintf("%s: %d %v", k.key, st, err))
				case wasAcked && (a != prev || replayed != "true"):
					failures = append(failures, fmt.Sprintf("%s: acknowledged %+v, retry answered %+v (replayed %q)", k.key, prev, a, replayed))
				}
				mu.Unlock()
			}
		})
	}
	rg.Wait()
	if len(failures) > 0 {
		run.fatalf("%d retries after the restart went wrong, first: %v", len(failures), failures[:min(len(failures), 10)])
	}
	// Every key applied exactly once, and the balances agree.
	want := map[string]int64{}
	for _, k := range keys {
		want[k.customer] += k.amount
	}
	for _, c := range customers {
		if n := countRows(t, gdb, `SELECT count(DISTINCT idempotency_key) FROM credit_ledger WHERE customer_id = ? AND kind = 'consume'`, c); n !=
			countRows(t, gdb, `SELECT count(*) FROM credit_ledger WHERE customer_id = ? AND kind = 'consume'`, c) {
			run.fatalf("%s: a key applied twice", c)
		}
		if b := balanceOf(t, gdb, c); b != grantEach-want[c] {
			run.fatalf("%s: balance %d, want %d", c, b, grantEach-want[c])
		}
	}
	if n := countRows(t, gdb, `SELECT count(*) FROM credit_ledger WHERE kind = 'consume'`); n != planned {
		run.fatalf("%d consume entries, want one per key: %d", n, planned)
	}
	t.Logf("after the restart: %d keys sent before the kill, all %d retried, each applied once", sent, planned)
	mustVerifyClean(t, srv2)
}
