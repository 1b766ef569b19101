package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/sandbox"
	"github.com/tallybilling/tally/internal/stripeapi"
)

// webhook-credited measures what the money path costs: Stripe confirming
// real pending payments. Each operation credits one payment the way Stripe
// tells tally: a signed checkout.session.completed that links the
// PaymentIntent to the payment, then a signed payment_intent.succeeded with
// the payment's amount, currency, livemode and metadata. Each delivery is
// redelivered (the same event id, at the same time) with probability
// duplicateOdds, so duplicates are a fifth of all deliveries. After the
// load the database must show every payment the scenario drove credited
// exactly once, and every other one untouched; the rate counted is payments
// acknowledged in the measured window and found credited.

// duplicateOdds is the chance that a delivery is sent twice at once: 1 in
// 4 deliveries gets a copy, so copies are 1 in 5 of all deliveries.
const duplicateOdds = 4

// settleTimeout bounds the wait, after the load, for acknowledged payments
// whose crediting the server finishes in the background.
const settleTimeout = 30 * time.Second

// creditPack is the catalog's credit pack the payments buy.
type creditPack struct {
	ID                  string `json:"id"`
	Amount              int64  `json:"amount"`
	Currency            string `json:"currency"`
	Credits             int64  `json:"credits"`
	ExpiresAfterSeconds *int64 `json:"expires_after_seconds"`
}

// catalogPack reads the pack from the server's catalog, so that the payments
// and the events agree with what the server will check them against.
func catalogPack(ctx context.Context, svc *service, id string) (creditPack, error) {
	var catalog struct {
		CreditPacks []creditPack `json:"credit_packs"`
	}
	out := svc.do(ctx, request{method: http.MethodGet, path: "/v1/catalog", want: http.StatusOK,
		decode: func(body []byte) outcome {
			if err := json.Unmarshal(body, &catalog); err != nil {
				return outcome{errLabel: "bad 200 body", errDetail: snippet(body)}
			}
			return outcome{ok: true}
		}})
	if err := out.failure("GET /v1/catalog"); err != nil {
		return creditPack{}, err
	}
	var known []string
	for _, p := range catalog.CreditPacks {
		if p.ID == id {
			return p, nil
		}
		known = append(known, p.ID)
	}
	return creditPack{}, fmt.Errorf("-pack %q is not a credit pack of the server's catalog (it has: %s)", id, strings.Join(known, ", "))
}

// pendingPayment is a payment waiting for Stripe's confirmation.
type pendingPayment struct {
	ID, CustomerID, SessionID, PaymentIntentID string
	Amount, Credits                            int64
	Currency, Item                             string
	Livemode                                   bool
}

// preparation is the payments made ready for a run, and how.
type preparation struct {
	payments []pendingPayment
	// note says how the payments were made, for the report.
	note string
}

// checkoutRedirect is a success and cancel URL under a redirect prefix of
// deploy/catalog.example.yaml, the catalog of `make run`.
const checkoutRedirect = "http://localhost:3000/tally-bench"

// preparePayments makes n pending payments of pk for the buyers (round
// robin) the way a buyer does: POST /v1/checkout-sessions, which writes the
// payment and creates its Checkout Session at the server's Stripe. The
// first two are made one after the other; when the second answers 409
// because the server's Stripe gave both sessions the same PaymentIntent
// (stripe-mock answers every session with one fixed PaymentIntent, and
// tally keeps a PaymentIntent to one payment), checkout cannot make more
// than one payment per database, and the remaining payments are written to
// the database as the checkout writes them (the payment and its 'checkout
// requested' transition), each with a session id of its own. The report
// says which way they came.
func preparePayments(ctx context.Context, svc *service, pool *pgxpool.Pool, runID string, buyers []string, n int, pk creditPack, concurrency int) (preparation, error) {
	var prep preparation
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	viaAPI := 0
	for i := 0; i < min(2, n); i++ {
		p, err := checkoutPayment(ctx, svc, runID, buyers[i%len(buyers)], pk, i)
		if errors.Is(err, errSharedPaymentIntent) {
			return writePendingPayments(ctx, pool, runID, buyers, n, pk, prep.payments,
				fmt.Sprintf("the server's Stripe gives every Checkout Session the same PaymentIntent (stripe-mock does): %v", err))
		}
		if err != nil {
			return prep, err
		}
		prep.payments = append(prep.payments, p)
		viaAPI++
	}
	rest := make([]pendingPayment, n-len(prep.payments))
	indexes := make(chan int)
	var once sync.Once
	var first error
	var wg sync.WaitGroup
	for range min(concurrency, len(rest)) {
		wg.Go(func() {
			for i := range indexes {
				p, err := checkoutPayment(ctx, svc, runID, buyers[(viaAPI+i)%len(buyers)], pk, viaAPI+i)
				if err != nil {
					once.Do(func() { first = err; cancel() })
					continue
				}
				rest[i] = p
			}
		})
	}
feed:
	for i := range rest {
		select {
		case indexes <- i:
		case <-ctx.Done():
			break feed
		}
	}
	close(indexes)
	wg.Wait()
	if first != nil {
		return prep, first
	}
	if err := ctx.Err(); err != nil {
		return prep, err
	}
	prep.payments = append(prep.payments, rest...)
	prep.note = fmt.Sprintf("%d pending payments, all through POST /v1/checkout-sessions", n)
	return prep, nil
}

