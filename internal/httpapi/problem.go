package httpapi

import (
	"encoding/json"
	"errors"
	"log/slog"
	"net/http"
	"strconv"
	"time"

	"github.com/labstack/echo/v4"

	"github.com/tallybilling/tally/internal/errs"
)

// statusOf is the one place where an error code becomes an HTTP status.
var statusOf = map[errs.Code]int{
	errs.Invalid:                http.StatusBadRequest,
	errs.Unauthorized:           http.StatusUnauthorized,
	errs.Forbidden:              http.StatusForbidden,
	errs.NotFound:               http.StatusNotFound,
	errs.Conflict:               http.StatusConflict,
	errs.IdempotencyKeyReused:   http.StatusUnprocessableEntity,
	errs.IdempotencyKeyInFlight: http.StatusConflict,
	errs.InsufficientCredits:    http.StatusPaymentRequired,
	errs.PayloadTooLarge:        http.StatusRequestEntityTooLarge,
	errs.RateLimited:            http.StatusTooManyRequests,
	errs.PaymentProviderError:   http.StatusBadGateway,
	errs.Unavailable:            http.StatusServiceUnavailable,
	errs.Internal:               http.StatusInternalServerError,
	errs.IdentifierConflict:     http.StatusConflict,
}

var titleOf = map[errs.Code]string{
	errs.Invalid:                "Invalid request",
	errs.Unauthorized:           "Unauthorized",
	errs.Forbidden:              "Forbidden",
	errs.NotFound:               "Not found",
	errs.Conflict:               "Conflict",
	errs.IdempotencyKeyReused:   "Idempotency key reused with a different request",
	errs.IdempotencyKeyInFlight: "A request with this idempotency key is in flight",
	errs.InsufficientCredits:    "Insufficient credits",
	errs.PayloadTooLarge:        "Payload too large",
	errs.RateLimited:            "Rate limited",
	errs.PaymentProviderError:   "Payment provider error",
	errs.Unavailable:            "Service unavailable",
	errs.Internal:               "Internal error",
	errs.IdentifierConflict:     "Identifier already used by another usage event",
}

// problemStatus lets a validation failure of a well-formed body answer 422
// while keeping the code invalid_request.
type problemStatus struct {
	err    *errs.Error
	status int
}

func (p *problemStatus) Error() string { return p.err.Error() }
func (p *problemStatus) Unwrap() error { return p.err }

// problemMembers are the members a code may add to a problem, as
// openapi.yaml declares them on Problem. An Extra member not listed here
// never reaches a client: the body stays inside the contract.
var problemMembers = map[string]bool{
	"balance": true, // insufficient_credits
}

// errorHandler writes every error as application/problem+json. Internal
// errors are logged with the request id and answered without details.
// A 429 or 503 whose error knows when to come back carries Retry-After
// (whole seconds, rounded up) and the same number as retry_after_seconds.
func errorHandler(logger *slog.Logger) echo.HTTPErrorHandler {
	return func(err error, c echo.Context) {
		if c.Response().Committed {
			return
		}
		e, status := classify(err)
		rid := requestID(c.Request().Context())
		if e.Code == errs.Internal {
			logger.ErrorContext(c.Request().Context(), "internal error", "request_id", rid, "error", err.Error(),
				"method", c.Request().Method, "path", c.Path())
			e = &errs.Error{Code: errs.Internal, Message: "an internal error occurred; the request id identifies it in the logs"}
		} else if e.Code == errs.Unavailable {
			logger.WarnContext(c.Request().Context(), "unavailable", "request_id", rid, "error", err.Error())
		}
		body := map[string]any{
			"type":       "/docs#error-" + string(e.Code),
			"title":      titleOf[e.Code],
			"status":     status,
			"detail":     e.Message,
			"code":       e.Code,
			"request_id": rid,
		}
		if len(e.Fields) > 0 {
			fields := make([]map[string]string, len(e.Fields))
			for i, f := range e.Fields {
				fields[i] = map[string]string{"pointer": f.Pointer, "detail": f.Detail}
			}
			body["errors"] = fields
		}
		for k, v := range e.Extra {
			if _, taken := body[k]; !taken && problemMembers[k] {
				body[k] = v
			}
		}
		if secs := retryAfterSeconds(e.RetryAfter); secs > 0 && (status == http.StatusTooManyRequests || status == http.StatusServiceUnavailable) {
			c.Response().Header().Set("Retry-After", strconv.FormatInt(secs, 10))
			body["retry_after_seconds"] = secs
		}
		b, _ := json.Marshal(body)
		c.Response().Header().Set(echo.HeaderContentType, "application/problem+json")
		c.Response().WriteHeader(status)
		if c.Request().Method != http.MethodHead {
			_, _ = c.Response().Write(b)
		}
	}
}

