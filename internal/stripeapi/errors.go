package stripeapi

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/stripe/stripe-go/v82"

	"github.com/tallybilling/tally/internal/errs"
	"github.com/tallybilling/tally/internal/text"
)

// Kind says what went wrong with a Stripe request, in the terms a caller
// decides on: retry later, give up, or count as delivered.
type Kind string

const (
	// KindNetwork: no answer (timeout, refused or reset connection, context
	// deadline). Whether Stripe acted is unknown; retry with the same
	// idempotency key or identifier.
	KindNetwork Kind = "network"
	// KindRateLimited: Stripe answered 429; wait RetryAfter when given.
	KindRateLimited Kind = "rate_limited"
	// KindServer: Stripe answered 5xx or an unreadable success.
	KindServer Kind = "server"
	// KindConflict: Stripe answered 409, e.g. the same idempotency key is in
	// flight in another request.
	KindConflict Kind = "conflict"
	// KindInvalid: Stripe refused the request (4xx other than the ones
	// below); the same request will fail again.
	KindInvalid Kind = "invalid"
	// KindDuplicate: Stripe already holds a meter event with this
	// identifier, so the event counts as delivered.
	KindDuplicate Kind = "duplicate"
	// KindAuth: Stripe answered 401 or 403; the key is wrong or lacks rights.
	KindAuth Kind = "auth"
	// KindSessionExpired: the v2 meter event session token has expired;
	// open a new session and send the same events again.
	KindSessionExpired Kind = "session_expired"
)

// Error is the error of every failed Stripe call. It unwraps to an
// *errs.Error whose code is errs.RateLimited for KindRateLimited,
// errs.Unavailable for KindNetwork and errs.PaymentProviderError otherwise,
// so errs.CodeOf works on it; for KindNetwork the transport error (e.g.
// context.DeadlineExceeded) is further down the same chain.
type Error struct {
	Kind Kind
	// Op names the call, e.g. "create meter event".
	Op string
	// StatusCode is the HTTP status of Stripe's answer; 0 when none came.
	StatusCode int
	// Code and Message are Stripe's error code and message, when given.
	Code    string
	Message string
	// RetryAfter is Stripe's Retry-After header, 0 when absent.
	RetryAfter time.Duration
	// RequestID is Stripe's Request-Id, for support tickets.
	RequestID string

	app *errs.Error
}

func (e *Error) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "stripe: %s: %s", e.Op, e.Kind)
	var details []string
	if e.StatusCode != 0 {
		details = append(details, "status "+strconv.Itoa(e.StatusCode))
	}
	if e.Code != "" {
		details = append(details, "code "+e.Code)
	}
	if e.RetryAfter > 0 {
		details = append(details, "retry after "+e.RetryAfter.String())
	}
	if e.RequestID != "" {
		details = append(details, "request "+e.RequestID)
	}
	if len(details) > 0 {
		b.WriteString(" (" + strings.Join(details, ", ") + ")")
	}
	if e.Message != "" {
		b.WriteString(": " + e.Message)
	}
	return b.String()
}

// Unwrap exposes the tally error code (and, below it, a transport cause).
func (e *Error) Unwrap() error { return e.app }

// Retryable reports whether sending the same request again later may
// succeed: true for network failures, 429, 409, 5xx and an expired meter
// event session (after opening a new one); false for refusals, auth
// failures and duplicates (which are already delivered).
func (e *Error) Retryable() bool {
	switch e.Kind {
	case KindNetwork, KindRateLimited, KindServer, KindConflict, KindSessionExpired:
		return true
	}
	return false
}

// AsError returns the *Error in err's chain.
func AsError(err error) (*Error, bool) {
	var e *Error
	ok := errors.As(err, &e)
	return e, ok
}

// KindOf returns the Kind of the *Error in err's chain, or "" when there is none.
func KindOf(err error) Kind {
	if e, ok := AsError(err); ok {
		return e.Kind
	}
	return ""
}

// IsSessionExpired reports whether err says the v2 meter event session
// token has expired.
func IsSessionExpired(err error) bool { return KindOf(err) == KindSessionExpired }

// IsDuplicate reports whether err says Stripe already holds a meter event
// with the same identifier.
func IsDuplicate(err error) bool { return KindOf(err) == KindDuplicate }

func newError(kind Kind, op string, snap responseSnapshot, code, message string, cause error) *Error {
	e := &Error{
		Kind:       kind,
		Op:         op,
		StatusCode: snap.status,
		Code:       code,
		Message:    message,
		RetryAfter: parseRetryAfter(snap.header.Get("Retry-After"), time.Now()),
		RequestID:  snap.header.Get("Request-Id"),
	}
	appCode := errs.PaymentProviderError
	switch kind {
	case KindRateLimited:
		appCode = errs.RateLimited
	case KindNetwork:
		appCode = errs.Unavailable
	}
	// The cause kept here is never a stripe-go type, so none leaks out.
	e.app = &errs.Error{Code: appCode, Message: fmt.Sprintf("Stripe could not %s (%s)", op, kind), Err: cause, RetryAfter: e.RetryAfter}
	return e
}