// errSharedPaymentIntent is a checkout refused because its session's
// PaymentIntent already belongs to another payment.
var errSharedPaymentIntent = errors.New("the Checkout Session's PaymentIntent already belongs to another payment")

// checkoutPayment makes one pending payment through the API and reads it
// back for its session and PaymentIntent ids. A payment whose session came
// without a PaymentIntent (Stripe creates it when the buyer pays) gets one
// named after it, which the checkout.session.completed event then links.
func checkoutPayment(ctx context.Context, svc *service, runID, customer string, pk creditPack, i int) (pendingPayment, error) {
	body, err := json.Marshal(map[string]any{"customer_id": customer, "item": pk.ID, "quantity": 1,
		"success_url": checkoutRedirect + "/paid", "cancel_url": checkoutRedirect + "/cancel"})
	if err != nil {
		return pendingPayment{}, err
	}
	var created struct {
		PaymentID string `json:"payment_id"`
	}
	out := svc.do(ctx, request{method: http.MethodPost, path: "/v1/checkout-sessions", body: body, want: http.StatusCreated,
		header: http.Header{"Idempotency-Key": {"bench-checkout-" + runID + "-" + strconv.Itoa(i)}},
		decode: func(b []byte) outcome {
			if json.Unmarshal(b, &created) != nil || created.PaymentID == "" {
				return outcome{errLabel: "bad 201 body", errDetail: snippet(b)}
			}
			return outcome{ok: true}
		}})
	if out.errLabel == "HTTP 409 conflict" && strings.Contains(out.errDetail, "payment_intent") {
		return pendingPayment{}, fmt.Errorf("%w (%s)", errSharedPaymentIntent, out.errDetail)
	}
	if err := out.failure("POST /v1/checkout-sessions"); err != nil {
		if strings.Contains(err.Error(), "_url") {
			err = fmt.Errorf("%w (the bench redirects to %s: the server's catalog must allow it)", err, checkoutRedirect)
		}
		return pendingPayment{}, err
	}
	var got struct {
		ID                string  `json:"id"`
		CustomerID        string  `json:"customer_id"`
		Item              string  `json:"item"`
		Status            string  `json:"status"`
		Amount            int64   `json:"amount"`
		Currency          string  `json:"currency"`
		Credits           int64   `json:"credits"`
		Livemode          bool    `json:"livemode"`
		CheckoutSessionID *string `json:"checkout_session_id"`
		PaymentIntentID   *string `json:"payment_intent_id"`
	}
	out = svc.do(ctx, request{method: http.MethodGet, path: "/v1/payments/" + url.PathEscape(created.PaymentID), want: http.StatusOK,
		decode: func(b []byte) outcome {
			if json.Unmarshal(b, &got) != nil {
				return outcome{errLabel: "bad 200 body", errDetail: snippet(b)}
			}
			return outcome{ok: true}
		}})
	if err := out.failure("GET /v1/payments/" + created.PaymentID); err != nil {
		return pendingPayment{}, err
	}
	if got.Status != "pending" || got.CheckoutSessionID == nil {
		return pendingPayment{}, fmt.Errorf("payment %s after checkout: status %s, session %v; want pending with a session", got.ID, got.Status, got.CheckoutSessionID)
	}
	p := pendingPayment{ID: got.ID, CustomerID: got.CustomerID, SessionID: *got.CheckoutSessionID, Amount: got.Amount,
		Credits: got.Credits, Currency: got.Currency, Item: got.Item, Livemode: got.Livemode,
		PaymentIntentID: "pi_bench_" + runID + "_" + strconv.Itoa(i)}
	if got.PaymentIntentID != nil {
		p.PaymentIntentID = *got.PaymentIntentID
	}
	return p, nil
}

