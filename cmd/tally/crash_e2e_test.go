package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net/http"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/stripeapi/stripefake"
	"github.com/tallybilling/tally/pkg/client"
)

// The shape of the storm in TestCrashMidStormThenRestart.
const (
	crashPayments       = 40  // pending credit-pack payments, one customer each
	crashCopies         = 4   // deliveries of each Stripe event during the storm
	crashWebhookWorkers = 32  // goroutines delivering webhooks
	crashBatches        = 15  // usage batches (each with its own Idempotency-Key)
	crashBatchSize      = 200 // usage events per batch: 3000 in all
	crashUsagePosters   = 3   // goroutines posting usage batches
	crashStripeHang     = 400 * time.Millisecond
	// The leases, short so a takeover comes within seconds: a stored
	// Stripe event's (TALLY_STRIPE_EVENT_LEASE), and a usage claim's, which
	// is 2.5 send timeouts (TALLY_METER_SEND_TIMEOUT, longer than the
	// hang) plus the batch's time at the rate limit.
	crashEventLease  = 2 * time.Second
	crashSendTimeout = time.Second
	// crashRecoveryWithin bounds the wait after the restart: a claim the
	// dead process held is taken over only when its lease runs out, and
	// the backlog drains at the rate limit. About 15 s on a quiet machine;
	// the bound leaves room for a loaded one.
	crashRecoveryWithin = 2 * time.Minute
)

// tallyChild is the real tally binary running as a child process, so it can be
// killed with SIGKILL: no deferred function, no graceful shutdown runs.
type tallyChild struct {
	URL  string
	cmd  *exec.Cmd
	logs *syncBuffer
	done chan struct{} // closed once the process has exited
	err  error         // cmd.Wait's result, set before done closes
}

// buildTally compiles ./cmd/tally (without -race) into a fresh directory.
func buildTally(t *testing.T) string {
	t.Helper()
	skipShort(t)
	bin := filepath.Join(t.TempDir(), "tally")
	cmd := exec.Command("go", "build", "-o", bin, "./cmd/tally")
	cmd.Dir = repoFile(".")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build ./cmd/tally: %v\n%s", err, out)
	}
	return bin
}

