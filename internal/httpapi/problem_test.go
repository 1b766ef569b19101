package httpapi

import (
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/labstack/echo/v4"

	"github.com/tallybilling/tally/internal/errs"
)

// Every error becomes a problem+json answer whose status, Retry-After
// header and members a client can rely on; the table covers each rule of
// errorHandler.
func TestProblemAnswers(t *testing.T) {
	for _, c := range []struct {
		name       string
		err        error
		status     int
		code       errs.Code
		retryAfter string         // the header; "" means absent
		members    map[string]any // members that must be in the body (JSON numbers as float64)
		absent     []string       // members that must not be
	}{
		{
			name:   "rate limited with a known wait",
			err:    &errs.Error{Code: errs.RateLimited, Message: "slow down", RetryAfter: 3 * time.Second},
			status: http.StatusTooManyRequests, code: errs.RateLimited, retryAfter: "3",
			members: map[string]any{"retry_after_seconds": float64(3)},
		},
		{
			name:   "a fraction of a second rounds up",
			err:    fmt.Errorf("wrapped: %w", &errs.Error{Code: errs.RateLimited, Message: "slow down", RetryAfter: 1500 * time.Millisecond}),
			status: http.StatusTooManyRequests, code: errs.RateLimited, retryAfter: "2",
			members: map[string]any{"retry_after_seconds": float64(2)},
		},
		{
			name:   "unavailable with a known wait",
			err:    &errs.Error{Code: errs.Unavailable, Message: "down", RetryAfter: 30 * time.Second},
			status: http.StatusServiceUnavailable, code: errs.Unavailable, retryAfter: "30",
			members: map[string]any{"retry_after_seconds": float64(30)},
		},
		{
			name:   "rate limited without a known wait",
			err:    errs.E(errs.RateLimited, "slow down"),
			status: http.StatusTooManyRequests, code: errs.RateLimited,
			absent: []string{"retry_after_seconds"},
		},
		{
			name:   "a wait on another status is not advertised",
			err:    &errs.Error{Code: errs.PaymentProviderError, Message: "Stripe failed", RetryAfter: 5 * time.Second},
			status: http.StatusBadGateway, code: errs.PaymentProviderError,
			absent: []string{"retry_after_seconds"},
		},
		{
			name:   "declared members are kept, undeclared ones dropped",
			err:    &errs.Error{Code: errs.InsufficientCredits, Message: "short", Extra: map[string]any{"balance": int64(5), "retry_after_seconds": int64(9), "secret": "x"}},
			status: http.StatusPaymentRequired, code: errs.InsufficientCredits,
			members: map[string]any{"balance": float64(5)},
			absent:  []string{"retry_after_seconds", "secret"},
		},
		{
			name:   "an extra never overrides a standard member",
			err:    &errs.Error{Code: errs.Conflict, Message: "taken", Extra: map[string]any{"status": 200, "code": "ok"}},
			status: http.StatusConflict, code: errs.Conflict,
			members: map[string]any{"status": float64(409), "code": "conflict"},
		},
		{
			name:   "an unknown code is an internal error",
			err:    &errs.Error{Code: errs.Code("made_up"), Message: "leaky detail"},
			status: http.StatusInternalServerError, code: errs.Internal,
		},
		{
			name:   "an error without a code is internal",
			err:    errors.New("boom: leaky detail"),
			status: http.StatusInternalServerError, code: errs.Internal,
		},
		{
			name:   "invalid is 400",
			err:    errs.InvalidField("/item", "unknown"),
			status: http.StatusBadRequest, code: errs.Invalid,
		},
		{
			name:   "unprocessable invalid is 422",
			err:    errs.UnprocessableField("/quantity", "too many credits"),
			status: http.StatusUnprocessableEntity, code: errs.Invalid,
		},
	} {
		t.Run(c.name, func(t *testing.T) {
			e := echo.New()
			req := httptest.NewRequest(http.MethodPost, "/v1/checkout-sessions", nil)
			rec := httptest.NewRecorder()
			errorHandler(slog.New(slog.DiscardHandler))(c.err, e.NewContext(req, rec))

			if rec.Code != c.status {
				t.Fatalf("status %d, want %d; body %s", rec.Code, c.status, rec.Body)
			}
			if got := rec.Header().Get("Retry-After"); got != c.retryAfter {
				t.Errorf("Retry-After %q, want %q", got, c.retryAfter)
			}
			if ct := rec.Header().Get("Content-Type"); ct != "application/problem+json" {
				t.Errorf("Content-Type %q", ct)
			}
			var body map[string]any
			if err := json.Unmarshal(rec.Body.Bytes(), &body); err != nil {
				t.Fatalf("body is not JSON: %v: %s", err, rec.Body)
			}
			if body["code"] != string(c.code) || body["status"] != float64(c.status) {
				t.Errorf("body code %v status %v, want %s %d", body["code"], body["status"], c.code, c.status)
			}
			for k, want := range c.members {
				if body[k] != want {
					t.Errorf("member %s = %v (%T), want %v", k, body[k], body[k], want)
				}
			}
			for _, k := range c.absent {
				if v, ok := body[k]; ok {
					t.Errorf("member %s = %v leaked into the body", k, v)
				}
			}
			if c.code == errs.Internal && strings.Contains(rec.Body.String(), "leaky") {
				t.Errorf("an internal error leaked its detail: %s", rec.Body)
			}
		})
	}
}