// writePendingPayments completes made (the payments checkout made) to n
// with payments written to the database exactly as checkout writes them
// before it calls Stripe, plus the session id it stores afterwards. why is
// the reason, for the report.
func writePendingPayments(ctx context.Context, pool *pgxpool.Pool, runID string, buyers []string, n int, pk creditPack, made []pendingPayment, why string) (preparation, error) {
	livemode := false // a bench drives a test-mode server
	if len(made) > 0 {
		livemode = made[0].Livemode
	}
	var expire *int64
	if pk.ExpiresAfterSeconds != nil && *pk.ExpiresAfterSeconds > 0 {
		expire = pk.ExpiresAfterSeconds
	}
	payments := append([]pendingPayment(nil), made...)
	var ids, customers, sessions []string
	for i := len(made); i < n; i++ {
		suffix := runID + "_" + strconv.Itoa(i)
		p := pendingPayment{ID: db.NewID("pay"), CustomerID: buyers[i%len(buyers)], SessionID: "cs_bench_" + suffix,
			PaymentIntentID: "pi_bench_" + suffix, Amount: pk.Amount, Credits: pk.Credits, Currency: pk.Currency,
			Item: pk.ID, Livemode: livemode}
		payments = append(payments, p)
		ids, customers, sessions = append(ids, p.ID), append(customers, p.CustomerID), append(sessions, p.SessionID)
	}
	now := time.Now()
	err := pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
		_, err := tx.Exec(ctx, `INSERT INTO payments (id, customer_id, item, item_kind, quantity, status, unit_amount, amount,
				currency, credits, credits_expire_after_seconds, livemode, checkout_session_id, created_at, updated_at)
			SELECT t.id, t.customer_id, $4, 'credit_pack', 1, 'pending', $5, $5, $6, $7, $8, $9, t.session_id, $10, $10
			FROM unnest($1::text[], $2::text[], $3::text[]) AS t(id, customer_id, session_id)`,
			ids, customers, sessions, pk.ID, pk.Amount, pk.Currency, pk.Credits, expire, livemode, now)
		if err != nil {
			return err
		}
		_, err = tx.Exec(ctx, `INSERT INTO payment_transitions (payment_id, from_status, to_status, applied, reason, created_at)
			SELECT id, NULL, 'pending', true, 'checkout requested', $2 FROM unnest($1::text[]) AS t(id)`, ids, now)
		return err
	})
	if err != nil {
		return preparation{}, fmt.Errorf("write pending payments: %w", err)
	}
	return preparation{payments: payments, note: fmt.Sprintf(
		"%d pending payments: %d through POST /v1/checkout-sessions, %d written to the database as checkout writes them, because %s",
		n, len(made), n-len(made), why)}, nil
}

// creditRun is one run of webhook-credited: the payments, which of them
// each worker drove, and how the server answered.
type creditRun struct {
	svc      *service
	secret   string
	payments []pendingPayment
	next     atomic.Int64
	// driven[w] lists what worker w did; only w appends to it.
	driven [][]drivenPayment
}

type drivenPayment struct {
	index    int
	measured bool // started inside the measured window
	acked    bool // every delivery was acknowledged as stored
}

func newCreditRun(svc *service, secret string, payments []pendingPayment, workers int) *creditRun {
	return &creditRun{svc: svc, secret: secret, payments: payments, driven: make([][]drivenPayment, workers)}
}

// op credits the next payment: checkout.session.completed, then
// payment_intent.succeeded, each sometimes twice at once.
func (c *creditRun) op(ctx context.Context, w *worker) outcome {
	i := int(c.next.Add(1) - 1)
	if i >= len(c.payments) {
		return outcome{errLabel: "no pending payment left", errDetail: fmt.Sprintf("%d were prepared; raise -payments", len(c.payments)), stop: true}
	}
	c.driven[w.id] = append(c.driven[w.id], drivenPayment{index: i, measured: w.measuring})
	p := c.payments[i]
	now := time.Now()
	var tags []string
	for _, ev := range []struct{ id, typ string }{{"evt_bench_cs_" + p.ID, "checkout.session.completed"}, {"evt_bench_pi_" + p.ID, "payment_intent.succeeded"}} {
		object := p.paymentIntent()
		if ev.typ == "checkout.session.completed" {
			object = p.checkoutSession()
		}
		payload, err := json.Marshal(stripeEnvelope(ev.id, ev.typ, object, now))
		if err != nil {
			return outcome{errLabel: "request", errDetail: err.Error()}
		}
		copies := 1
		if w.rnd.IntN(duplicateOdds) == 0 {
			copies = 2
		}
		outs := make([]outcome, copies)
		var wg sync.WaitGroup
		for k := range copies {
			wg.Go(func() { outs[k] = c.deliver(ctx, ev.typ, payload) })
		}
		wg.Wait()
		for _, out := range outs {
			if !out.ok {
				out.tags = tags
				return out
			}
			tags = append(tags, out.tags...)
		}
	}
	c.driven[w.id][len(c.driven[w.id])-1].acked = true
	return outcome{ok: true, tags: tags}
}

