package main

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tallybilling/tally/internal/stripeapi/stripefake"
	"github.com/tallybilling/tally/pkg/client"
)

// Hostile review of "a success found by a sync wakes the refunds and
// disputes waiting for it".

// metadataStripe answers GET /v1/payment_intents/{id} with tally's
// metadata for the PaymentIntents a test names (as Checkout puts it there),
// so a refund of a payment nothing linked yet finds its payment.
type metadataStripe struct {
	mu       sync.Mutex
	metadata map[string]string // PaymentIntent -> metadata JSON
}

func newMetadataStripe(fake *stripefake.Fake) *metadataStripe {
	m := &metadataStripe{metadata: map[string]string{}}
	fake.SetFault(func(r *http.Request) (int, string, bool) {
		id, ok := strings.CutPrefix(r.URL.Path, "/v1/payment_intents/")
		if r.Method != http.MethodGet || !ok {
			return 0, "", false
		}
		m.mu.Lock()
		defer m.mu.Unlock()
		md, ok := m.metadata[id]
		if !ok {
			return 0, "", false
		}
		return http.StatusOK, fmt.Sprintf(`{"id":%q,"object":"payment_intent","status":"succeeded","amount":%d,"amount_received":%d,"currency":"usd","livemode":false,"metadata":%s}`,
			id, starterAmount, starterAmount, md), true
	})
	return m
}

// pendingPaidAtStripe checks a starter pack out for customer and pays it at
// Stripe, with no webhook of the success delivered.
func (m *metadataStripe) pendingPaidAtStripe(t *testing.T, fake *stripefake.Fake, s *server, customer string) string {
	t.Helper()
	pay := checkout(t, s, customer, "starter", 1)
	m.mu.Lock()
	m.metadata[piID(pay)] = fmt.Sprintf(`{"tally_payment_id":%q,"tally_customer_id":%q}`, pay, customer)
	m.mu.Unlock()
	paidAtStripe(t, fake, s, pay)
	return pay
}

// TestRevSyncManyParkedEventsAllApply: more than one claim's worth (20) of
// refunds and disputes park waiting for one payment's success (a buyer
// refunded in many parts during an outage, Stripe redelivering days
// later). The sync that finds the success must apply every one of them:
// a parked event left behind is applied by nothing (no retry), so its
// refund stays unapplied however long one waits.
func TestRevSyncManyParkedEventsAllApply(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	env := syncEnv(t, fake.URL())
	env["TALLY_STRIPE_EVENT_RETRY_INTERVAL"] = "10m"
	s := startServer(t, env)
	gdb := openDB(t, s)
	m := newMetadataStripe(fake)
	pay := m.pendingPaidAtStripe(t, fake, s, "rs-many")

	// 25 partial refunds of 40 each, cumulative; Stripe created them two
	// days ago, so each parks at once.
	const parts, each = 25, starterAmount / 25
	var ids []string
	for i := 1; i <= parts; i++ {
		id := newEventID()
		deliver(t, s, stripeEventCreated(id, "charge.refunded", time.Now().Add(-48*time.Hour), refundedCharge(pay, starterAmount, int64(i)*each)))
		if st, le := eventStatus(t, gdb, id); st != "parked" {
			t.Fatalf("refund %d: %s %q, want parked", i, st, le)
		}
		ids = append(ids, id)
	}
	stripeSync(t, s, future())
	for deadline := time.Now().Add(15 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		if countRows(t, gdb, `SELECT count(*) FROM stripe_events WHERE status = 'processed' AND type = 'charge.refunded'`) == parts {
			break
		}
	}
	var left []string
	for _, id := range ids {
		if st, le := eventStatus(t, gdb, id); st != "processed" {
			left = append(left, st+": "+le)
		}
	}
	if len(left) > 0 {
		t.Fatalf("%d refunds not applied after the sync:\n%s", len(left), strings.Join(left, "\n"))
	}
	wantPayment(t, s, pay, client.PaymentStatusRefunded, starterAmount)
	wantBalance(t, s, "rs-many", 0)
	assertInvariants(t, s)
}

var _ = json.Marshal
