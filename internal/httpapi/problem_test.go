package httpapi

import (
	"context"
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
	t.Parallel()
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
		{
			name:   "a gate's status wins over the code's",
			err:    &problemStatus{err: errs.InvalidField("/name", "bad"), status: http.StatusUnprocessableEntity},
			status: http.StatusUnprocessableEntity, code: errs.Invalid,
		},
		{
			name:   "a body read past its limit",
			err:    fmt.Errorf("read: %w", &http.MaxBytesError{Limit: 10}),
			status: http.StatusRequestEntityTooLarge, code: errs.PayloadTooLarge,
			members: map[string]any{"detail": "the request body is larger than 10 bytes"},
		},
		{
			name:   "echo's bind error around a body read past its limit",
			err:    echo.NewHTTPError(http.StatusBadRequest, "bind").SetInternal(&http.MaxBytesError{Limit: 7}),
			status: http.StatusRequestEntityTooLarge, code: errs.PayloadTooLarge,
		},
		{
			name:   "no such route",
			err:    echo.ErrNotFound,
			status: http.StatusNotFound, code: errs.NotFound,
			members: map[string]any{"detail": "no such route"},
		},
		{
			name:   "method not allowed keeps 405",
			err:    echo.ErrMethodNotAllowed,
			status: http.StatusMethodNotAllowed, code: errs.Invalid,
		},
		{
			name:   "unsupported media type keeps 415",
			err:    echo.ErrUnsupportedMediaType,
			status: http.StatusUnsupportedMediaType, code: errs.Invalid,
		},
		{
			name:   "echo's 401 with its message",
			err:    echo.NewHTTPError(http.StatusUnauthorized, "no key"),
			status: http.StatusUnauthorized, code: errs.Unauthorized,
			members: map[string]any{"detail": "no key"},
		},
		{
			name:   "echo's 403 is forbidden",
			err:    echo.ErrForbidden,
			status: http.StatusForbidden, code: errs.Forbidden,
		},
		{
			name:   "echo's 429 is rate_limited",
			err:    echo.ErrTooManyRequests,
			status: http.StatusTooManyRequests, code: errs.RateLimited,
		},
		{
			name:   "echo's 503 is unavailable",
			err:    echo.ErrServiceUnavailable,
			status: http.StatusServiceUnavailable, code: errs.Unavailable,
		},
		{
			name:   "another echo 4xx is invalid_request with its status",
			err:    echo.NewHTTPError(http.StatusRequestHeaderFieldsTooLarge),
			status: http.StatusRequestHeaderFieldsTooLarge, code: errs.Invalid,
			members: map[string]any{"detail": "Request Header Fields Too Large"},
		},
		{
			name:   "an echo 5xx is internal",
			err:    echo.NewHTTPError(http.StatusBadGateway, "leaky upstream"),
			status: http.StatusInternalServerError, code: errs.Internal,
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

// Clients and recorded answers compare problem bodies as bytes (an
// idempotent replay must match the first answer), so the members, their
// order and which empty ones are present are pinned here.
func TestProblemBodyBytes(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		name string
		err  error
		want string
	}{
		{
			name: "every member",
			err: &errs.Error{Code: errs.InsufficientCredits, Message: "short <by> 3",
				Fields: []errs.FieldError{{Pointer: "/amount", Detail: "too many"}}, Extra: map[string]any{"balance": int64(2)}},
			want: `{"balance":2,"code":"insufficient_credits","detail":"short \u003cby\u003e 3","errors":[{"detail":"too many","pointer":"/amount"}],"request_id":"req_1","status":402,"title":"Insufficient credits","type":"/docs#error-insufficient_credits"}`,
		},
		{
			name: "empty detail stays",
			err:  &errs.Error{Code: errs.NotFound},
			want: `{"code":"not_found","detail":"","request_id":"req_1","status":404,"title":"Not found","type":"/docs#error-not_found"}`,
		},
		{
			name: "retry after",
			err:  &errs.Error{Code: errs.Unavailable, Message: "down", RetryAfter: 2 * time.Second},
			want: `{"code":"unavailable","detail":"down","request_id":"req_1","retry_after_seconds":2,"status":503,"title":"Service unavailable","type":"/docs#error-unavailable"}`,
		},
		{
			name: "internal hides its message",
			err:  errors.New("secret"),
			want: `{"code":"internal","detail":"an internal error occurred; the request id identifies it in the logs","request_id":"req_1","status":500,"title":"Internal error","type":"/docs#error-internal"}`,
		},
		{
			name: "validation at 422 keeps its code",
			err:  errs.UnprocessableField("/quantity", "too many credits"),
			want: `{"code":"invalid_request","detail":"too many credits","errors":[{"detail":"too many credits","pointer":"/quantity"}],"request_id":"req_1","status":422,"title":"Invalid request","type":"/docs#error-invalid_request"}`,
		},
	} {
		t.Run(c.name, func(t *testing.T) {
			rec := serveError(t, http.MethodPost, "req_1", c.err)
			if got := rec.Body.String(); got != c.want {
				t.Errorf("body\n got %s\nwant %s", got, c.want)
			}
		})
	}
}

// serveError runs errorHandler on err for a request with the given method
// and request id, as the middleware chain would.
func serveError(t *testing.T, method, rid string, err error) *httptest.ResponseRecorder {
	t.Helper()
	e := echo.New()
	req := httptest.NewRequest(method, "/v1/checkout-sessions", nil)
	req = req.WithContext(context.WithValue(req.Context(), requestIDKey, rid))
	rec := httptest.NewRecorder()
	errorHandler(slog.New(slog.DiscardHandler))(err, e.NewContext(req, rec))
	return rec
}

// A HEAD request gets the problem's status and headers without a body; a
// response already written is left as it is.
func TestProblemHeadAndCommitted(t *testing.T) {
	t.Parallel()
	rec := serveError(t, http.MethodHead, "req_1", errs.E(errs.NotFound, "gone"))
	if rec.Code != http.StatusNotFound || rec.Body.Len() != 0 || rec.Header().Get("Content-Type") != "application/problem+json" {
		t.Errorf("HEAD: status %d, %d body bytes, Content-Type %q", rec.Code, rec.Body.Len(), rec.Header().Get("Content-Type"))
	}

	e := echo.New()
	rec = httptest.NewRecorder()
	c := e.NewContext(httptest.NewRequest(http.MethodGet, "/", nil), rec)
	if err := c.String(http.StatusOK, "done"); err != nil {
		t.Fatal(err)
	}
	errorHandler(slog.New(slog.DiscardHandler))(errs.E(errs.Conflict, "late"), c)
	if rec.Code != http.StatusOK || rec.Body.String() != "done" {
		t.Errorf("committed response changed: %d %q", rec.Code, rec.Body)
	}
}

func TestRetryAfterSeconds(t *testing.T) {
	t.Parallel()
	for d, want := range map[time.Duration]int64{
		-time.Second: 0, 0: 0, time.Nanosecond: 1, time.Second: 1, time.Second + time.Millisecond: 2, 90 * time.Second: 90,
	} {
		if got := retryAfterSeconds(d); got != want {
			t.Errorf("retryAfterSeconds(%v) = %d, want %d", d, got, want)
		}
	}
}