// deliver POSTs one signed delivery and accepts it as stored when tally
// processed it or took it to process in the background.
func (c *creditRun) deliver(ctx context.Context, eventType string, payload []byte) outcome {
	return c.svc.do(ctx, request{
		method: http.MethodPost,
		path:   "/webhooks/stripe",
		body:   payload,
		header: http.Header{"Stripe-Signature": {sandbox.Sign(payload, c.secret, time.Now())}},
		noAuth: true,
		want:   http.StatusOK,
		decode: func(data []byte) outcome {
			var ack struct {
				Received  bool   `json:"received"`
				Status    string `json:"status"`
				Duplicate bool   `json:"duplicate"`
			}
			if err := json.Unmarshal(data, &ack); err != nil || !ack.Received {
				return outcome{errLabel: "bad 200 body", errDetail: snippet(data)}
			}
			tag := eventType + " stored as " + ack.Status
			if ack.Duplicate {
				tag += " (a copy: already stored)"
			}
			if ack.Status != "processed" && ack.Status != "received" {
				return outcome{errLabel: tag, errDetail: "see GET /v1/admin/stripe-events for the reason"}
			}
			return outcome{ok: true, tags: []string{tag}}
		},
	})
}

func (p pendingPayment) metadata() map[string]string {
	return map[string]string{stripeapi.MetadataPaymentID: p.ID, stripeapi.MetadataCustomerID: p.CustomerID, stripeapi.MetadataItem: p.Item}
}

// checkoutSession is the completed, paid session as Stripe sends it; it
// names the payment's PaymentIntent.
func (p pendingPayment) checkoutSession() map[string]any {
	return map[string]any{
		"id": p.SessionID, "object": "checkout.session", "mode": "payment", "status": "complete", "payment_status": "paid",
		"payment_intent": p.PaymentIntentID, "customer": nil, "invoice": nil, "subscription": nil,
		"client_reference_id": p.ID, "amount_total": p.Amount, "amount_subtotal": p.Amount, "currency": p.Currency,
		"livemode": p.Livemode, "metadata": p.metadata(),
	}
}

// paymentIntent is the succeeded PaymentIntent as Stripe sends it.
func (p pendingPayment) paymentIntent() map[string]any {
	return map[string]any{
		"id": p.PaymentIntentID, "object": "payment_intent", "amount": p.Amount, "amount_received": p.Amount,
		"currency": p.Currency, "status": "succeeded", "livemode": p.Livemode, "capture_method": "automatic",
		"metadata": p.metadata(), "last_payment_error": nil, "cancellation_reason": nil,
	}
}

// creditState is what the database says about one payment's crediting.
// Each purchase grant's ledger entry is checked by verify, which every run
// ends with.
type creditState struct {
	PaymentID     string
	Found         bool
	Status        string
	Credits       int64
	Grants        int64 // purchase grants naming the payment
	Granted       int64 // their credits in total
	Confirmations int64
}

// Outcomes of judging a creditState.
const (
	creditedOnce = "credited once"
	untouched    = "untouched"
)

// judge says whether the payment was credited exactly once, was left
// untouched, or is in a state that is neither (described).
func (s creditState) judge() string {
	switch {
	case !s.Found:
		return "the payment is gone"
	case s.Status == "succeeded" && s.Grants == 1 && s.Granted == s.Credits && s.Confirmations == 1:
		return creditedOnce
	case s.Status == "pending" && s.Grants == 0 && s.Confirmations == 0:
		return untouched
	}
	return fmt.Sprintf("status %s with %d purchase grants of %d credits in total and %d confirmations (credited once is succeeded, 1 grant of %d, 1 confirmation)",
		s.Status, s.Grants, s.Granted, s.Confirmations, s.Credits)
}