// startChild runs `tally serve` from bin with exactly env (nothing of the
// test's own environment), reads the address it bound from its start line
// (env's TALLY_HTTP_ADDR may name port 0) and waits until /healthz answers.
// The process is killed at cleanup whatever happened.
func startChild(t *testing.T, bin string, env map[string]string) *tallyChild {
	t.Helper()
	c := &tallyChild{logs: &syncBuffer{}, done: make(chan struct{})}
	c.cmd = exec.Command(bin, "serve")
	for k, v := range env {
		c.cmd.Env = append(c.cmd.Env, k+"="+v)
	}
	// The start line is logged at info.
	c.cmd.Env = append(c.cmd.Env, "TALLY_LOG_LEVEL=info")
	c.cmd.Stdout, c.cmd.Stderr = c.logs, c.logs
	if err := c.cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", bin, err)
	}
	go func() {
		c.err = c.cmd.Wait()
		close(c.done)
	}()
	t.Cleanup(c.kill)
	deadline := time.Now().Add(patience)
	for {
		if c.URL == "" {
			c.URL = startedAt(c.logs.String())
		}
		if c.URL != "" {
			resp, err := http.Get(c.URL + "/healthz")
			if err == nil {
				resp.Body.Close()
				if resp.StatusCode == http.StatusOK {
					return c
				}
			}
		}
		select {
		case <-c.done:
			t.Fatalf("tally serve exited before it was healthy: %v\n%s", c.err, c.tail(50))
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("tally serve did not become healthy within %s\n%s", patience, c.tail(50))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// startedAt is the base URL in serve's "tally starting" log line, "" until
// it is written.
func startedAt(logs string) string {
	for line := range strings.Lines(logs) {
		var l struct {
			Msg  string `json:"msg"`
			Addr string `json:"addr"`
		}
		if json.Unmarshal([]byte(line), &l) == nil && l.Msg == "tally starting" && l.Addr != "" {
			return "http://" + l.Addr
		}
	}
	return ""
}

// kill sends SIGKILL (when the process still runs) and waits for its exit.
func (c *tallyChild) kill() {
	select {
	case <-c.done:
		return
	default:
	}
	_ = c.cmd.Process.Kill()
	<-c.done
}

// tail is the last n lines of the child's output, leaving out the access
// log, whose lines would otherwise crowd out the warnings and errors.
func (c *tallyChild) tail(n int) string {
	var kept []string
	omitted := 0
	for line := range strings.Lines(c.logs.String()) {
		if strings.Contains(line, `"msg":"request"`) {
			omitted++
			continue
		}
		kept = append(kept, strings.TrimRight(line, "\n"))
	}
	if len(kept) > n {
		kept = kept[len(kept)-n:]
	}
	return fmt.Sprintf("(%d access log lines left out)\n%s", omitted, strings.Join(kept, "\n"))
}

// crashRun carries what the failure message of TestCrashMidStormThenRestart
// shows: the output of each child, killed or restarted.
type crashRun struct {
	t        *testing.T
	children []*tallyChild
}

func (r *crashRun) fatalf(format string, args ...any) {
	r.t.Helper()
	msg := fmt.Sprintf(format, args...)
	for i, c := range r.children {
		msg += fmt.Sprintf("\n--- output of tally child %d (last 50 lines besides the access log) ---\n%s", i+1, c.tail(50))
	}
	r.t.Fatal(msg)
}

// crashPost POSTs body to baseURL's webhook endpoint, freshly signed as
// each of Stripe's (re)deliveries is. Errors caused by the kill are
// expected, so hc is a plain client rather than pkg/client.
func crashPost(hc *http.Client, baseURL string, body []byte) (int, error) {
	req, err := http.NewRequest(http.MethodPost, baseURL+"/webhooks/stripe", bytes.NewReader(body))
	if err != nil {
		return 0, err
	}
	req.Header.Set("Content-Type", "application/json; charset=utf-8")
	req.Header.Set("Stripe-Signature", sign(body, testWebhookSecret, time.Now()))
	resp, err := hc.Do(req)
	if err != nil {
		return 0, err
	}
	resp.Body.Close()
	return resp.StatusCode, nil
}

type crashEvent struct {
	id   string
	body []byte
}

func crashStatusCounts(t testing.TB, gdb *gorm.DB, table string) map[string]int64 {
	t.Helper()
	var rows []struct {
		Status string
		N      int64
	}
	if err := gdb.Raw(`SELECT status, count(*) AS n FROM ` + table + ` GROUP BY status`).Scan(&rows).Error; err != nil {
		t.Fatalf("count %s by status: %v", table, err)
	}
	out := map[string]int64{}
	for _, r := range rows {
		out[r.Status] = r.N
	}
	return out
}

// The worst day (docs/guarantees.md, "Nothing lost"): the process is killed (SIGKILL) in the middle
// of a webhook storm and a usage backlog, then restarted on the same
// database. After Stripe's redelivery and the client's retries, every
// payment is credited exactly once, every acknowledged Stripe event is
// processed, and every accepted usage event reaches Stripe exactly once
// under its own identifier.
//
// What the dead process had claimed comes back only when its lease runs
// out. The leases are configured short (crashEventLease, crashSendTimeout)
// rather than shortened by rewriting due times in the database, which would
// skip the very takeover this test is about.
func TestCrashMidStormThenRestart(t *testing.T) {
	t.Parallel()
	started := time.Now()
	bin := buildTally(t)
	t.Logf("built the binary in %s", time.Since(started).Round(time.Millisecond))
	ctx := context.Background()

	fake := stripefake.New(t)
	env := baseEnv(t)
	env["TALLY_STRIPE_API_URL"] = fake.URL()
	env["TALLY_STRIPE_METER_EVENTS_URL"] = fake.URL()
	env["TALLY_STRIPE_EVENT_RETRY_INTERVAL"] = "100ms"
	env["TALLY_STRIPE_EVENT_LEASE"] = crashEventLease.String()
	env["TALLY_METER_SEND_TIMEOUT"] = crashSendTimeout.String()
	env["TALLY_METER_POLL_INTERVAL"] = "50ms"
	env["TALLY_METER_RATE_LIMIT"] = "1000"
	env["TALLY_METER_BATCH_SIZE"] = "200"
	env["TALLY_DB_MAX_OPEN_CONNS"] = "10"
	env["TALLY_LOG_LEVEL"] = "info" // for the failure message

	hc := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: 64}}
	t.Cleanup(hc.CloseIdleConnections)
	run := &crashRun{t: t}
	first := startChild(t, bin, env)
	run.children = append(run.children, first)
	srv := &server{URL: first.URL, DBURL: env["TALLY_DATABASE_URL"], env: env}
	gdb := openDB(t, srv)

	// Setup: pending payments through the real checkout against the fake,
	// which also links each customer to a Stripe customer.
	customers := make([]string, crashPayments)
	payments := make([]string, crashPayments)
	stripeIDs := make([]string, crashPayments)
	var events []crashEvent
	for i := range crashPayments {
		customers[i] = fmt.Sprintf("crash-buyer-%02d", i)
		payments[i] = checkout(t, srv, customers[i], "starter", 1)
		pay := payments[i]
		c, err := srv.service(t).GetCustomerWithResponse(ctx, customers[i])
		if err != nil {
			run.fatalf("get customer: %v", err)
		}
		mustStatus(t, "get customer", c.StatusCode(), c.Body, http.StatusOK)
		if c.JSON200.StripeCustomerId == nil {
			run.fatalf("customer %s is not linked to a Stripe customer after checkout", customers[i])
		}
		stripeIDs[i] = *c.JSON200.StripeCustomerId
		p := getPayment(t, srv, pay)
		if p.Status != client.PaymentStatusPending || p.CheckoutSessionId == nil {
			run.fatalf("payment before the storm = %+v", p)
		}
		paidAtStripe(t, fake, srv, pay)
		pi := paymentIntent(pay, customers[i], "succeeded", starterAmount, starterAmount, "usd")
		pi["customer"] = stripeIDs[i]
		cs := checkoutSession(pay, customers[i], *p.CheckoutSessionId, "complete", "paid", starterAmount)
		cs["customer"] = stripeIDs[i]
		piEvent, csEvent := newEventID(), newEventID()
		events = append(events,
			crashEvent{id: piEvent, body: stripeEvent(piEvent, "payment_intent.succeeded", pi)},
			crashEvent{id: csEvent, body: stripeEvent(csEvent, "checkout.session.completed", cs)})
	}

	// The usage backlog: batches with their own Idempotency-Key, so a retry
	// after the crash is the same request.
	type usageBatch struct {
		key    string
		body   client.UsageBatch
		posted atomic.Bool // answered 202
	}
	batches := make([]*usageBatch, crashBatches)
	wantTotal := map[string]float64{} // per Stripe customer
	stripeOf := map[string]string{}
	for i, c := range customers {
		stripeOf[c] = stripeIDs[i]
	}
	var identifiers []string
	for b := range crashBatches {
		ub := &usageBatch{key: fmt.Sprintf("crash-usage-batch-%02d", b)}
		for i := range crashBatchSize {
			id := fmt.Sprintf("crash-u-%02d-%03d", b, i)
			cust := customers[(b*crashBatchSize+i)%crashPayments]
			value := float64(1 + i%5)
			ub.body.Events = append(ub.body.Events, usageEvent(cust, id, value))
			wantTotal[stripeOf[cust]] += value
			identifiers = append(identifiers, id)
		}
		batches[b] = ub
	}

	// The storm: Stripe slow for meter events, every event delivered
	// crashCopies times from many goroutines, usage batches arriving.
	fake.SetHang(crashStripeHang)
	var deliveries []crashEvent
	for range crashCopies {
		deliveries = append(deliveries, events...)
	}
	rand.Shuffle(len(deliveries), func(i, j int) { deliveries[i], deliveries[j] = deliveries[j], deliveries[i] })
	var (
		mu             sync.Mutex
		ackedEvents    = map[string]bool{}
		webhookStatus  = map[int]int{}
		webhook2xx     atomic.Int64
		webhookErrors  atomic.Int64
		usageAccepted  atomic.Int64
		usageStatus    = map[int]int{}
		usageErrors    atomic.Int64
		killed         = make(chan struct{})
		stormWebhooks  sync.WaitGroup
		stormUsage     sync.WaitGroup
		deliveryQueue  = make(chan crashEvent, len(deliveries))
		usageTransport = srv.service(t)
	)
	for _, d := range deliveries {
		deliveryQueue <- d
	}
	close(deliveryQueue)
	for g := range crashUsagePosters {
		stormUsage.Go(func() {
			for b := g; b < len(batches); b += crashUsagePosters {
				select {
				case <-killed:
				case <-time.After(30*time.Millisecond + rand.N(90*time.Millisecond)):
				}
				ub := batches[b]
				r, err := usageTransport.IngestUsageEventsWithResponse(ctx, &client.IngestUsageEventsParams{IdempotencyKey: &ub.key}, ub.body)
				mu.Lock()
				switch {
				case err != nil:
					usageErrors.Add(1)
				case r.StatusCode() == http.StatusAccepted:
					ub.posted.Store(true)
					usageAccepted.Add(1)
				default:
					usageStatus[r.StatusCode()]++
				}
				mu.Unlock()
			}
		})
	}

	meterRequests := func() int {
		n := 0
		for _, r := range fake.Requests() {
			if r.Path == "/v1/billing/meter_events" {
				n++
			}
		}
		return n
	}
	// The webhooks start once the backlog exists and its delivery hangs.
	backlogBy := time.Now().Add(10 * time.Second)
	for usageAccepted.Load() < 1 || meterRequests() < 1 {
		if time.Now().After(backlogBy) {
			first.kill()
			close(killed)
			stormUsage.Wait()
			run.fatalf("no usage backlog in delivery within 10s: %d batches accepted, %d meter requests", usageAccepted.Load(), meterRequests())
		}
		time.Sleep(2 * time.Millisecond)
	}
	webhooksFrom := time.Now()
	for range crashWebhookWorkers {
		stormWebhooks.Go(func() {
			for d := range deliveryQueue {
				time.Sleep(rand.N(40 * time.Millisecond))
				st, err := crashPost(hc, first.URL, d.body)
				mu.Lock()
				switch {
				case err != nil:
					webhookErrors.Add(1)
				case st >= 200 && st < 300:
					webhook2xx.Add(1)
					ackedEvents[d.id] = true
				default:
					webhookStatus[st]++
				}
				mu.Unlock()
			}
		})
	}
	// Kill at a random point once part of the webhook storm was acknowledged.
	threshold := int64(len(deliveries)) * int64(10+rand.IntN(31)) / 100
	stormDone := make(chan struct{})
	go func() { stormWebhooks.Wait(); close(stormDone) }()
	for webhook2xx.Load() < threshold {
		select {
		case <-stormDone:
			first.kill()
			close(killed)
			stormUsage.Wait()
			run.fatalf("the storm ended before the kill point (%d of %d deliveries acknowledged, threshold %d): the test would prove nothing",
				webhook2xx.Load(), len(deliveries), threshold)
		case <-time.After(2 * time.Millisecond):
		}
	}
	time.Sleep(rand.N(30 * time.Millisecond))
	first.kill()
	close(killed)
	killedAt := time.Now()
	stormWebhooks.Wait()
	stormUsage.Wait()
	t.Logf("SIGKILL %s after start, %s into the webhook storm, at %d acknowledged deliveries (exit: %v)",
		killedAt.Sub(started).Round(time.Millisecond), killedAt.Sub(webhooksFrom).Round(time.Millisecond), threshold, first.err)

	mu.Lock()
	acked := len(ackedEvents)
	t.Logf("storm: %d webhook deliveries answered 2xx before the kill (%d of %d distinct events acknowledged), %d failed on the connection, other statuses %v",
		webhook2xx.Load(), acked, len(events), webhookErrors.Load(), webhookStatus)
	t.Logf("storm: %d of %d usage batches answered 202, %d failed on the connection, other statuses %v",
		usageAccepted.Load(), len(batches), usageErrors.Load(), usageStatus)
	for st := range webhookStatus {
		if st >= 400 && st < 500 {
			mu.Unlock()
			run.fatalf("a correctly signed delivery was refused with %d during the storm: %v", st, webhookStatus)
		}
	}
	mu.Unlock()
	if acked == len(events) && webhook2xx.Load() == int64(len(deliveries)) {
		run.fatalf("every delivery was acknowledged before the kill: the kill came too late")
	}

	// What the dead process left behind.
	se := crashStatusCounts(t, gdb, "stripe_events")
	ue := crashStatusCounts(t, gdb, "usage_events")
	claimed := countRows(t, gdb, `SELECT count(*) FROM usage_events WHERE status = 'pending' AND claimed_by IS NOT NULL`)
	succeeded := countRows(t, gdb, `SELECT count(*) FROM payments WHERE status = 'succeeded'`)
	t.Logf("at the kill: stripe_events by status %v; usage_events by status %v (backlog %d pending, %d of them claimed by the dead process); %d of %d payments succeeded",
		se, ue, ue["pending"], claimed, succeeded, crashPayments)
	// The slow Stripe still answers the requests the dead process sent.
	time.Sleep(crashStripeHang + 200*time.Millisecond)
	fake.SetHang(0)
	var atStripe []string
	for _, ev := range fake.MeterEvents() {
		atStripe = append(atStripe, ev.Identifier)
	}
	unrecorded := int64(0)
	if len(atStripe) > 0 {
		unrecorded = countRows(t, gdb, `SELECT count(*) FROM usage_events WHERE identifier IN ? AND status <> 'delivered'`, atStripe)
	}
	t.Logf("Stripe accepted %d meter events from the dead process; %d of them it never recorded as delivered", len(atStripe), unrecorded)

	// Restart the same binary on the same database.
	env2 := map[string]string{}
	for k, v := range env {
		env2[k] = v
	}
	second := startChild(t, bin, env2)
	run.children = append(run.children, second)
	srv2 := &server{URL: second.URL, DBURL: env2["TALLY_DATABASE_URL"], env: env2}
	t.Logf("restarted %s after the kill", time.Since(killedAt).Round(time.Millisecond))

	// Stripe redelivers (every event: the strict version of "until it got
	// a 2xx"), and the client retries the batches it got no 202 for.
	redeliver := make(chan crashEvent, len(events))
	for _, ev := range events {
		redeliver <- ev
	}
	close(redeliver)
	var redeliveryFailures []string
	var wg sync.WaitGroup
	for range 16 {
		wg.Go(func() {
			for ev := range redeliver {
				st, err := crashPost(hc, second.URL, ev.body)
				if err != nil || st != http.StatusOK {
					mu.Lock()
					redeliveryFailures = append(redeliveryFailures, fmt.Sprintf("%s: %d %v", ev.id, st, err))
					mu.Unlock()
				}
			}
		})
	}
	wg.Wait()
	if len(redeliveryFailures) > 0 {
		run.fatalf("redeliveries after the restart were not acknowledged: %v", redeliveryFailures)
	}
	reposted := 0
	for _, ub := range batches {
		if ub.posted.Load() {
			continue
		}
		reposted++
		r, err := srv2.service(t).IngestUsageEventsWithResponse(ctx, &client.IngestUsageEventsParams{IdempotencyKey: &ub.key}, ub.body)
		if err != nil {
			run.fatalf("re-post %s: %v", ub.key, err)
		}
		if r.StatusCode() != http.StatusAccepted {
			run.fatalf("re-post %s: status %d, want 202; body %s", ub.key, r.StatusCode(), r.Body)
		}
		if r.JSON202.Accepted != crashBatchSize {
			run.fatalf("re-post %s answered %d accepted, %d duplicates, %d rejected; want all %d accepted (a replay of the first answer, or a first commit)",
				ub.key, r.JSON202.Accepted, r.JSON202.Duplicates, r.JSON202.Rejected, crashBatchSize)
		}
	}
	t.Logf("redelivered %d Stripe events, re-posted %d usage batches", len(events), reposted)

	// Recovery: the leases the dead process held run out and the workers
	// of the restarted one take over.
	deadline := killedAt.Add(crashRecoveryWithin)
	for {
		se = crashStatusCounts(t, gdb, "stripe_events")
		ue = crashStatusCounts(t, gdb, "usage_events")
		if se["processed"] == int64(len(events)) && ue["delivered"] == int64(len(identifiers)) {
			break
		}
		select {
		case <-second.done:
			run.fatalf("the restarted tally exited: %v", second.err)
		default:
		}
		if time.Now().After(deadline) {
			run.fatalf("not recovered %s after the kill: stripe_events by status %v (want %d processed), usage_events by status %v (want %d delivered)",
				crashRecoveryWithin, se, len(events), ue, len(identifiers))
		}
		time.Sleep(250 * time.Millisecond)
	}
	t.Logf("recovered %s after the kill", time.Since(killedAt).Round(time.Millisecond))

	// Invariants 1-3 (balances, one grant per succeeded payment, one entry
	// per consume key), by the operator's own check.
	assertInvariants(t, srv2)

	// Invariant 2 from the outside: each payment succeeded, credited once.
	svc := srv2.service(t)
	for i, pay := range payments {
		p := getPayment(t, srv2, pay)
		applied := 0
		for _, tr := range p.Transitions {
			if tr.Applied && tr.To == "succeeded" {
				applied++
			}
		}
		if p.Status != client.PaymentStatusSucceeded || p.AmountReceived == nil || *p.AmountReceived != starterAmount || applied != 1 {
			run.fatalf("payment %s after recovery: status %s, %d applied moves to succeeded; %+v", pay, p.Status, applied, p)
		}
		if b := balanceOverHTTP(t, svc, customers[i]); b.Balance != starterCredits {
			run.fatalf("%s: balance %d, want %d (the pack credited exactly once)", customers[i], b.Balance, starterCredits)
		}
		if n := countRows(t, gdb, `SELECT count(*) FROM credit_grants WHERE payment_id = ?`, pay); n != 1 {
			run.fatalf("payment %s has %d purchase grants, want 1", pay, n)
		}
	}

	// Invariant 5: every event we delivered (and so every one acknowledged)
	// is stored and processed; nothing is left received, failed or parked.
	admin := srv2.admin(t)
	stored := map[string]client.StripeEventStatus{}
	limit := 500
	var cursor *string
	for {
		r, err := admin.ListStripeEventsWithResponse(ctx, &client.ListStripeEventsParams{Limit: &limit, Cursor: cursor})
		if err != nil {
			run.fatalf("list stripe events: %v", err)
		}
		mustStatus(t, "list stripe events", r.StatusCode(), r.Body, http.StatusOK)
		for _, e := range r.JSON200.Data {
			stored[e.Id] = e.Status
		}
		if cursor = r.JSON200.NextCursor; cursor == nil {
			break
		}
	}
	if len(stored) != len(events) {
		run.fatalf("%d stored Stripe events, want %d", len(stored), len(events))
	}
	for _, ev := range events {
		if st, ok := stored[ev.id]; !ok || st != client.StripeEventStatusProcessed {
			run.fatalf("Stripe event %s (acknowledged before the kill: %t) is %q, want processed", ev.id, ackedEvents[ev.id], st)
		}
	}

	// Invariant 4: every accepted usage event delivered, none dead, each
	// identifier accepted by Stripe exactly once, nothing sent under
	// another identifier, the totals Stripe holds are the ones sent.
	for _, st := range []client.UsageStatus{client.UsageStatusDead, client.UsageStatusPending, client.UsageStatusWaitingCustomer} {
		r, err := admin.ListUsageEventsWithResponse(ctx, &client.ListUsageEventsParams{Status: &st})
		if err != nil {
			run.fatalf("list %s usage events: %v", st, err)
		}
		mustStatus(t, "list usage events", r.StatusCode(), r.Body, http.StatusOK)
		if len(r.JSON200.Data) != 0 {
			run.fatalf("%s usage events after recovery: %s", st, r.Body)
		}
	}
	delivered := map[string]bool{}
	delivStatus := client.UsageStatusDelivered
	cursor = nil
	for {
		r, err := admin.ListUsageEventsWithResponse(ctx, &client.ListUsageEventsParams{Status: &delivStatus, Limit: &limit, Cursor: cursor})
		if err != nil {
			run.fatalf("list delivered usage events: %v", err)
		}
		mustStatus(t, "list delivered usage events", r.StatusCode(), r.Body, http.StatusOK)
		for _, e := range r.JSON200.Data {
			delivered[e.Identifier] = true
		}
		if cursor = r.JSON200.NextCursor; cursor == nil {
			break
		}
	}
	var missing, notOnce []string
	for _, id := range identifiers {
		if !delivered[id] {
			missing = append(missing, id)
		}
		if n := fake.Count(id); n != 1 {
			notOnce = append(notOnce, id+"×"+strconv.Itoa(n))
		}
	}
	if len(missing) > 0 || len(notOnce) > 0 {
		sort.Strings(notOnce)
		run.fatalf("usage after recovery: %d identifiers not listed delivered (first: %v), %d not accepted by Stripe exactly once (first: %v)",
			len(missing), missing[:min(len(missing), 10)], len(notOnce), notOnce[:min(len(notOnce), 10)])
	}
	sent := fake.MeterEvents()
	gotTotal := map[string]float64{}
	for _, ev := range sent {
		v, err := strconv.ParseFloat(ev.Payload["value"], 64)
		if err != nil {
			run.fatalf("meter event %s has value %q", ev.Identifier, ev.Payload["value"])
		}
		gotTotal[ev.Payload["stripe_customer_id"]] += v
	}
	if len(sent) != len(identifiers) {
		run.fatalf("Stripe accepted %d meter events, want exactly the %d accepted usage events", len(sent), len(identifiers))
	}
	for cus, want := range wantTotal {
		if gotTotal[cus] != want {
			run.fatalf("Stripe holds %v for %s, want %v", gotTotal[cus], cus, want)
		}
	}
	one, err := svc.GetUsageEventWithResponse(ctx, identifiers[len(identifiers)-1])
	if err != nil {
		run.fatalf("get usage event: %v", err)
	}
	mustStatus(t, "get usage event", one.StatusCode(), one.Body, http.StatusOK)
	if one.JSON200.Status != client.UsageStatusDelivered || one.JSON200.DeliveredAt == nil {
		run.fatalf("usage event %s = %s, want delivered", identifiers[len(identifiers)-1], one.Body)
	}

	// The restarted process still stops cleanly.
	if err := second.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		run.fatalf("SIGTERM: %v", err)
	}
	select {
	case <-second.done:
		if second.err != nil {
			run.fatalf("the restarted tally exited with %v after SIGTERM", second.err)
		}
	case <-time.After(20 * time.Second):
		run.fatalf("the restarted tally did not stop within 20s of SIGTERM")
	}
	t.Logf("done %s after start; the children wrote %d and %d bytes of logs", time.Since(started).Round(time.Millisecond), len(first.logs.String()), len(second.logs.String()))
}

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
	// And many customers with a consume or two at a time, whose consumes
	// a batch applies together (credits_consume_set, migration 00049).
	const many = 40
	for i := range many {
		customers = append(customers, fmt.Sprintf("crash-m%02d", i))
	}
	for _, c := range customers {
		grantOverHTTP(t, srv.service(t), c, grantEach, "crash-grant-"+c)
	}
	type key struct {
		customer, key string
		amount        int64
	}
	keys := make([]key, planned)
	for i := range keys {
		var c string
		switch i % 3 {
		case 0:
			c = customers[0]
		case 1:
			c = customers[1+(i/3)%3]
		default:
			c = customers[4+(i/3)%many]
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
