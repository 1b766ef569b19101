package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"strings"
)

// hold-capture measures a long job's way to pay: hold 2 credits, then
// capture 1 of them (the rest is released), each under its own
// Idempotency-Key. One operation is both requests. Servers without holds
// (before issue 10) answer the hold 404 "no such route" or 405, and the
// scenario is skipped with that reason.

const (
	holdAmount    = 2
	captureAmount = 1
)

// holdOutcome is the answer to POST .../credits/holds.
type holdOutcome struct {
	outcome
	holdID string
	// missing is true when the server has no holds endpoint.
	missing bool
}

func hold(ctx context.Context, svc *service, customer, key string) holdOutcome {
	var created struct {
		HoldID string `json:"hold_id"`
	}
	out := svc.do(ctx, request{
		method: http.MethodPost,
		path:   "/v1/customers/" + url.PathEscape(customer) + "/credits/holds",
		body:   fmt.Appendf(nil, `{"amount":%d,"reason":"tally-bench hold"}`, holdAmount),
		header: http.Header{"Idempotency-Key": {key}},
		want:   http.StatusCreated,
		decode: func(b []byte) outcome {
			if json.Unmarshal(b, &created) != nil || created.HoldID == "" {
				return outcome{errLabel: "hold: bad 201 body", errDetail: snippet(b)}
			}
			return outcome{ok: true}
		},
	})
	missing := strings.HasPrefix(out.errLabel, "HTTP 405") ||
		(strings.HasPrefix(out.errLabel, "HTTP 404") && strings.Contains(out.errDetail, "no such route"))
	return holdOutcome{outcome: out, holdID: created.HoldID, missing: missing}
}

func capture(ctx context.Context, svc *service, customer, holdID, key string) outcome {
	return svc.do(ctx, request{
		method: http.MethodPost,
		path:   "/v1/customers/" + url.PathEscape(customer) + "/credits/holds/" + url.PathEscape(holdID) + "/capture",
		body:   fmt.Appendf(nil, `{"amount":%d}`, captureAmount),
		header: http.Header{"Idempotency-Key": {key}},
		want:   http.StatusOK,
	})
}

// probeHolds makes one hold and captures it on customer, before the
// measurement: available is false when the server has no holds endpoint
// (why says what it answered); err is any other failure.
func probeHolds(ctx context.Context, svc *service, customer, runID string) (available bool, why string, err error) {
	h := hold(ctx, svc, customer, "bench-hold-probe-"+runID)
	if h.missing {
		return false, fmt.Sprintf("the server has no holds endpoint: POST /v1/customers/{id}/credits/holds answered %s (%s); issue 10 adds it",
			h.errLabel, h.errDetail), nil
	}
	if err := h.failure("probe hold"); err != nil {
		return false, "", err
	}
	if err := capture(ctx, svc, customer, h.holdID, "bench-capture-probe-"+runID).failure("probe capture"); err != nil {
		return false, "", err
	}
	return true, "", nil
}

// holdCaptureOp holds and captures on a random customer.
func holdCaptureOp(svc *service, p population) op {
	return func(ctx context.Context, w *worker) outcome {
		customer := p.pick(w)
		h := hold(ctx, svc, customer, p.uniqueKey("hold", w))
		if !h.ok {
			if h.errLabel != "" {
				h.errLabel = "hold: " + h.errLabel
			}
			return h.outcome
		}
		out := capture(ctx, svc, customer, h.holdID, p.uniqueKey("capture", w))
		if out.errLabel != "" {
			out.errLabel = "capture: " + out.errLabel
		}
		return out
	}
}

// inTurn runs first, then second, as one operation: second only when first
// succeeded, as a capture only follows a hold that was granted.
func inTurn(first, second op) op {
	return func(ctx context.Context, w *worker) outcome {
		if out := first(ctx, w); !out.ok {
			return out
		}
		return second(ctx, w)
	}
}
