package main

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"math/rand/v2"
	"net/http"
	"os"
	"os/exec"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tallybilling/tally/internal/stripeapi/stripefake"
	"github.com/tallybilling/tally/pkg/client"
)

// Hostile review of credits_consume_run (migration 00058): hot customers
// (every request on one balance) over three servers of one built binary,
// 64 clients; duplicates of one key at the same instant (so they land in
// one run), one key with two bodies, keys reused on holds and captures,
// a balance run out mid-run, thresholds (the customer's list and the
// default), grants expiring and becoming effective during the load, a
// priority grant, and a SIGKILL of one server mid-load with the client
// retrying every key on the others. TALLY_TEST_HOTRUN_BIN picks the
// binary (default: built from this tree), so the same load runs on the
// build before 00058.

// hotAnswer is one HTTP answer.
type hotAnswer struct {
	variant  string // which body was sent
	server   int
	status   int
	body     string
	code     string
	replayed bool
	err      error
}

type hotTask struct {
	customer string
	key      string
	kind     string // consume, dup, twobodies, holdreuse, capturereuse
	amount   int64
}

func hotClient(t testing.TB, url string) *client.ClientWithResponses {
	c, err := client.NewClientWithResponses(url, client.WithHTTPClient(&http.Client{Timeout: 30 * time.Second}),
		client.WithRequestEditorFn(func(ctx context.Context, req *http.Request) error {
			req.Header.Set("Authorization", "Bearer "+testServiceKey)
			return nil
		}))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func hotConsume(c *client.ClientWithResponses, server int, customer, key string, amount int64) hotAnswer {
	r, err := c.ConsumeCreditsWithResponse(context.Background(), customer, &client.ConsumeCreditsParams{IdempotencyKey: key},
		client.ConsumeRequest{Amount: amount, Reason: "hot"})
	a := hotAnswer{variant: fmt.Sprintf("consume %d", amount), server: server, err: err}
	if err != nil {
		return a
	}
	a.status, a.body = r.StatusCode(), string(r.Body)
	a.replayed = r.HTTPResponse.Header.Get("Idempotent-Replayed") == "true"
	if r.StatusCode() != http.StatusOK {
		var p struct{ Code string }
		_ = json.Unmarshal(r.Body, &p)
		a.code = p.Code
	}
	return a
}

func hotHold(c *client.ClientWithResponses, server int, customer, key string, amount int64) (hotAnswer, string) {
	r, err := c.CreateHoldWithResponse(context.Background(), customer, &client.CreateHoldParams{IdempotencyKey: key},
		client.HoldRequest{Amount: amount, Reason: "hot hold"})
	a := hotAnswer{variant: fmt.Sprintf("hold %d", amount), server: server, err: err}
	if err != nil {
		return a, ""
	}
	a.status, a.body = r.StatusCode(), string(r.Body)
	a.replayed = r.HTTPResponse.Header.Get("Idempotent-Replayed") == "true"
	var p struct{ Code string }
	_ = json.Unmarshal(r.Body, &p)
	a.code = p.Code
	if r.JSON201 != nil {
		return a, r.JSON201.HoldId
	}
	return a, ""
}

func hotCapture(c *client.ClientWithResponses, server int, customer, hold, key string, amount int64) hotAnswer {
	r, err := c.CaptureHoldWithResponse(context.Background(), customer, hold, &client.CaptureHoldParams{IdempotencyKey: key},
		client.CaptureRequest{Amount: &amount})
	a := hotAnswer{variant: fmt.Sprintf("capture %s %d", hold, amount), server: server, err: err}
	if err != nil {
		return a
	}
	a.status, a.body = r.StatusCode(), string(r.Body)
	a.replayed = r.HTTPResponse.Header.Get("Idempotent-Replayed") == "true"
	var p struct{ Code string }
	_ = json.Unmarshal(r.Body, &p)
	a.code = p.Code
	return a
}

// Three hot customers over three servers, one killed mid-load (see the
// top of this file): every key spends once and replays byte-equal, notices
// and draws match a replay of the ledger, verify is clean.
func TestHotCustomersOnThreeServersWithAKill(t *testing.T) {
	t.Parallel()
	bin := os.Getenv("TALLY_TEST_HOTRUN_BIN")
	if bin == "" {
		bin = buildTally(t)
	}
	fake := stripefake.New(t)
	env := baseEnv(t)
	env["TALLY_STRIPE_API_URL"] = fake.URL()
	env["TALLY_DB_MAX_OPEN_CONNS"] = "8"
	env["TALLY_LOW_BALANCE_THRESHOLD"] = "700"
	const nServers = 3
	var servers [nServers]*tallyChild
	var clients [nServers]*client.ClientWithResponses
	for i := range nServers {
		servers[i] = startChild(t, bin, maps.Clone(env))
		clients[i] = hotClient(t, servers[i].URL)
	}
	gdb := openDB(t, &server{DBURL: env["TALLY_DATABASE_URL"], env: env})
	c0 := clients[1]
	ctx := context.Background()
	grant := func(customer, key string, req client.GrantRequest) {
		t.Helper()
		r, err := c0.GrantCreditsWithResponse(ctx, customer, &client.GrantCreditsParams{IdempotencyKey: key}, req)
		if err != nil {
			t.Fatal(err)
		}
		mustStatus(t, "grant", r.StatusCode(), r.Body, http.StatusCreated)
	}
	now := time.Now()
	at := func(d time.Duration) *time.Time { x := now.Add(d); return &x }
	// hotA: its own thresholds, grants in every draw position, one expiring
	// during the load. No holds, nothing scheduled: its notices and draws
	// can be replayed from the ledger.
	r, err := c0.UpsertCustomerWithResponse(ctx, "h77-a", client.CustomerUpsert{LowBalanceThreshold: i64(4000), LowBalanceThresholds: &[]int64{9000, 6000, 2500, 1000}})
	if err != nil || r.StatusCode()/100 != 2 {
		t.Fatalf("upsert: %v %s", err, r.Body)
	}
	grant("h77-a", "g1", client.GrantRequest{Amount: 8000, Reason: "never"})
	grant("h77-a", "g2", client.GrantRequest{Amount: 4000, Reason: "expires soon", ExpiresAt: at(4 * time.Second)})
	grant("h77-a", "g3", client.GrantRequest{Amount: 3000, Reason: "first", Priority: ptr(10)})
	grant("h77-a", "g4", client.GrantRequest{Amount: 5000, Reason: "expires later", ExpiresAt: at(time.Hour)})
	// hotB: the default threshold (700); too little for what is asked.
	grant("h77-b", "g1", client.GrantRequest{Amount: 2000, Reason: "never"})
	grant("h77-b", "g2", client.GrantRequest{Amount: 1500, Reason: "expires soon", ExpiresAt: at(3 * time.Second)})
	// hotC: holds and captures under keys consumes also use; a grant
	// becoming effective during the load.
	grant("h77-c", "g1", client.GrantRequest{Amount: 6000, Reason: "never"})
	grant("h77-c", "g2", client.GrantRequest{Amount: 3000, Reason: "scheduled", EffectiveAt: at(2 * time.Second)})

	var tasks []hotTask
	for i := range 1500 {
		k := hotTask{customer: "h77-a", key: fmt.Sprintf("a-%04d", i), amount: int64(1 + i%23)}
		switch i % 5 {
		case 1:
			k.kind = "dup"
		case 3:
			k.kind = "twobodies"
		default:
			k.kind = "consume"
		}
		tasks = append(tasks, k)
	}
	for i := range 900 {
		k := hotTask{customer: "h77-b", key: fmt.Sprintf("b-%04d", i), amount: int64(1 + i%9)}
		k.kind = []string{"consume", "dup", "twobodies"}[i%3]
		tasks = append(tasks, k)
	}
	for i := range 700 {
		k := hotTask{customer: "h77-c", key: fmt.Sprintf("c-%04d", i), amount: int64(1 + i%7)}
		k.kind = []string{"consume", "dup", "holdreuse", "capturereuse", "consume"}[i%5]
		tasks = append(tasks, k)
	}
	rand.Shuffle(len(tasks), func(i, j int) { tasks[i], tasks[j] = tasks[j], tasks[i] })

	var (
		mu      sync.Mutex
		answers = map[string][]hotAnswer{} // by key
		next    atomic.Int64
		done    atomic.Int64
		killed  atomic.Bool
		wg      sync.WaitGroup
	)
	alive := func() []int {
		if killed.Load() {
			return []int{1, 2}
		}
		return []int{0, 1, 2}
	}
	pick := func() int { a := alive(); return a[rand.IntN(len(a))] }
	record := func(key string, xs ...hotAnswer) {
		mu.Lock()
		answers[key] = append(answers[key], xs...)
		mu.Unlock()
	}
	par := func(fs ...func() hotAnswer) []hotAnswer {
		out := make([]hotAnswer, len(fs))
		var g sync.WaitGroup
		for i, f := range fs {
			g.Go(func() { out[i] = f() })
		}
		g.Wait()
		return out
	}
	holdIDs := map[string]string{}
	for range 64 {
		wg.Go(func() {
			for i := int(next.Add(1)) - 1; i < len(tasks); i = int(next.Add(1)) - 1 {
				k := tasks[i]
				s1, s2 := pick(), pick()
				cons := func(s int, amt int64) func() hotAnswer {
					return func() hotAnswer { return hotConsume(clients[s], s, k.customer, k.key, amt) }
				}
				switch k.kind {
				case "consume":
					record(k.key, cons(s1, k.amount)())
				case "dup":
					record(k.key, par(cons(s1, k.amount), cons(s1, k.amount), cons(s1, k.amount), cons(s2, k.amount))...)
				case "twobodies":
					record(k.key, par(cons(s1, k.amount), cons(s1, k.amount+1), cons(s1, k.amount), cons(s2, k.amount+1))...)
				case "holdreuse":
					record(k.key, par(cons(s1, k.amount), cons(s1, k.amount), func() hotAnswer {
						a, id := hotHold(clients[s1], s1, k.customer, k.key, k.amount)
						if id != "" {
							mu.Lock()
							holdIDs[k.key] = id
							mu.Unlock()
						}
						return a
					})...)
				case "capturereuse":
					// A hold under its own key, then a capture under k.key
					// and a consume under k.key at once.
					a, id := hotHold(clients[s1], s1, k.customer, k.key+"-h", k.amount+2)
					record(k.key+"-h", a)
					if id == "" {
						continue
					}
					mu.Lock()
					holdIDs[k.key+"-h"] = id
					mu.Unlock()
					record(k.key, par(cons(s1, k.amount), func() hotAnswer {
						return hotCapture(clients[s1], s1, k.customer, id, k.key, k.amount)
					}, cons(s2, k.amount))...)
				}
				done.Add(1)
			}
		})
	}
	killAt := int64(len(tasks)*2/5 + rand.IntN(len(tasks)/5))
	for done.Load() < killAt {
		time.Sleep(time.Millisecond)
	}
	servers[0].kill()
	killed.Store(true)
	wg.Wait()
	t.Logf("SIGKILL of server 0 after %d of %d tasks", killAt, len(tasks))

	// Every answer so far, then a retry of every variant of every key on
	// a survivor: a 200 replays byte-equal, nothing answers 409.
	type variantKey struct{ key, variant string }
	var bad []string
	firstOK := map[string]hotAnswer{}  // key -> the 2xx answer
	okVariant := map[variantKey]bool{} // the variant that took effect
	statusCount := map[string]int{}
	badf := func(f string, a ...any) {
		mu.Lock()
		bad = append(bad, fmt.Sprintf(f, a...))
		mu.Unlock()
	}
	check := func(key string, a hotAnswer) {
		if a.err != nil {
			statusCount["transport error"]++
			return
		}
		statusCount[fmt.Sprintf("%s %d %s", strings.Fields(a.variant)[0], a.status, a.code)]++
		switch {
		case a.status/100 == 2:
			if f, ok := firstOK[key]; ok {
				if f.body != a.body && f.variant == a.variant {
					badf("%s: %s answered %s then %s", key, a.variant, f.body, a.body)
				}
				if f.variant != a.variant {
					badf("%s: two bodies took effect: %s %s and %s %s", key, f.variant, f.body, a.variant, a.body)
				}
			} else {
				firstOK[key] = a
			}
			okVariant[variantKey{key, a.variant}] = true
		case a.status == http.StatusPaymentRequired, a.status == http.StatusUnprocessableEntity:
		case a.status == http.StatusConflict && strings.HasPrefix(a.variant, "capture"):
			// a capture of a hold that is no longer active
			if a.code != "conflict" && a.code != "hold_not_active" {
				badf("%s: %s answered %d %s %s", key, a.variant, a.status, a.code, a.body)
			}
		default:
			badf("%s: %s on server %d answered %d %s %s", key, a.variant, a.server, a.status, a.code, a.body)
		}
	}
	for key, xs := range answers {
		for _, a := range xs {
			check(key, a)
		}
	}
	t.Logf("answers during the load: %v", statusCount)
	// Retries.
	statusCount = map[string]int{}
	keys := slices.Sorted(maps.Keys(answers))
	var rg sync.WaitGroup
	ch := make(chan string)
	retried := map[string][]hotAnswer{}
	for range 16 {
		rg.Go(func() {
			for key := range ch {
				seen := map[string]bool{}
				mu.Lock()
				xs := slices.Clone(answers[key])
				mu.Unlock()
				var out []hotAnswer
				for _, a := range xs {
					if seen[a.variant] {
						continue
					}
					seen[a.variant] = true
					s := 1 + rand.IntN(2)
					var amt int64
					switch {
					case strings.HasPrefix(a.variant, "consume"):
						fmt.Sscanf(a.variant, "consume %d", &amt)
						out = append(out, hotConsume(clients[s], s, customerOf(key), key, amt))
					case strings.HasPrefix(a.variant, "hold"):
						fmt.Sscanf(a.variant, "hold %d", &amt)
						x, _ := hotHold(clients[s], s, customerOf(key), key, amt)
						out = append(out, x)
					case strings.HasPrefix(a.variant, "capture"):
						var id string
						fmt.Sscanf(a.variant, "capture %s %d", &id, &amt)
						out = append(out, hotCapture(clients[s], s, customerOf(key), id, key, amt))
					}
				}
				mu.Lock()
				retried[key] = out
				mu.Unlock()
			}
		})
	}
	for _, k := range keys {
		ch <- k
	}
	close(ch)
	rg.Wait()
	loadOK := maps.Clone(firstOK)
	lost := map[string]bool{} // keys with an answer lost to the kill
	for key, xs := range answers {
		for _, a := range xs {
			if a.err != nil {
				lost[key] = true
			}
		}
	}
	for _, key := range keys {
		for _, a := range retried[key] {
			check(key, a)
			if a.err != nil {
				badf("%s: retry of %s: %v", key, a.variant, a.err)
				continue
			}
			f, ok := loadOK[key]
			switch {
			case ok && f.variant == a.variant:
				if a.status/100 != 2 || !a.replayed || a.body != f.body {
					badf("%s: %s took effect (%s), the retry answered %d replayed=%t %s", key, a.variant, f.body, a.status, a.replayed, a.body)
				}
			case ok:
				if a.status != http.StatusUnprocessableEntity {
					badf("%s: %s took effect, the retry of %s answered %d %s", key, f.variant, a.variant, a.status, a.body)
				}
			case lost[key] && (a.status/100 == 2 || a.status == http.StatusUnprocessableEntity):
				// an answer was lost to the kill: it may have taken effect
				// only now, or its other body did
			case customerOf(key) != "h77-c" && strings.HasPrefix(a.variant, "consume") && a.status != http.StatusPaymentRequired:
				badf("%s: nothing took effect, the retry of %s answered %d %s", key, a.variant, a.status, a.body)
			}
		}
	}
	t.Logf("answers of the retries: %v", statusCount)

	// The database.
	type entry struct {
		Seq            int64
		CustomerID     string
		Kind           string
		Amount         int64
		BalanceAfter   int64
		GrantID        *string
		Draws          *string
		IdempotencyKey *string
		CreatedAt      time.Time
	}
	var entries []entry
	if err := gdb.Raw(`SELECT seq, customer_id, kind, amount, balance_after, grant_id, draws::text AS draws, idempotency_key, created_at FROM credit_ledger ORDER BY seq`).Scan(&entries).Error; err != nil {
		t.Fatal(err)
	}
	consumed := map[string]int{}
	for _, e := range entries {
		if e.Kind == "consume" && e.IdempotencyKey != nil {
			consumed[*e.IdempotencyKey]++
		}
	}
	applied := 0
	for _, key := range keys {
		f, ok := firstOK[key]
		isConsume := ok && strings.HasPrefix(f.variant, "consume")
		isCapture := ok && strings.HasPrefix(f.variant, "capture")
		switch {
		case consumed[key] > 1:
			badf("%s: %d consume entries", key, consumed[key])
		case isConsume && consumed[key] != 1:
			badf("%s: answered %s %s but %d consume entries", key, f.variant, f.body, consumed[key])
		case !ok && consumed[key] != 0:
			badf("%s: never answered 2xx but %d consume entries", key, consumed[key])
		case !isConsume && !isCapture && consumed[key] != 0:
			badf("%s: %s took effect but %d consume entries", key, f.variant, consumed[key])
		}
		if isConsume {
			applied++
		}
	}
	if n := countRows(t, gdb, `SELECT count(*) FROM idempotency_keys WHERE completed_at IS NULL`); n != 0 {
		var rows []string
		_ = gdb.Raw(`SELECT scope || ' ' || key || ' ' || created_at::text || ' ' || COALESCE(lease_expires_at::text, '-') FROM idempotency_keys WHERE completed_at IS NULL LIMIT 10`).Scan(&rows).Error
		badf("%d key rows without a result once every request was answered: %v", n, rows)
	}
	// Notices of h77-a: replayed from its ledger (no holds, nothing
	// scheduled, so what is available is the balance).
	type notice struct{ threshold, available int64 }
	replay := func(customer string, primary int64, list []int64) []notice {
		var out []notice
		notified := false
		prev := int64(0)
		// One afterLowering per transaction: entries of one transaction
		// share created_at and the balance before the first.
		for i := 0; i < len(entries); i++ {
			e := entries[i]
			if e.CustomerID != customer {
				continue
			}
			if e.Kind == "grant" {
				prev = e.BalanceAfter
				if prev >= primary {
					notified = false
				}
				continue
			}
			// the group: consecutive expire entries of this customer with
			// the same created_at (one expiry, one notice).
			j := i
			last := e
			for k := i + 1; k < len(entries); k++ {
				if entries[k].CustomerID != customer {
					continue
				}
				if entries[k].Kind != "expire" || last.Kind != "expire" || !entries[k].CreatedAt.Equal(e.CreatedAt) {
					break
				}
				last, j = entries[k], k
			}
			before, after := prev, last.BalanceAfter
			below := primary > 0 && after < primary
			if below && !notified {
				notified = true
				out = append(out, notice{primary, after})
			} else if !below {
				notified = false
			}
			for _, th := range list {
				if th != primary && before >= th && after < th {
					out = append(out, notice{th, after})
				}
			}
			prev = after
			i = j
		}
		return out
	}
	fired := func(customer string) []notice {
		var rows []struct{ Threshold, Available int64 }
		if err := gdb.Raw(`SELECT (data->>'threshold')::bigint AS threshold, (data->>'available')::bigint AS available FROM events WHERE type = 'credits.low_balance' AND customer_id = ? ORDER BY id`, customer).Scan(&rows).Error; err != nil {
			t.Fatal(err)
		}
		var out []notice
		for _, r := range rows {
			out = append(out, notice{r.Threshold, r.Available})
		}
		return out
	}
	for _, c := range []struct {
		customer string
		primary  int64
		list     []int64
	}{{"h77-a", 4000, []int64{9000, 6000, 2500, 1000}}, {"h77-b", 700, nil}} {
		want, got := replay(c.customer, c.primary, c.list), fired(c.customer)
		sortN := func(ns []notice) {
			sort.Slice(ns, func(i, j int) bool { return ns[i].threshold*1e9+ns[i].available < ns[j].threshold*1e9+ns[j].available })
		}
		sortN(want)
		sortN(got)
		if fmt.Sprint(want) != fmt.Sprint(got) {
			badf("%s: notices %v, the ledger says %v", c.customer, got, want)
		}
		t.Logf("%s: %d notices %v", c.customer, len(got), got)
	}
	// Draw order of h77-a, replayed.
	type grantRow struct {
		ID        string
		Priority  int
		ExpiresAt *time.Time
		CreatedAt time.Time
	}
	var grants []grantRow
	if err := gdb.Raw(`SELECT id, priority, expires_at, created_at FROM credit_grants WHERE customer_id = 'h77-a' ORDER BY priority, expires_at NULLS LAST, created_at, id`).Scan(&grants).Error; err != nil {
		t.Fatal(err)
	}
	left := map[string]int64{}
	for _, e := range entries {
		if e.CustomerID != "h77-a" {
			continue
		}
		switch e.Kind {
		case "grant", "expire":
			left[*e.GrantID] += e.Amount
		case "consume":
			var draws []struct {
				GrantID string `json:"grant_id"`
				Amount  int64  `json:"amount"`
			}
			_ = json.Unmarshal([]byte(*e.Draws), &draws)
			var want, got []string
			need := -e.Amount
			for _, g := range grants {
				if need == 0 {
					break
				}
				if g.ExpiresAt != nil && !g.ExpiresAt.After(e.CreatedAt) {
					continue
				}
				if take := min(left[g.ID], need); take > 0 {
					want = append(want, fmt.Sprintf("%s:%d", g.ID, take))
					left[g.ID] -= take
					need -= take
				}
			}
			for _, d := range draws {
				got = append(got, fmt.Sprintf("%s:%d", d.GrantID, d.Amount))
			}
			if !slices.Equal(want, got) {
				badf("h77-a: consume %s drew %v, the draw order takes %v", deref(e.IdempotencyKey), got, want)
			}
		}
	}
	// tally verify with the binary under test.
	cmd := exec.Command(bin, "verify")
	for k, v := range env {
		cmd.Env = append(cmd.Env, k+"="+v)
	}
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "ok: every invariant holds") {
		badf("tally verify: %v\n%s", err, out)
	}
	for _, c := range []string{"h77-a", "h77-b", "h77-c"} {
		t.Logf("%s: balance %d, %d consume entries", c, balanceOf(t, gdb, c), countRows(t, gdb, `SELECT count(*) FROM credit_ledger WHERE customer_id = ? AND kind = 'consume'`, c))
	}
	t.Logf("%d keys, %d consumes applied; %d problems", len(keys), applied, len(bad))
	for i, b := range bad {
		if i == 30 {
			break
		}
		t.Error(b)
	}
}

func customerOf(key string) string {
	return "h77-" + key[:1]
}
