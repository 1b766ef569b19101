package main

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tallybilling/tally/internal/stripeapi/stripefake"
	"github.com/tallybilling/tally/pkg/client"
)

// pay-by-invoice payments and automatic top-ups (off-session
// PaymentIntents of tally's worker) whose webhooks are dropped, settled
// only by the background sync of two replicas (every second) racing
// on-demand syncs; half of them then also get their webhooks, late. After
// spending, top-ups are refunded and disputed at Stripe, the events
// reaching tally only through the sync, or through both. Each payment is
// credited once, each refund and dispute taken back once.
func TestSyncInvoicesAndTopUpsThroughSyncAndLateWebhooks(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	env := syncEnv(t, fake.URL())
	env["TALLY_STRIPE_SYNC_INTERVAL"] = "1s"
	a, b := twoServers(t, env)
	gdb := openDB(t, a)
	ctx := context.Background()
	evs := &stripeEvents{fake: fake}

	// Cards saved and auto top-up on, with their events delivered (the
	// setup is not what is attacked).
	const tops = 4
	for i := range tops {
		withAutoTopUp(t, a, evs, fmt.Sprintf("h71-top%d", i), topUpCard, 1000, client.AutoTopUpSettings{Enabled: true, Threshold: 500, Item: "starter"})
	}
	// From here no event is delivered but the late ones chosen below.
	mark := len(fake.Sandbox().Events())

	const invoices = 4
	var invPays []string
	for i := range invoices {
		cust := fmt.Sprintf("h71-inv%d", i)
		setBilling(t, a, cust)
		r := payByInvoice(t, a, cust, "starter", 1, "h71-inv-"+cust, "")
		mustStatus(t, "invoice payment", r.StatusCode(), r.Body, http.StatusCreated)
		invoiceActionAt(t, fake, r.JSON201.Invoice.Id, "pay")
		invPays = append(invPays, r.JSON201.PaymentId)
	}
	var topPays []string
	for i := range tops {
		cust := fmt.Sprintf("h71-top%d", i)
		if st := spend(t, []*server{a, b}[i%2], cust, 600, "h71-cross-"+cust); st != http.StatusOK {
			t.Fatalf("spend: %d", st)
		}
		var ts []client.Payment
		waitFor(t, "the top-up of "+cust, func() bool { ts = autoTopUps(t, a, cust); return len(ts) == 1 })
		topPays = append(topPays, ts[0].Id)
	}
	for _, pay := range topPays {
		waitCharged(t, a, pay)
	}
	lateDeliver := func(from int) {
		var wg sync.WaitGroup
		for i, ev := range fake.Sandbox().Events()[from:] {
			// Only the events of the odd customers arrive (late), to both
			// replicas at once.
			if !strings.Contains(string(ev.Payload), "1\"") && !strings.Contains(string(ev.Payload), "3\"") {
				continue
			}
			for _, s := range []*server{a, b} {
				wg.Add(1)
				go func() {
					defer wg.Done()
					time.Sleep(time.Duration(i%5) * 100 * time.Millisecond)
					body := ev.Payload
					if st, out := postWebhook(t, s, body, sign(body, testWebhookSecret, time.Now())); st != http.StatusOK {
						t.Errorf("late webhook %s: %d %s", ev.ID, st, out)
					}
				}()
			}
		}
		wg.Wait()
	}
	// On-demand syncs race the background ones while late webhooks come.
	var wg sync.WaitGroup
	for _, s := range []*server{a, b} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 4 {
				r, err := s.admin(t).SyncStripeWithResponse(ctx, client.StripeSyncRequest{})
				if err == nil && r.StatusCode() != http.StatusOK && r.StatusCode() != http.StatusConflict {
					t.Errorf("on-demand sync: %d %s", r.StatusCode(), r.Body)
				}
				time.Sleep(300 * time.Millisecond)
			}
		}()
	}
	time.Sleep(1500 * time.Millisecond) // the syncs apply first
	lateDeliver(mark)
	wg.Wait()
	for _, pay := range append(append([]string{}, invPays...), topPays...) {
		waitPayment(t, a, pay, client.PaymentStatusSucceeded)
	}
	// Spend past the top-up's credits (another top-up may start: it
	// settles the same way), then refund and dispute at Stripe.
	mark2 := len(fake.Sandbox().Events())
	for i := range tops {
		cust := fmt.Sprintf("h71-top%d", i)
		// 400 + 1000 credits: spend 1200.
		if st := spend(t, a, cust, 1200, "h71-spend-"+cust); st != http.StatusOK {
			t.Fatalf("spend %s: %d", cust, st)
		}
	}
	for i, pay := range topPays {
		pi := *getPayment(t, a, pay).PaymentIntentId
		var err error
		switch i {
		case 0, 1:
			_, err = fake.Sandbox().Refund(ctx, pi, 0, "requested_by_customer")
		case 2, 3:
			_, err = fake.Sandbox().OpenDispute(ctx, pi, "fraudulent")
		}
		if err != nil {
			t.Fatalf("at Stripe, for %s: %v", pay, err)
		}
	}
	time.Sleep(1500 * time.Millisecond)
	lateDeliver(mark2)
	waitForWithin(t, "the refunds and disputes applied", time.Minute, func() bool {
		return countRows(t, gdb, `SELECT count(*) FROM payment_refunds WHERE payment_id IN (?, ?)`, topPays[0], topPays[1]) == 2 &&
			countRows(t, gdb, `SELECT count(*) FROM payment_disputes WHERE payment_id IN (?, ?)`, topPays[2], topPays[3]) == 2
	})
	// The last top-ups (after the second crossing) settle too.
	waitForWithin(t, "every event settled and no payment pending at Stripe's word", time.Minute, func() bool {
		return countRows(t, gdb, `SELECT count(*) FROM stripe_events WHERE status NOT IN ('processed','ignored')`) == 0 &&
			countRows(t, gdb, `SELECT count(*) FROM payments WHERE status = 'pending' AND payment_intent_id IS NOT NULL`) == 0
	})
	time.Sleep(2 * time.Second) // a few more background syncs: nothing may change
	if n := countRows(t, gdb, `SELECT count(*) FROM payments p WHERE p.status <> 'pending' AND p.status <> 'failed'
		AND (SELECT count(*) FROM credit_grants g WHERE g.payment_id = p.id AND g.source = 'purchase' AND g.amount = p.credits) <> 1`); n != 0 {
		t.Fatalf("%d settled payments without exactly one purchase grant of their credits", n)
	}
	if n := countRows(t, gdb, `SELECT count(*) FROM credit_grants g JOIN payments p ON p.id = g.payment_id WHERE p.status IN ('pending','failed')`); n != 0 {
		t.Fatalf("%d grants of payments not paid", n)
	}
	for _, pay := range topPays[:2] {
		if n := countRows(t, gdb, `SELECT count(*) FROM payment_refunds WHERE payment_id = ?`, pay); n != 1 {
			t.Fatalf("%s: %d refunds applied, want 1", pay, n)
		}
		if n := countRows(t, gdb, `SELECT count(*) FROM credit_ledger WHERE payment_id = ? AND kind = 'revoke'`, pay); n > 1 {
			t.Fatalf("%s: %d revoke entries", pay, n)
		}
	}
	for _, pay := range topPays[2:] {
		if n := countRows(t, gdb, `SELECT count(*) FROM payment_disputes WHERE payment_id = ?`, pay); n != 1 {
			t.Fatalf("%s: %d disputes, want 1", pay, n)
		}
	}
	var byStatus []struct {
		Method, Status string
		N              int
	}
	gdb.Raw(`SELECT method, status, count(*) AS n FROM payments GROUP BY 1, 2 ORDER BY 1, 2`).Scan(&byStatus)
	t.Logf("payments: %+v", byStatus)
	var evBy []struct {
		Source, Status string
		N              int
	}
	gdb.Raw(`SELECT source, status, count(*) AS n FROM stripe_events GROUP BY 1, 2 ORDER BY 1, 2`).Scan(&evBy)
	t.Logf("stripe events: %+v", evBy)
	for i := range tops {
		cust := fmt.Sprintf("h71-top%d", i)
		t.Logf("%s: balance %d", cust, balanceOf(t, gdb, cust))
	}
	owed, body := receivablesOverHTTP(t, a)
	t.Logf("owed: %v", owed)
	_ = body
	assertInvariants(t, a)
}
