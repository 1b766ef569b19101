package main

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"math/rand/v2"
	"net/http"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tallybilling/tally/internal/stripeapi/stripefake"
	"github.com/tallybilling/tally/pkg/client"
)

// flakyStripe is a fake Stripe's event list and PaymentIntents, answering
// slowly and often 503 while flaky: what the catch-up lists and what a
// refund or dispute of an unlinked PaymentIntent asks.
type flakyStripe struct {
	mu       sync.Mutex
	events   []map[string]any // in creation order
	metadata map[string]string
	flaky    atomic.Bool
	asked    map[string]*atomic.Int64 // by what: pi, pi503, list, list503, session503
}

func newFlakyStripe(fake *stripefake.Fake) *flakyStripe {
	f := &flakyStripe{metadata: map[string]string{}, asked: map[string]*atomic.Int64{}}
	for _, k := range []string{"pi", "pi503", "list", "list503", "session503"} {
		f.asked[k] = &atomic.Int64{}
	}
	f.flaky.Store(true)
	down := `{"error":{"type":"api_error","message":"down"}}`
	fake.SetFault(func(r *http.Request) (int, string, bool) {
		if r.Method != http.MethodGet {
			return 0, "", false
		}
		flaky := f.flaky.Load()
		if id, ok := strings.CutPrefix(r.URL.Path, "/v1/payment_intents/"); ok {
			f.asked["pi"].Add(1)
			if flaky {
				time.Sleep(time.Duration(rand.IntN(1000)) * time.Millisecond)
				if rand.IntN(3) == 0 {
					f.asked["pi503"].Add(1)
					return http.StatusServiceUnavailable, down, true
				}
			}
			f.mu.Lock()
			md, ok := f.metadata[id]
			f.mu.Unlock()
			if !ok {
				md = `{}`
			}
			return http.StatusOK, fmt.Sprintf(`{"id":%q,"object":"payment_intent","status":"succeeded","amount":%d,"amount_received":%d,"currency":"usd","livemode":false,"metadata":%s}`,
				id, starterAmount, starterAmount, md), true
		}
		if strings.HasPrefix(r.URL.Path, "/v1/checkout/sessions/") {
			if flaky && rand.IntN(4) == 0 {
				f.asked["session503"].Add(1)
				return http.StatusServiceUnavailable, down, true
			}
			return 0, "", false
		}
		if r.URL.Path != "/v1/events" {
			return 0, "", false
		}
		f.asked["list"].Add(1)
		if flaky {
			time.Sleep(time.Duration(rand.IntN(700)) * time.Millisecond)
			if rand.IntN(4) == 0 {
				f.asked["list503"].Add(1)
				return http.StatusServiceUnavailable, down, true
			}
		}
		return http.StatusOK, f.list(r), true
	})
	return f
}

// list answers GET /v1/events as Stripe does: newest first, created[gte],
// limit, starting_after.
func (f *flakyStripe) list(r *http.Request) string {
	f.mu.Lock()
	defer f.mu.Unlock()
	q := r.URL.Query()
	limit, _ := strconv.Atoi(q.Get("limit"))
	if limit <= 0 {
		limit = 10
	}
	gte, _ := strconv.ParseInt(q.Get("created[gte]"), 10, 64)
	start := len(f.events) - 1
	if after := q.Get("starting_after"); after != "" {
		for i, ev := range f.events {
			if ev["id"] == after {
				start = i - 1
			}
		}
	}
	var data []map[string]any
	i := start
	for ; i >= 0 && len(data) < limit; i-- {
		if f.events[i]["created"].(int64) < gte {
			i = -1
			break
		}
		data = append(data, f.events[i])
	}
	more := i >= 0 && f.events[i]["created"].(int64) >= gte
	body, _ := json.Marshal(map[string]any{"object": "list", "url": "/v1/events", "has_more": more, "data": data})
	return string(body)
}

// add puts an event Stripe created at created into its list (listed from
// now on) and returns its webhook body.
func (f *flakyStripe) add(id, typ string, created time.Time, object map[string]any) []byte {
	ev := map[string]any{"id": id, "object": "event", "type": typ, "created": created.Unix(), "livemode": false,
		"api_version": "2025-03-31.basil", "pending_webhooks": 1, "data": map[string]any{"object": object}}
	f.mu.Lock()
	defer f.mu.Unlock()
	at := sort.Search(len(f.events), func(i int) bool { return f.events[i]["created"].(int64) > created.Unix() })
	f.events = slices.Insert(f.events, at, ev)
	body, _ := json.Marshal(ev)
	return body
}

func (f *flakyStripe) name(pay, customer string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.metadata[piID(pay)] = fmt.Sprintf(`{"tally_payment_id":%q,"tally_customer_id":%q}`, pay, customer)
}