// retryAfterSeconds rounds d up to whole seconds, as Retry-After counts them.
func retryAfterSeconds(d time.Duration) int64 {
	if d <= 0 {
		return 0
	}
	return int64((d + time.Second - 1) / time.Second)
}

// classify turns any error into a coded error and the status to answer.
func classify(err error) (*errs.Error, int) {
	var ps *problemStatus
	if errors.As(err, &ps) {
		return ps.err, ps.status
	}
	var mbe *http.MaxBytesError
	if errors.As(err, &mbe) {
		return errs.E(errs.PayloadTooLarge, "the request body is larger than %d bytes", mbe.Limit), http.StatusRequestEntityTooLarge
	}
	if e, ok := errs.As(err); ok {
		status, known := statusOf[e.Code]
		switch {
		case !known:
			// A code without a status is a programming error: answer it as
			// the internal error it is, never with status 0.
			return &errs.Error{Code: errs.Internal, Err: err}, http.StatusInternalServerError
		case e.Code == errs.Invalid && e.Unprocessable:
			status = http.StatusUnprocessableEntity
		}
		return e, status
	}
	var he *echo.HTTPError
	if errors.As(err, &he) {
		if he.Internal != nil {
			if errors.As(he.Internal, &mbe) {
				return errs.E(errs.PayloadTooLarge, "the request body is larger than %d bytes", mbe.Limit), http.StatusRequestEntityTooLarge
			}
		}
		msg, _ := he.Message.(string)
		switch he.Code {
		case http.StatusNotFound:
			return errs.E(errs.NotFound, "no such route"), http.StatusNotFound
		case http.StatusMethodNotAllowed:
			return errs.E(errs.Invalid, "method not allowed on this route"), http.StatusMethodNotAllowed
		case http.StatusRequestEntityTooLarge:
			return errs.E(errs.PayloadTooLarge, "the request body is too large"), http.StatusRequestEntityTooLarge
		case http.StatusUnsupportedMediaType:
			return errs.E(errs.Invalid, "unsupported content type; send application/json"), http.StatusUnsupportedMediaType
		case http.StatusUnauthorized:
			return errs.E(errs.Unauthorized, "%s", orDefault(msg, "missing or invalid credentials")), http.StatusUnauthorized
		case http.StatusForbidden:
			return errs.E(errs.Forbidden, "%s", orDefault(msg, "forbidden")), http.StatusForbidden
		case http.StatusTooManyRequests:
			return errs.E(errs.RateLimited, "%s", orDefault(msg, "too many requests")), http.StatusTooManyRequests
		case http.StatusServiceUnavailable:
			return errs.E(errs.Unavailable, "%s", orDefault(msg, "unavailable")), http.StatusServiceUnavailable
		}
		if he.Code >= 400 && he.Code < 500 {
			return errs.E(errs.Invalid, "%s", orDefault(msg, http.StatusText(he.Code))), he.Code
		}
	}
	return &errs.Error{Code: errs.Internal, Err: err}, http.StatusInternalServerError
}

func orDefault(s, def string) string {
	if s == "" {
		return def
	}
	return s
}
