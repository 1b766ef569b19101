package main

import (
	"context"
	"encoding/json"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/stripe/stripe-go/v82/webhook"

	"github.com/tallybilling/tally/internal/app"
	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/db/dbtest"
	"github.com/tallybilling/tally/internal/sandbox"
	"github.com/tallybilling/tally/internal/stripeapi"
)

func TestCreditStateJudge(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name  string
		state creditState
		want  string // creditedOnce, untouched, or a fragment of the description
	}{
		{"credited once", creditState{Found: true, Status: "succeeded", Credits: 1000, Grants: 1, Granted: 1000, Confirmations: 1}, creditedOnce},
		{"untouched", creditState{Found: true, Status: "pending", Credits: 1000}, untouched},
		{"gone", creditState{}, "the payment is gone"},
		{"succeeded without a grant", creditState{Found: true, Status: "succeeded", Credits: 1000, Confirmations: 1}, "0 purchase grants"},
		{"two grants", creditState{Found: true, Status: "succeeded", Credits: 1000, Grants: 2, Granted: 2000, Confirmations: 1}, "2 purchase grants of 2000"},
		{"grant of the wrong size", creditState{Found: true, Status: "succeeded", Credits: 1000, Grants: 1, Granted: 999, Confirmations: 1}, "of 999 credits"},
		{"pending with a grant", creditState{Found: true, Status: "pending", Credits: 1000, Grants: 1, Granted: 1000}, "status pending"},
		{"failed", creditState{Found: true, Status: "failed", Credits: 1000}, "status failed"},
		{"confirmed twice", creditState{Found: true, Status: "succeeded", Credits: 1000, Grants: 1, Granted: 1000, Confirmations: 2}, "2 confirmations"},
	}
	for _, c := range cases {
		got := c.state.judge()
		if got != c.want && !strings.Contains(got, c.want) || (c.want != creditedOnce && got == creditedOnce) {
			t.Errorf("%s: judge() = %q, want %q", c.name, got, c.want)
		}
	}
}

// The exactly-once rule per payment, by what the run did with it.
func TestJudgeRunAppliesExactlyOncePerPayment(t *testing.T) {
	t.Parallel()
	credited := creditState{Found: true, Status: "succeeded", Credits: 10, Grants: 1, Granted: 10, Confirmations: 1}
	pending := creditState{Found: true, Status: "pending", Credits: 10}
	twice := creditState{Found: true, Status: "succeeded", Credits: 10, Grants: 2, Granted: 20, Confirmations: 1}
	payments := []pendingPayment{{ID: "p0"}, {ID: "p1"}, {ID: "p2"}, {ID: "p3"}, {ID: "p4"}, {ID: "p5"}, {ID: "p6"}, {ID: "p7"}, {ID: "p8"}}
	driven := map[int]drivenPayment{
		0: {index: 0, measured: true, acked: true},  // credited, counts
		1: {index: 1, measured: false, acked: true}, // credited in the warmup: fine, not counted
		2: {index: 2, measured: true, acked: true},  // acknowledged, still pending
		3: {index: 3, measured: true, acked: true},  // credited twice
		4: {index: 4, measured: true, acked: false}, // a delivery failed, nothing happened: allowed
		5: {index: 5, measured: true, acked: false}, // a delivery failed after crediting: allowed
		6: {index: 6, measured: true, acked: false}, // a delivery failed, half credited: not allowed
		// 7: never driven, untouched; 8: never driven, credited anyway
	}
	states := map[string]creditState{"p0": credited, "p1": credited, "p2": pending, "p3": twice, "p4": pending, "p5": credited,
		"p6": {Found: true, Status: "succeeded", Credits: 10, Confirmations: 1}, "p7": pending, "p8": credited}
	res, waiting := judgeRun(payments, driven, states)
	if res.credited != 1 || waiting != 1 {
		t.Errorf("credited %d, waiting %d; want 1 measured payment credited and 1 acknowledged one still pending", res.credited, waiting)
	}
	want := map[string]int64{
		"acknowledged but not credited":                      1,
		"acknowledged but not credited exactly once":         1,
		"a payment whose deliveries failed is half credited": 1,
		"a payment the run did not drive is not untouched":   1,
	}
	for label, n := range want {
		if res.failures[label] != n {
			t.Errorf("failures[%q] = %d, want %d (all: %v)", label, res.failures[label], n, res.failures)
		}
	}
	if len(res.failures) != len(want) {
		t.Errorf("failures %v, want exactly %v", res.failures, want)
	}
	if !strings.HasPrefix(res.examples["a payment the run did not drive is not untouched"], "p8: ") {
		t.Errorf("example %q, want it to name p8", res.examples["a payment the run did not drive is not untouched"])
	}
}