// processedCounted sums tally_stripe_events_total{status="processed"} over
// the servers' /metrics.
func processedCounted(t *testing.T, servers []*server) (processed, other int64) {
	t.Helper()
	re := regexp.MustCompile(`(?m)^tally_stripe_events_total\{[^}]*status="([a-z]+)"[^}]*\} (\S+)$`)
	for _, s := range servers {
		for _, m := range re.FindAllStringSubmatch(metricsText(t, s), -1) {
			v, err := strconv.ParseFloat(m[2], 64)
			if err != nil {
				t.Fatalf("metric value %q: %v", m[2], err)
			}
			if m[1] == "processed" {
				processed += int64(v)
			} else {
				other += int64(v)
			}
		}
	}
	return processed, other
}

// TestAttackSyncAndWebhooksRaceOnThreeReplicas: three replicas on one
// database, each running the background catch-up every second, while an
// operator asks for more syncs on any of them. Stripe's event list holds
// the successes, refunds and chargebacks of many payments, some listed
// before the successes they follow (Stripe showing those late); each event
// is also delivered by webhook, or not at all, once or twice, in any order,
// to any replica. Stripe answers listings, PaymentIntent and Checkout
// Session lookups slowly and often 503; half of the buyers' sessions are
// paid at Stripe, so the pending-payment sync confirms them as well. In the
// end every payment is credited once and taken back once, every event is
// processed and counted processed exactly once across the replicas, and the
// books verify.
func TestAttackSyncAndWebhooksRaceOnThreeReplicas(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	fs := newFlakyStripe(fake)
	env := syncEnv(t, fake.URL())
	env["TALLY_STRIPE_SYNC_INTERVAL"] = "1s"
	env["TALLY_STRIPE_EVENT_RETRY_INTERVAL"] = "1s"
	env["TALLY_STRIPE_EVENT_LEASE"] = "2s"
	env["TALLY_DB_MAX_OPEN_CONNS"] = "8"
	servers := []*server{startServer(t, env), startServer(t, maps.Clone(env)), startServer(t, maps.Clone(env))}
	s := servers[0]
	gdb := openDB(t, s)

	const n = 24
	type buy struct {
		pay, customer string
		disputed      bool
		events        []string
	}
	buys := make([]*buy, n)
	for i := range buys {
		b := &buy{customer: fmt.Sprintf("race-%d", i), disputed: i%3 == 0}
		b.pay = checkout(t, s, b.customer, "starter", 1)
		fs.name(b.pay, b.customer)
		buys[i] = b
	}

	var delivered, copies atomic.Int64
	post := func(srv *server, body []byte) {
		status, out := postWebhook(t, srv, body, sign(body, testWebhookSecret, time.Now()))
		if status != http.StatusOK {
			t.Errorf("delivery: %d %s", status, out)
		}
	}
	// deliver sends body by webhook with probability 3/4, a second copy to
	// another replica with probability 1/3, after up to two seconds.
	deliverMaybe := func(wg *sync.WaitGroup, body []byte) {
		if rand.IntN(4) == 0 {
			return // only a catch-up finds it
		}
		first := rand.IntN(3)
		for c := range 1 + min(1, rand.IntN(3)/2) {
			wg.Add(1)
			go func() {
				defer wg.Done()
				time.Sleep(time.Duration(rand.IntN(2000)) * time.Millisecond)
				post(servers[(first+c)%3], body)
				if c == 0 {
					delivered.Add(1)
				} else {
					copies.Add(1)
				}
			}()
		}
	}

	stop := make(chan struct{})
	var syncs sync.WaitGroup
	var syncAnswers sync.Map
	syncs.Add(1)
	go func() {
		defer syncs.Done()
		for {
			select {
			case <-stop:
				return
			case <-time.After(time.Duration(100+rand.IntN(300)) * time.Millisecond):
			}
			r, err := servers[rand.IntN(3)].admin(t).SyncStripeWithResponse(context.Background(), client.StripeSyncRequest{})
			if err != nil {
				t.Errorf("sync: %v", err)
				return
			}
			v, _ := syncAnswers.LoadOrStore(r.StatusCode(), &atomic.Int64{})
			v.(*atomic.Int64).Add(1)
		}
	}()

	var wg sync.WaitGroup
	var mu sync.Mutex
	for i, b := range buys {
		wg.Add(1)
		go func() {
			defer wg.Done()
			time.Sleep(time.Duration(rand.IntN(4000)) * time.Millisecond)
			p := getPayment(t, s, b.pay)
			created := time.Now()
			cs, ok, back := newEventID(), newEventID(), newEventID()
			csObj := checkoutSession(b.pay, b.customer, *p.CheckoutSessionId, "complete", "paid", starterAmount)
			okObj := paymentIntent(b.pay, b.customer, "succeeded", starterAmount, starterAmount, "usd")
			backType, backObj := "charge.refunded", refundedCharge(b.pay, starterAmount, starterAmount)
			if b.disputed {
				backType, backObj = "charge.dispute.created", dispute(b.pay, "dp_"+strings.TrimPrefix(b.pay, "pay_"), "needs_response", starterAmount)
			}
			mu.Lock()
			b.events = []string{cs, ok, back}
			mu.Unlock()
			successes := func() {
				if i%2 == 0 {
					paidAtStripe(t, fake, s, b.pay) // the pending sync finds it paid
				}
				deliverMaybe(&wg, fs.add(cs, "checkout.session.completed", created, csObj))
				deliverMaybe(&wg, fs.add(ok, "payment_intent.succeeded", created, okObj))
			}
			if i%4 < 2 {
				// Stripe lists the take-back first, the successes (created
				// before it) a moment later.
				deliverMaybe(&wg, fs.add(back, backType, created.Add(time.Second), backObj))
				time.Sleep(time.Duration(rand.IntN(1500)) * time.Millisecond)
				successes()
			} else {
				successes()
				time.Sleep(time.Duration(rand.IntN(1000)) * time.Millisecond)
				deliverMaybe(&wg, fs.add(back, backType, created.Add(time.Second), backObj))
			}
		}()
	}
	wg.Wait()
	time.Sleep(time.Second)
	fs.flaky.Store(false)
	close(stop)
	syncs.Wait()

	states := func() map[string]int {
		counts := map[string]int{}
		for _, b := range buys {
			for _, id := range b.events {
				var st []string
				if err := gdb.Raw(`SELECT status FROM stripe_events WHERE id = ?`, id).Scan(&st).Error; err != nil {
					t.Fatal(err)
				}
				if len(st) == 0 {
					counts["missing"]++
				} else {
					counts[st[0]]++
				}
			}
		}
		return counts
	}
	waitForWithin(t, "every event stored and processed", 40*time.Second, func() bool { return states()["processed"] == 3*n })
	for _, b := range buys {
		p := getPayment(t, s, b.pay)
		switch {
		case b.disputed && (p.Status != client.PaymentStatusDisputed || p.AmountDisputed != starterAmount):
			t.Errorf("disputed %s: %s disputed %d", b.pay, p.Status, p.AmountDisputed)
		case !b.disputed && (p.Status != client.PaymentStatusRefunded || p.AmountRefunded != starterAmount):
			t.Errorf("refunded %s: %s refunded %d", b.pay, p.Status, p.AmountRefunded)
		}
		if got := balanceOf(t, gdb, b.customer); got != 0 {
			t.Errorf("balance of %s = %d, want 0", b.customer, got)
		}
		for _, typ := range []string{"credits.granted", "credits.revoked", "payment.succeeded"} {
			if c := countRows(t, gdb, `SELECT count(*) FROM events WHERE customer_id = ? AND type = ?`, b.customer, typ); c != 1 {
				t.Errorf("%s: %d %s, want 1", b.customer, c, typ)
			}
		}
		if c := countRows(t, gdb, `SELECT count(*) FROM credit_grants WHERE payment_id = ?`, b.pay); c != 1 {
			t.Errorf("%s: %d grants, want 1", b.pay, c)
		}
	}
	processed, other := processedCounted(t, servers)
	if processed != 3*n {
		t.Errorf("the replicas counted %d events processed (tally_stripe_events_total), want %d: each once", processed, 3*n)
	}
	bySource := map[string]int{}
	rows, err := gdb.Raw(`SELECT source, count(*) FROM stripe_events GROUP BY source`).Rows()
	if err != nil {
		t.Fatal(err)
	}
	for rows.Next() {
		var src string
		var c int
		if err := rows.Scan(&src, &c); err != nil {
			t.Fatal(err)
		}
		bySource[src] = c
	}
	rows.Close()
	answers := map[int]int64{}
	syncAnswers.Range(func(k, v any) bool { answers[k.(int)] = v.(*atomic.Int64).Load(); return true })
	bySync := countRows(t, gdb, `SELECT count(*) FROM payments WHERE confirmed_by = 'sync'`)
	t.Logf("%d payments (%d disputed), %d events (%v by source), %d delivered by webhook (+%d copies); operator syncs answered %v; "+
		"%d payments confirmed by the pending sync; Stripe asked for PaymentIntents %d times (%d 503), listed %d times (%d 503), %d session lookups 503; "+
		"counted %d processed, %d other outcomes",
		n, (n+2)/3, 3*n, bySource, delivered.Load(), copies.Load(), answers, bySync,
		fs.asked["pi"].Load(), fs.asked["pi503"].Load(), fs.asked["list"].Load(), fs.asked["list503"].Load(), fs.asked["session503"].Load(),
		processed, other)
	receivablesOverHTTP(t, s)
	assertInvariants(t, s)
}
