package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tallybilling/tally/internal/stripeapi/stripefake"
	"github.com/tallybilling/tally/pkg/client"
)

// backlogStripe serves GET /v1/events on a fake Stripe from events a test
// adds (newest first, paged by starting_after, filtered by created[gte], as
// Stripe lists), and GET /v1/payment_intents/{id} of the PaymentIntents a
// test names (with tally's metadata, succeeded).
type backlogStripe struct {
	mu       sync.Mutex
	events   []map[string]any // oldest first
	index    map[string]int
	metadata map[string]string
	listings int
}

func newBacklogStripe(fake *stripefake.Fake) *backlogStripe {
	b := &backlogStripe{index: map[string]int{}, metadata: map[string]string{}}
	fake.SetFault(func(r *http.Request) (int, string, bool) {
		if r.Method != http.MethodGet {
			return 0, "", false
		}
		b.mu.Lock()
		defer b.mu.Unlock()
		if id, ok := strings.CutPrefix(r.URL.Path, "/v1/payment_intents/"); ok {
			md, ok := b.metadata[id]
			if !ok {
				return 0, "", false
			}
			return http.StatusOK, fmt.Sprintf(`{"id":%q,"object":"payment_intent","status":"succeeded","amount":%d,"amount_received":%d,"currency":"usd","livemode":false,"metadata":%s}`,
				id, starterAmount, starterAmount, md), true
		}
		if r.URL.Path != "/v1/events" {
			return 0, "", false
		}
		b.listings++
		q := r.URL.Query()
		limit, _ := strconv.Atoi(q.Get("limit"))
		gte, _ := strconv.ParseInt(q.Get("created[gte]"), 10, 64)
		start := len(b.events) - 1
		if after := q.Get("starting_after"); after != "" {
			start = b.index[after] - 1
		}
		var data []map[string]any
		i := start
		for ; i >= 0 && len(data) < limit; i-- {
			if b.events[i]["created"].(int64) < gte {
				i = -1
				break
			}
			data = append(data, b.events[i])
		}
		more := i >= 0 && b.events[i]["created"].(int64) >= gte
		body, _ := json.Marshal(map[string]any{"object": "list", "url": "/v1/events", "has_more": more, "data": data})
		return http.StatusOK, string(body), true
	})
	return b
}

// add puts an event Stripe created at created into the list (kept in
// creation order) and returns its webhook body.
func (b *backlogStripe) add(id, typ string, created time.Time, object map[string]any) []byte {
	ev := map[string]any{"id": id, "object": "event", "type": typ, "created": created.Unix(), "livemode": false,
		"api_version": "2025-03-31.basil", "pending_webhooks": 1, "data": map[string]any{"object": object}}
	b.mu.Lock()
	defer b.mu.Unlock()
	// After the events created at the same second, as Stripe lists them;
	// only the ones after it move. (Sorting and indexing the whole list on
	// every add took this test's first two minutes under the race
	// detector: the filler comes 10,050 times, each at the end.)
	at := sort.Search(len(b.events), func(i int) bool { return b.events[i]["created"].(int64) > created.Unix() })
	b.events = slices.Insert(b.events, at, ev)
	for i := at; i < len(b.events); i++ {
		b.index[b.events[i]["id"].(string)] = i
	}
	body, _ := json.Marshal(ev)
	return body
}

func (b *backlogStripe) name(pay, customer string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.metadata[piID(pay)] = fmt.Sprintf(`{"tally_payment_id":%q,"tally_customer_id":%q}`, pay, customer)
}