// Payments written as checkout writes them satisfy the schema and verify,
// and the crediting query reads each one's state from the real tables.
func TestPendingPaymentsAndTheCreditingQuery(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	dbURL := dbtest.NewURL(t)
	pool, err := openPool(ctx, dbURL, 2)
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	if _, err := pool.Exec(ctx, `INSERT INTO customers (id, created_at, updated_at) VALUES ('bench-a', now(), now()), ('bench-b', now(), now())`); err != nil {
		t.Fatal(err)
	}
	expire := int64(3600)
	pk := creditPack{ID: "starter", Amount: 1000, Currency: "usd", Credits: 500, ExpiresAfterSeconds: &expire}
	prep, err := writePendingPayments(ctx, pool, "run1", []string{"bench-a", "bench-b"}, 4, pk, nil, "a test")
	if err != nil {
		t.Fatal(err)
	}
	if len(prep.payments) != 4 || !strings.Contains(prep.note, "0 through POST /v1/checkout-sessions, 4 written to the database") {
		t.Fatalf("prepared %d payments: %s", len(prep.payments), prep.note)
	}
	p := prep.payments[1]
	if p.CustomerID != "bench-b" || p.Amount != 1000 || p.Credits != 500 || p.Currency != "usd" || p.SessionID == prep.payments[0].SessionID ||
		p.PaymentIntentID == prep.payments[0].PaymentIntentID || !strings.HasPrefix(p.ID, "pay_") {
		t.Errorf("payment %+v", p)
	}
	var status, reason string
	var expireAfter int64
	if err := pool.QueryRow(ctx, `SELECT p.status, p.credits_expire_after_seconds, t.reason FROM payments p
		JOIN payment_transitions t ON t.payment_id = p.id WHERE p.id = $1`, p.ID).Scan(&status, &expireAfter, &reason); err != nil {
		t.Fatal(err)
	}
	if status != "pending" || expireAfter != 3600 || reason != "checkout requested" {
		t.Errorf("stored payment: %s, expires after %d, transition %q", status, expireAfter, reason)
	}

	// Credit payment 0 by hand, as the confirmation does, and give payment 1
	// a confirmation without a grant.
	credit := prep.payments[0]
	for _, q := range []struct {
		sql  string
		args []any
	}{
		{`UPDATE payments SET status = 'succeeded', payment_intent_id = $2 WHERE id = $1`, []any{credit.ID, credit.PaymentIntentID}},
		{`INSERT INTO payment_confirmations (payment_intent_id, payment_id) VALUES ($2, $1)`, []any{credit.ID, credit.PaymentIntentID}},
		{`INSERT INTO credit_balances (customer_id, balance, updated_at) VALUES ($1, 500, now())`, []any{credit.CustomerID}},
		{`INSERT INTO credit_grants (id, customer_id, amount, remaining, source, payment_id, reason, created_at)
			VALUES ('grt_t', $2, 500, 500, 'purchase', $1, 'purchase', now())`, []any{credit.ID, credit.CustomerID}},
		{`INSERT INTO credit_ledger (id, customer_id, kind, amount, balance_after, reason, grant_id, payment_id, created_at)
			VALUES ('ctx_t', $2, 'grant', 500, 500, 'purchase', 'grt_t', $1, now())`, []any{credit.ID, credit.CustomerID}},
		{`INSERT INTO payment_confirmations (payment_intent_id, payment_id) VALUES ('pi_other', $1)`, []any{prep.payments[1].ID}},
	} {
		if _, err := pool.Exec(ctx, q.sql, q.args...); err != nil {
			t.Fatalf("%s: %v", q.sql, err)
		}
	}
	states, err := loadCreditStates(ctx, pool, []string{credit.ID, prep.payments[1].ID, prep.payments[2].ID, "pay_missing"})
	if err != nil {
		t.Fatal(err)
	}
	if got := states[credit.ID].judge(); got != creditedOnce {
		t.Errorf("credited payment judged %q (%+v)", got, states[credit.ID])
	}
	if got := states[prep.payments[1].ID].judge(); !strings.Contains(got, "1 confirmations") {
		t.Errorf("confirmed-without-grant payment judged %q", got)
	}
	if got := states[prep.payments[2].ID].judge(); got != untouched {
		t.Errorf("pending payment judged %q", got)
	}
	if got := states["pay_missing"].judge(); got != "the payment is gone" {
		t.Errorf("missing payment judged %q", got)
	}

	// Verify accepts the pending payments (pay 1's confirmation without a
	// grant is the payments' own affair: it is still pending).
	gdb, err := db.Open(ctx, dbURL, 2, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close(gdb)
	if rep, err := app.Verify(ctx, gdb); err != nil || !rep.OK || rep.PaymentsChecked != 4 {
		t.Errorf("verify: %+v, %v", rep, err)
	}
}

// The two events of a payment parse as Stripe events in stripe-go, carry
// what tally's validation chain compares (payment, customer, amount,
// currency, livemode), and name the same PaymentIntent.
func TestCreditEventsCarryWhatTheValidationChainChecks(t *testing.T) {
	t.Parallel()
	p := pendingPayment{ID: "pay_1", CustomerID: "bench-x-1", SessionID: "cs_bench_1", PaymentIntentID: "pi_bench_1",
		Amount: 1000, Credits: 1000, Currency: "usd", Item: "starter"}
	now := time.Now()
	for _, c := range []struct {
		typ    string
		object map[string]any
	}{{"checkout.session.completed", p.checkoutSession()}, {"payment_intent.succeeded", p.paymentIntent()}} {
		payload, err := json.Marshal(stripeEnvelope("evt_1", c.typ, c.object, now))
		if err != nil {
			t.Fatal(err)
		}
		evt, err := webhook.ConstructEvent(payload, sandbox.Sign(payload, "whsec_x", now), "whsec_x")
		if err != nil {
			t.Fatalf("%s: stripe-go refuses the event: %v", c.typ, err)
		}
		var obj struct {
			ID             string            `json:"id"`
			PaymentIntent  string            `json:"payment_intent"`
			Amount         int64             `json:"amount"`
			AmountReceived int64             `json:"amount_received"`
			AmountTotal    int64             `json:"amount_total"`
			Currency       string            `json:"currency"`
			PaymentStatus  string            `json:"payment_status"`
			Livemode       bool              `json:"livemode"`
			Metadata       map[string]string `json:"metadata"`
		}
		if err := json.Unmarshal(evt.Data.Raw, &obj); err != nil {
			t.Fatal(err)
		}
		if string(evt.Type) != c.typ || evt.Livemode || obj.Livemode || obj.Currency != "usd" || obj.Metadata[stripeapi.MetadataPaymentID] != "pay_1" ||
			obj.Metadata[stripeapi.MetadataCustomerID] != "bench-x-1" {
			t.Errorf("%s: event %+v object %+v", c.typ, evt, obj)
		}
		switch c.typ {
		case "checkout.session.completed":
			if obj.ID != "cs_bench_1" || obj.PaymentIntent != "pi_bench_1" || obj.AmountTotal != 1000 || obj.PaymentStatus != "paid" {
				t.Errorf("session %+v, want it paid, for 1000, linking pi_bench_1", obj)
			}
		default:
			if obj.ID != "pi_bench_1" || obj.AmountReceived != 1000 || obj.Amount != 1000 {
				t.Errorf("payment intent %+v, want pi_bench_1 with 1000 received", obj)
			}
		}
	}
}