// classify turns whatever stripe-go returned into an *Error. The response
// status and headers come from the capturing transport, because stripe-go
// keeps neither on v2 errors nor on answers whose body is not JSON.
func classify(op string, err error, capture *responseCapture, meterEvent bool) error {
	snap := capture.snapshot()

	var sessionExpired *stripe.TemporarySessionExpiredError
	if errors.As(err, &sessionExpired) {
		if lr := sessionExpired.LastResponse; lr != nil && snap.status == 0 {
			snap.status, snap.header = lr.StatusCode, lr.Header
		}
		return newError(KindSessionExpired, op, snap, sessionExpired.Code, sessionExpired.Message, nil)
	}
	var v1 *stripe.Error
	if errors.As(err, &v1) {
		if v1.HTTPStatusCode != 0 {
			snap.status = v1.HTTPStatusCode
		}
		if snap.header == nil && v1.LastResponse != nil {
			snap.header = v1.LastResponse.Header
		}
		code := string(v1.Code)
		e := newError(kindFor(snap.status, code, v1.Msg, meterEvent), op, snap, code, v1.Msg, nil)
		if e.RequestID == "" {
			e.RequestID = v1.RequestID
		}
		return e
	}
	var v2 *stripe.V2RawError
	if errors.As(err, &v2) {
		kind := kindFor(snap.status, v2.Code, v2.Message, meterEvent)
		if v2.Type != nil && *v2.Type == stripe.ErrorTypeTemporarySessionExpired {
			kind = KindSessionExpired
		}
		return newError(kind, op, snap, v2.Code, v2.Message, nil)
	}
	if isTransportError(err) {
		snap.status = 0
		return newError(KindNetwork, op, snap, "", err.Error(), err)
	}
	if snap.status >= 400 {
		// An error answer without Stripe's JSON error body (a proxy, a 502 page).
		return newError(kindFor(snap.status, "", "", meterEvent), op, snap, "", text.Truncate(err.Error(), 300), errors.New(err.Error()))
	}
	if snap.transportErr != nil {
		return newError(KindNetwork, op, snap, "", snap.transportErr.Error(), snap.transportErr)
	}
	if snap.status > 0 {
		// A success status whose body could not be read as the expected object.
		return newError(KindServer, op, snap, "", text.Truncate(err.Error(), 300), errors.New(err.Error()))
	}
	// No request left the process: stripe-go refused to build it.
	return newError(KindInvalid, op, snap, "", err.Error(), errors.New(err.Error()))
}

func kindFor(status int, code, message string, meterEvent bool) Kind {
	switch {
	case code == "billing_meter_event_session_expired":
		return KindSessionExpired
	case status == http.StatusTooManyRequests:
		return KindRateLimited
	case status == http.StatusUnauthorized || status == http.StatusForbidden:
		return KindAuth
	case meterEvent && status >= 400 && status < 500 && isDuplicateIdentifier(code, message):
		return KindDuplicate
	case status == http.StatusConflict:
		return KindConflict
	case status >= 500:
		return KindServer
	case status >= 400:
		return KindInvalid
	}
	return KindServer
}

// isDuplicateIdentifier recognises Stripe's refusal of a meter event whose
// identifier it already holds. Stripe documents no dedicated code for it;
// the answer is a 400 invalid_request_error whose message reads like "An
// event already exists with identifier X" (some integrations also see
// code resource_already_exists), so both the code and the wording count.
func isDuplicateIdentifier(code, message string) bool {
	if code == "resource_already_exists" {
		return true
	}
	m := strings.ToLower(message)
	if !strings.Contains(m, "identifier") {
		return false
	}
	return strings.Contains(m, "already exists") || strings.Contains(m, "already been used") || strings.Contains(m, "duplicate")
}

func isTransportError(err error) bool {
	var urlErr *url.Error
	var netErr net.Error
	return errors.As(err, &urlErr) || errors.As(err, &netErr) ||
		errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) ||
		errors.Is(err, io.ErrUnexpectedEOF)
}

// parseRetryAfter reads a Retry-After header: delay seconds or an HTTP date.
func parseRetryAfter(v string, now time.Time) time.Duration {
	v = strings.TrimSpace(v)
	if v == "" {
		return 0
	}
	if secs, err := strconv.ParseFloat(v, 64); err == nil {
		if secs <= 0 {
			return 0
		}
		return time.Duration(secs * float64(time.Second))
	}
	if t, err := http.ParseTime(v); err == nil {
		if d := t.Sub(now); d > 0 {
			return d
		}
	}
	return 0
}

// responseCapture records the last HTTP answer (or transport failure) of one
// Client call. It travels in the request context, so concurrent calls on
// the same Client never see each other's answers.
type responseCapture struct {
	mu   sync.Mutex
	snap responseSnapshot
}

type responseSnapshot struct {
	status       int
	header       http.Header
	transportErr error
}

type captureKey struct{}

func withCapture(ctx context.Context) (context.Context, *responseCapture) {
	c := &responseCapture{}
	return context.WithValue(ctx, captureKey{}, c), c
}

func (c *responseCapture) snapshot() responseSnapshot {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.snap
}

// capturingTransport notes each answer's status and headers in the
// request's responseCapture; it changes nothing else.
type capturingTransport struct {
	base http.RoundTripper
}

func (t *capturingTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	resp, err := t.base.RoundTrip(r)
	if c, ok := r.Context().Value(captureKey{}).(*responseCapture); ok {
		c.mu.Lock()
		if err != nil {
			c.snap = responseSnapshot{transportErr: err}
		} else {
			c.snap = responseSnapshot{status: resp.StatusCode, header: resp.Header.Clone()}
		}
		c.mu.Unlock()
	}
	return resp, err
}
