package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"strconv"
	"sync"
	"time"

	"github.com/stripe/stripe-go/v82"

	"github.com/tallybilling/tally/internal/sandbox"
	"github.com/tallybilling/tally/internal/stripeapi"
)

// Grants are far larger than any run can spend, so a 402 during the load
// means the service lost track of a balance, not that the bench ran dry.
const (
	grantPerCustomer = 1_000_000_000
	grantHot         = 1_000_000_000_000
)

// population names the customers of one run. Ids carry the run id so that
// runs never share customers, keys or event ids, whatever the seed.
type population struct {
	runID     string
	customers []string
	hot       string
}

func newPopulation(runID string, n int) population {
	p := population{runID: runID, hot: "bench-" + runID + "-hot"}
	for i := range n {
		p.customers = append(p.customers, fmt.Sprintf("bench-%s-%d", runID, i))
	}
	return p
}

func (p population) pick(w *worker) string {
	return p.customers[w.rnd.IntN(len(p.customers))]
}

// uniqueKey is an idempotency key, event id or identifier no other request
// of any run uses.
func (p population) uniqueKey(prefix string, w *worker) string {
	return prefix + "_" + p.runID + "_" + strconv.Itoa(w.id) + "_" + strconv.FormatInt(w.seq, 10)
}

// grant gives each customer amount credits through the API, concurrency at
// a time, as a real caller would: POST .../credits/grants with an
// Idempotency-Key. It stops at the first failure.
func grant(ctx context.Context, svc *service, runID string, customers []string, amount int64, concurrency int) error {
	body := fmt.Appendf(nil, `{"amount":%d,"reason":"tally-bench setup"}`, amount)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	ids := make(chan string)
	var once sync.Once
	var first error
	var wg sync.WaitGroup
	for range min(concurrency, len(customers)) {
		wg.Go(func() {
			for id := range ids {
				out := svc.do(ctx, request{
					method: http.MethodPost,
					path:   "/v1/customers/" + url.PathEscape(id) + "/credits/grants",
					body:   body,
					header: http.Header{"Idempotency-Key": {"bench-grant-" + runID + "-" + id}},
					want:   http.StatusCreated,
				})
				if err := out.failure("grant to " + id); err != nil {
					once.Do(func() { first = err; cancel() })
				}
			}
		})
	}
feed:
	for _, id := range customers {
		select {
		case ids <- id:
		case <-ctx.Done():
			break feed
		}
	}
	close(ids)
	wg.Wait()
	if first == nil && ctx.Err() != nil {
		return ctx.Err()
	}
	return first
}

// consumeOp spends 1 credit of the customer pick chooses, each call under a
// fresh Idempotency-Key; scenario keeps keys of different scenarios apart.
func consumeOp(svc *service, p population, scenario string, pick func(*worker) string) op {
	body := []byte(`{"amount":1,"reason":"tally-bench"}`)
	return func(ctx context.Context, w *worker) outcome {
		return svc.do(ctx, request{
			method:   http.MethodPost,
			path:     "/v1/customers/" + url.PathEscape(pick(w)) + "/credits/consume",
			body:     body,
			header:   http.Header{"Idempotency-Key": {p.uniqueKey(scenario, w)}},
			want:     http.StatusOK,
			allow402: true,
		})
	}
}

func balanceOp(svc *service, p population) op {
	return func(ctx context.Context, w *worker) outcome {
		return svc.do(ctx, request{
			method: http.MethodGet,
			path:   "/v1/customers/" + url.PathEscape(p.pick(w)) + "/balance",
			want:   http.StatusOK,
		})
	}
}

// floorOp asks for /healthz, which answers from memory.
func floorOp(svc *service) op {
	return func(ctx context.Context, w *worker) outcome {
		return svc.do(ctx, request{method: http.MethodGet, path: "/healthz", want: http.StatusOK})
	}
}