// more than 10,000 events pending in Stripe's list, with a
// refund of the oldest payment (credited by webhook, then spent) at the
// very oldest end, and successes and refunds of payments whose webhooks
// were dropped. Two replicas on one database run the background sync every
// second and on-demand syncs while late webhooks of the same events
// arrive. Every payment is credited once, every refund taken back once.
func TestSyncBacklogOfTenThousandOnTwoReplicas(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	bs := newBacklogStripe(fake)
	env := syncEnv(t, fake.URL())
	env["TALLY_STRIPE_SYNC_INTERVAL"] = "1s"
	a, b := twoServers(t, env)
	gdb := openDB(t, a)

	// The oldest payment: credited by its webhook, 600 of its 1000 spent.
	p0 := checkout(t, a, "h71-oldest", "starter", 1)
	paidAtStripe(t, fake, a, p0)
	bs.name(p0, "h71-oldest")
	deliver(t, a, stripeEvent(newEventID(), "payment_intent.succeeded", paymentIntent(p0, "h71-oldest", "succeeded", starterAmount, starterAmount, "usd")))
	consumeOverHTTP(t, a, "h71-oldest", 600)

	base := time.Now().Add(-47 * time.Hour)
	// At the very oldest end: p0's full refund, its webhook dropped.
	bs.add("evt_h71_refund_p0", "charge.refunded", base, refundedCharge(p0, starterAmount, starterAmount))

	// Ten payments paid at Stripe whose webhooks were dropped; the first
	// three refunded 400 right after.
	var pays []string
	late := map[string][]byte{}
	for i := range 10 {
		cust := fmt.Sprintf("h71-c%d", i)
		pay := checkout(t, a, cust, "starter", 1)
		paidAtStripe(t, fake, a, pay)
		bs.name(pay, cust)
		pays = append(pays, pay)
		late[pay] = bs.add(fmt.Sprintf("evt_h71_succ_%d", i), "payment_intent.succeeded", base.Add(time.Duration(1+i)*time.Second),
			paymentIntent(pay, cust, "succeeded", starterAmount, starterAmount, "usd"))
		if i < 3 {
			bs.add(fmt.Sprintf("evt_h71_ref_%d", i), "charge.refunded", base.Add(time.Duration(20+i)*time.Second), refundedCharge(pay, starterAmount, 400))
		}
	}
	// 10,050 events of other integrations after them.
	const filler = 10_050
	for i := range filler {
		bs.add(fmt.Sprintf("evt_h71_fill_%05d", i), "invoice.finalized", base.Add(time.Minute+time.Duration(i)*10*time.Second),
			map[string]any{"id": fmt.Sprintf("in_h71_%05d", i), "object": "invoice", "status": "open", "livemode": false, "metadata": map[string]string{}})
	}
	total := int64(1 + 10 + 3 + filler)

	// Both replicas' background syncs are running; on-demand syncs and
	// the late webhooks of half the successes race them.
	var wg sync.WaitGroup
	for _, s := range []*server{a, b} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 3 {
				r, err := s.admin(t).SyncStripeWithResponse(context.Background(), client.StripeSyncRequest{})
				if err != nil {
					t.Error(err)
					return
				}
				t.Logf("on-demand sync: %d %s", r.StatusCode(), strings.TrimSpace(string(r.Body)))
				time.Sleep(500 * time.Millisecond)
			}
		}()
	}
	for i, pay := range pays[:5] {
		s := []*server{a, b}[i%2]
		wg.Add(1)
		go func() {
			defer wg.Done()
			time.Sleep(time.Duration(i) * 700 * time.Millisecond)
			body := late[pay]
			status, out := postWebhook(t, s, body, sign(body, testWebhookSecret, time.Now()))
			if status != http.StatusOK {
				t.Errorf("late webhook of %s: %d %s", pay, status, out)
			}
		}()
	}
	wg.Wait()
	// 32 s alone on a slow machine (2 vCPUs, PostgreSQL's primary-key
	// SELECT at 30,000 a second), near 5 minutes beside the rest of the
	// suite under the race detector.
	waitForWithin(t, "every listed event stored and settled", 8*time.Minute, func() bool {
		return countRows(t, gdb, `SELECT count(*) FROM stripe_events WHERE (id LIKE 'evt_h71_%') AND status IN ('processed','ignored')`) == total
	})
	for i, pay := range pays {
		want := client.PaymentStatusSucceeded
		if i < 3 {
			want = client.PaymentStatusRefunded
		}
		waitPayment(t, a, pay, want)
	}
	if n := countRows(t, gdb, `SELECT count(*) FROM stripe_events WHERE id LIKE 'evt_h71_%' AND status NOT IN ('processed','ignored')`); n != 0 {
		t.Fatalf("%d listed events not settled", n)
	}
	// Late deliveries after the sync applied everything: the same events
	// again, and the same successes and refunds under new event ids (a
	// checkout.session.completed too), to both replicas at once.
	var late2 sync.WaitGroup
	for i, pay := range pays {
		cust := fmt.Sprintf("h71-c%d", i)
		p := getPayment(t, a, pay)
		bodies := [][]byte{late[pay],
			stripeEvent(newEventID(), "payment_intent.succeeded", paymentIntent(pay, cust, "succeeded", starterAmount, starterAmount, "usd")),
			stripeEvent(newEventID(), "checkout.session.completed", checkoutSession(pay, cust, *p.CheckoutSessionId, "complete", "paid", starterAmount))}
		if i < 3 {
			bodies = append(bodies, stripeEvent(newEventID(), "charge.refunded", refundedCharge(pay, starterAmount, 400)))
		}
		bodies = append(bodies, stripeEvent(newEventID(), "charge.refunded", refundedCharge(p0, starterAmount, starterAmount)))
		for j, body := range bodies {
			late2.Add(1)
			go func() {
				defer late2.Done()
				s := []*server{a, b}[(i+j)%2]
				if status, out := postWebhook(t, s, body, sign(body, testWebhookSecret, time.Now())); status != http.StatusOK {
					t.Errorf("late redelivery to %s: %d %s", pay, status, out)
				}
			}()
		}
	}
	late2.Wait()
	waitForWithin(t, "the late redeliveries settled", time.Minute, func() bool {
		return countRows(t, gdb, `SELECT count(*) FROM stripe_events WHERE status NOT IN ('processed','ignored')`) == 0
	})
	// Every succeeded payment has exactly one purchase grant of its
	// credits; every refund was applied once.
	if n := countRows(t, gdb, `SELECT count(*) FROM payments p WHERE p.status IN ('succeeded','refunded','disputed','dispute_lost')
		AND (SELECT count(*) FROM credit_grants g WHERE g.payment_id = p.id AND g.source = 'purchase' AND g.amount = p.credits) <> 1`); n != 0 {
		t.Fatalf("%d succeeded payments without exactly one purchase grant of their credits", n)
	}
	if n := countRows(t, gdb, `SELECT count(*) FROM credit_grants WHERE source = 'purchase'`); n != 11 {
		t.Fatalf("%d purchase grants, want 11", n)
	}
	if n := countRows(t, gdb, `SELECT count(*) FROM payment_refunds`); n != 4 {
		t.Fatalf("%d refunds applied, want 4", n)
	}
	if n := countRows(t, gdb, `SELECT coalesce(sum(credits_revoked),0) FROM payment_refunds`); n != 400+3*400 { // p0: the 400 left; the 600 spent is owed
		t.Fatalf("%d credits revoked, want %d", n, 400+3*400)
	}
	if bal := balanceOf(t, gdb, "h71-oldest"); bal != 0 {
		t.Fatalf("the oldest payment's customer has %d credits after its full refund, want 0", bal)
	}
	for i, pay := range pays {
		want := int64(starterCredits)
		if i < 3 {
			want -= 400
		}
		if bal := balanceOf(t, gdb, fmt.Sprintf("h71-c%d", i)); bal != want {
			t.Fatalf("customer of %s has %d credits, want %d", pay, bal, want)
		}
	}
	owed, body := receivablesOverHTTP(t, a)
	if owed["h71-oldest"] != 600 {
		t.Fatalf("the oldest customer owes %d, want the 600 spent of the refunded payment\n%s", owed["h71-oldest"], body)
	}
	bs.mu.Lock()
	t.Logf("listings (pages) served: %d", bs.listings)
	bs.mu.Unlock()
	t.Logf("sync runs: %s", grepLines(metrics(t, a), "tally_stripe_sync_runs_total{"))
	assertInvariants(t, a)
}