// loadCreditStates reads the crediting state of the payments ids.
func loadCreditStates(ctx context.Context, pool *pgxpool.Pool, ids []string) (map[string]creditState, error) {
	rows, err := pool.Query(ctx, `SELECT t.id, p.id IS NOT NULL, COALESCE(p.status, ''), COALESCE(p.credits, 0),
			(SELECT count(*) FROM credit_grants g WHERE g.payment_id = t.id AND g.source = 'purchase'),
			(SELECT COALESCE(sum(g.amount), 0)::bigint FROM credit_grants g WHERE g.payment_id = t.id AND g.source = 'purchase'),
			(SELECT count(*) FROM payment_confirmations c WHERE c.payment_id = t.id)
		FROM unnest($1::text[]) AS t(id) LEFT JOIN payments p ON p.id = t.id`, ids)
	if err != nil {
		return nil, fmt.Errorf("read the payments' crediting: %w", err)
	}
	out := make(map[string]creditState, len(ids))
	for rows.Next() {
		var s creditState
		if err := rows.Scan(&s.PaymentID, &s.Found, &s.Status, &s.Credits, &s.Grants, &s.Granted, &s.Confirmations); err != nil {
			rows.Close()
			return nil, err
		}
		out[s.PaymentID] = s
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("read the payments' crediting: %w", err)
	}
	return out, nil
}

// creditCheck is the verdict on a run's payments.
type creditCheck struct {
	// credited counts the measured payments acknowledged and credited once.
	credited int64
	// failures groups every payment in a wrong state: an acknowledged one
	// not credited once, any payment credited more than once or half-way,
	// a payment the run never drove that is not untouched.
	failures map[string]int64
	examples map[string]string
}

// check judges every prepared payment against what the run did with it,
// waiting up to settle for acknowledged payments still being credited.
func (c *creditRun) check(ctx context.Context, pool *pgxpool.Pool, settle time.Duration) (creditCheck, error) {
	ids := make([]string, len(c.payments))
	for i, p := range c.payments {
		ids[i] = p.ID
	}
	driven := map[int]drivenPayment{}
	for _, list := range c.driven {
		for _, d := range list {
			driven[d.index] = d
		}
	}
	deadline := time.Now().Add(settle)
	for {
		states, err := loadCreditStates(ctx, pool, ids)
		if err != nil {
			return creditCheck{}, err
		}
		res, waiting := judgeRun(c.payments, driven, states)
		if waiting == 0 || !time.Now().Before(deadline) {
			return res, nil
		}
		select {
		case <-ctx.Done():
			return creditCheck{}, ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// judgeRun applies the exactly-once rule to each payment: one driven to the
// end (acknowledged) must be credited once; one driven but not to the end
// (its operation already counts as an error) may be credited once or
// untouched; one never driven must be untouched. waiting counts the
// acknowledged payments still untouched, which a server crediting in the
// background may yet credit.
func judgeRun(payments []pendingPayment, driven map[int]drivenPayment, states map[string]creditState) (res creditCheck, waiting int) {
	res = creditCheck{failures: map[string]int64{}, examples: map[string]string{}}
	fail := func(label, example string) {
		res.failures[label]++
		if _, ok := res.examples[label]; !ok {
			res.examples[label] = example
		}
	}
	for i, p := range payments {
		verdict := states[p.ID].judge() // a payment missing from states is not Found
		d, wasDriven := driven[i]
		switch {
		case !wasDriven && verdict != untouched:
			fail("a payment the run did not drive is not untouched", p.ID+": "+verdict)
		case !wasDriven:
		case d.acked && verdict == creditedOnce:
			if d.measured {
				res.credited++
			}
		case d.acked && verdict == untouched:
			waiting++
			fail("acknowledged but not credited", p.ID+": every delivery was acknowledged, yet the payment is still pending without a grant")
		case d.acked:
			fail("acknowledged but not credited exactly once", p.ID+": "+verdict)
		case verdict != creditedOnce && verdict != untouched:
			fail("a payment whose deliveries failed is half credited", p.ID+": "+verdict)
		}
	}
	return res, waiting
}

// stripeEnvelope is an event as Stripe delivers it, in the API version of
// the stripe-go the server is built with, so a server that checks versions
// accepts it.
func stripeEnvelope(id, eventType string, object map[string]any, at time.Time) map[string]any {
	return map[string]any{
		"id":               id,
		"object":           "event",
		"api_version":      stripeAPIVersion,
		"created":          at.Unix(),
		"livemode":         object["livemode"],
		"pending_webhooks": 1,
		"request":          map[string]any{"id": nil, "idempotency_key": nil},
		"type":             eventType,
		"data":             map[string]any{"object": object},
	}
}
