package httpapi

import (
	"encoding/json"
	"errors"
	"log/slog"
	"net/http"
	"strconv"

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

// errorHandler writes every error as application/problem+json. Internal
// errors are logged with the request id and answered without details.
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
			if _, taken := body[k]; !taken {
				body[k] = v
			}
		}
		if e.Code == errs.RateLimited {
			if ra, ok := e.Extra["retry_after"].(int); ok {
				c.Response().Header().Set("Retry-After", strconv.Itoa(ra))
			}
		}
		b, _ := json.Marshal(body)
		c.Response().Header().Set(echo.HeaderContentType, "application/problem+json")
		c.Response().WriteHeader(status)
		if c.Request().Method != http.MethodHead {
			_, _ = c.Response().Write(b)
		}
	}
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
		return e, statusOf[e.Code]
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