// Stripe's clock two hours behind tally's (equally: tally's
// ahead). Every webhook is refused (its signature's timestamp is outside
// the tolerance), so only the sync can credit a payment; a payment paid
// after one sync completed must still be found by the next default one.
// Before, the next window started an hour before tally's clock at the last
// sync, an hour after the payment by Stripe's clock: it was never listed.
func TestSyncWithStripesClockBehindTallysLosesNoEvent(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	bs := newBacklogStripe(fake)
	env := syncEnv(t, fake.URL())
	env["TALLY_PENDING_CHECK_AFTER"] = "24h" // only the listing may find it
	s := startServer(t, env)
	gdb := openDB(t, s)
	const skew = 2 * time.Hour
	stripeNow := func() time.Time { return time.Now().Add(-skew) }

	first := checkout(t, s, "h71-skew1", "starter", 1)
	paidAtStripe(t, fake, s, first)
	bs.name(first, "h71-skew1")
	body := bs.add("evt_h71_skew_1", "payment_intent.succeeded", stripeNow(), paymentIntent(first, "h71-skew1", "succeeded", starterAmount, starterAmount, "usd"))
	// Stripe signs with its own clock: refused.
	if st, out := postWebhook(t, s, body, sign(body, testWebhookSecret, stripeNow())); st != http.StatusBadRequest {
		t.Fatalf("a webhook signed two hours ago: %d %s, want 400", st, out)
	}
	if res := stripeSync(t, s, nil); res.EventsNew != 1 {
		t.Fatalf("first sync %+v, want the one event", res)
	}
	waitPayment(t, s, first, client.PaymentStatusSucceeded)

	// Five minutes later by Stripe's clock, the next payment.
	second := checkout(t, s, "h71-skew2", "starter", 1)
	paidAtStripe(t, fake, s, second)
	bs.name(second, "h71-skew2")
	bs.add("evt_h71_skew_2", "payment_intent.succeeded", stripeNow().Add(5*time.Minute), paymentIntent(second, "h71-skew2", "succeeded", starterAmount, starterAmount, "usd"))
	// And the first is refunded: no pending payment's lookup can find
	// that, only the listing.
	bs.add("evt_h71_skew_refund", "charge.refunded", stripeNow().Add(6*time.Minute), refundedCharge(first, starterAmount, starterAmount))
	res := stripeSync(t, s, nil)
	if n := countRows(t, gdb, `SELECT count(*) FROM payment_refunds WHERE payment_id = ?`, first); n != 1 {
		t.Fatalf("the next default sync (%+v) applied %d refunds of %s, want 1: the refund Stripe created six minutes after the first sync was never listed", res, n, first)
	}
	if p := getPayment(t, s, second); p.Status != client.PaymentStatusSucceeded {
		t.Fatalf("the next default sync (%+v) left %s %s: the event Stripe created five minutes after the first was never listed", res, second, p.Status)
	}
	if n := countRows(t, gdb, `SELECT count(*) FROM credit_grants WHERE source = 'purchase'`); n != 2 {
		t.Fatalf("%d purchase grants, want 2", n)
	}
	assertInvariants(t, s)
}