// usageOp reports batches of size events with fresh identifiers. A 202
// whose events were not all accepted is an error: a wrong meter would
// otherwise look like a fast success.
func usageOp(svc *service, p population, meter string, size int) op {
	type event struct {
		CustomerID string `json:"customer_id"`
		Meter      string `json:"meter"`
		Value      int    `json:"value"`
		Identifier string `json:"identifier"`
	}
	type batch struct {
		Events []event `json:"events"`
	}
	type answer struct {
		Accepted int `json:"accepted"`
		Rejected int `json:"rejected"`
		Results  []struct {
			Status string `json:"status"`
			Code   string `json:"code"`
			Detail string `json:"detail"`
		} `json:"results"`
	}
	decode := func(data []byte) outcome {
		var a answer
		if err := json.Unmarshal(data, &a); err != nil {
			return outcome{errLabel: "bad 202 body", errDetail: snippet(data)}
		}
		if a.Accepted == size {
			return outcome{ok: true}
		}
		for _, r := range a.Results {
			if r.Status != "accepted" {
				return outcome{errLabel: "202 with " + r.Status + " " + r.Code, errDetail: r.Detail}
			}
		}
		return outcome{errLabel: "202 not all accepted", errDetail: snippet(data)}
	}
	return func(ctx context.Context, w *worker) outcome {
		b := batch{Events: make([]event, size)}
		prefix := p.uniqueKey("use", w)
		for i := range b.Events {
			b.Events[i] = event{CustomerID: p.pick(w), Meter: meter, Value: 1, Identifier: prefix + "_" + strconv.Itoa(i)}
		}
		body, err := json.Marshal(b)
		if err != nil {
			return outcome{errLabel: "request", errDetail: err.Error()}
		}
		return svc.do(ctx, request{
			method: http.MethodPost,
			path:   "/v1/usage-events",
			body:   body,
			want:   http.StatusAccepted,
			decode: decode,
		})
	}
}

// webhookParkedOp delivers a Stripe event signed as Stripe signs it, with a
// fresh event id each time. Its object is a PaymentIntent that names a tally
// payment which does not exist, so payment_intent.succeeded goes through
// signature check, storage and the validation chain, which refuses it and
// parks the event: the intake cost of an event that credits nothing.
func webhookParkedOp(svc *service, p population, secret, eventType string) op {
	decode := func(data []byte) outcome {
		var ack struct {
			Received  bool   `json:"received"`
			Status    string `json:"status"`
			Duplicate bool   `json:"duplicate"`
		}
		if err := json.Unmarshal(data, &ack); err != nil || !ack.Received {
			return outcome{errLabel: "bad 200 body", errDetail: snippet(data)}
		}
		tag := "stored as " + ack.Status
		if ack.Duplicate {
			tag += " (duplicate)"
		}
		return outcome{ok: true, tags: []string{tag}}
	}
	return func(ctx context.Context, w *worker) outcome {
		now := time.Now()
		payload, err := json.Marshal(stripeEvent(p.uniqueKey("evt_bench", w), eventType, p.pick(w), now))
		if err != nil {
			return outcome{errLabel: "request", errDetail: err.Error()}
		}
		return svc.do(ctx, request{
			method: http.MethodPost,
			path:   "/webhooks/stripe",
			body:   payload,
			header: http.Header{"Stripe-Signature": {sandbox.Sign(payload, secret, now)}},
			noAuth: true,
			want:   http.StatusOK,
			decode: decode,
		})
	}
}

// stripeAPIVersion is the API version of the stripe-go the server is built
// with; events carry it as Stripe's do.
const stripeAPIVersion = stripe.APIVersion

// stripeEvent is a payment_intent event for webhook-parked: its ids derive
// from the event id, and the payment it names does not exist.
func stripeEvent(id, eventType, customerID string, at time.Time) map[string]any {
	suffix := id[len("evt_bench"):]
	return stripeEnvelope(id, eventType, map[string]any{
		"id":              "pi_bench" + suffix,
		"object":          "payment_intent",
		"amount":          1000,
		"amount_received": 1000,
		"currency":        "usd",
		"status":          "succeeded",
		"livemode":        false,
		"created":         at.Unix(),
		"metadata": map[string]any{
			stripeapi.MetadataPaymentID:  "pay_bench" + suffix,
			stripeapi.MetadataCustomerID: customerID,
		},
	}, at)
}
