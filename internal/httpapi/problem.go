package httpapi

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"reflect"
	"strconv"
	"strings"
	"time"

	"github.com/labstack/echo/v4"

	"github.com/tallybilling/tally/api"
	"github.com/tallybilling/tally/internal/errs"
)

// problemType is what one error code is on the wire: the HTTP status it is
// answered with, the problem's title and the value of the contract's
// ErrorCode enum.
type problemType struct {
	status int
	title  string
	code   api.ErrorCode
}

// problemTypes is the one place where an error code meets HTTP. Every
// errs code has a row and every ErrorCode of openapi.yaml belongs to one;
// TestEveryCodeIsInTheContract fails otherwise.
var problemTypes = map[errs.Code]problemType{
	errs.Invalid:                {http.StatusBadRequest, "Invalid request", api.ErrorCodeInvalidRequest},
	errs.Unauthorized:           {http.StatusUnauthorized, "Unauthorized", api.ErrorCodeUnauthorized},
	errs.Forbidden:              {http.StatusForbidden, "Forbidden", api.ErrorCodeForbidden},
	errs.NotFound:               {http.StatusNotFound, "Not found", api.ErrorCodeNotFound},
	errs.Conflict:               {http.StatusConflict, "Conflict", api.ErrorCodeConflict},
	errs.IdempotencyKeyReused:   {http.StatusUnprocessableEntity, "Idempotency key reused with a different request", api.ErrorCodeIdempotencyKeyReused},
	errs.IdempotencyKeyInFlight: {http.StatusConflict, "A request with this idempotency key is in flight", api.ErrorCodeIdempotencyKeyInFlight},
	errs.InsufficientCredits:    {http.StatusPaymentRequired, "Insufficient credits", api.ErrorCodeInsufficientCredits},
	errs.PayloadTooLarge:        {http.StatusRequestEntityTooLarge, "Payload too large", api.ErrorCodePayloadTooLarge},
	errs.RateLimited:            {http.StatusTooManyRequests, "Rate limited", api.ErrorCodeRateLimited},
	errs.PaymentProviderError:   {http.StatusBadGateway, "Payment provider error", api.ErrorCodePaymentProviderError},
	errs.Unavailable:            {http.StatusServiceUnavailable, "Service unavailable", api.ErrorCodeUnavailable},
	errs.Internal:               {http.StatusInternalServerError, "Internal error", api.ErrorCodeInternal},
	errs.IdentifierConflict:     {http.StatusConflict, "Identifier already used by another usage event", api.ErrorCodeIdentifierConflict},
}

// apiErrorCode is c as the contract spells it, for the codes that travel
// inside a 2xx body (a rejected usage event); a code without a row is
// internal, as it is in a problem.
func apiErrorCode(c errs.Code) api.ErrorCode {
	if t, ok := problemTypes[c]; ok {
		return t.code
	}
	return api.ErrorCodeInternal
}

// problemStatus lets a validation failure of a well-formed body answer 422
// while keeping the code invalid_request.
type problemStatus struct {
	err    *errs.Error
	status int
}

func (p *problemStatus) Error() string { return p.err.Error() }
func (p *problemStatus) Unwrap() error { return p.err }

// problemExtensions are the members a code may add to a problem from
// errs.Error.Extra, each as openapi.yaml declares it on Problem; a setter
// keeps only a value of the declared type. An Extra member not listed
// here, or of another type, never reaches a client: the body stays
// inside the contract.
var problemExtensions = map[string]func(p *api.Problem, v any){
	// insufficient_credits
	"balance": func(p *api.Problem, v any) {
		if n, ok := v.(int64); ok {
			p.Balance = &n
		}
	},
	"available": func(p *api.Problem, v any) {
		if n, ok := v.(int64); ok {
			p.Available = &n
		}
	},
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
		body := problem(e, status, rid)
		if secs := retryAfterSeconds(e.RetryAfter); secs > 0 && (status == http.StatusTooManyRequests || status == http.StatusServiceUnavailable) {
			c.Response().Header().Set("Retry-After", strconv.FormatInt(secs, 10))
			body.RetryAfterSeconds = &secs
		}
		b, _ := json.Marshal(body)
		c.Response().Header().Set(echo.HeaderContentType, "application/problem+json")
		c.Response().WriteHeader(status)
		if c.Request().Method != http.MethodHead {
			_, _ = c.Response().Write(b)
		}
	}
}

// problem is the body answering e with status: detail and request_id are
// always present, even when empty, errors only when fields are named, and
// the declared extensions that e carries.
func problem(e *errs.Error, status int, requestID string) api.Problem {
	t := problemTypes[e.Code]
	p := api.Problem{
		Type:      "/docs#error-" + string(e.Code),
		Title:     t.title,
		Status:    status,
		Detail:    &e.Message,
		Code:      t.code,
		RequestId: &requestID,
	}
	if len(e.Fields) > 0 {
		fields := make([]api.FieldError, len(e.Fields))
		for i, f := range e.Fields {
			fields[i] = api.FieldError{Pointer: f.Pointer, Detail: f.Detail}
		}
		p.Errors = &fields
	}
	for k, v := range e.Extra {
		if set, declared := problemExtensions[k]; declared {
			set(&p, v)
		}
	}
	return p
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
	if p := deadlineProblem(err); p != nil {
		return p, http.StatusServiceUnavailable
	}
	if e, ok := errs.As(err); ok {
		t, known := problemTypes[e.Code]
		status := t.status
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
			var ute *json.UnmarshalTypeError
			if errors.As(he.Internal, &ute) && ute.Type != nil && ute.Field != "" {
				return typeProblem(ute), http.StatusBadRequest
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

// typeProblem says in the contract's words what echo's binder answers with
// Go's ("Unmarshal type error: expected=int64, got=number 1e2, ..."): a
// value the schema accepted that the handler's type cannot hold, such as
// a whole number written 1e2 or 100.0, which JSON Schema counts as the
// integer 100 and Go's decoder refuses.
func typeProblem(ute *json.UnmarshalTypeError) *errs.Error {
	want := "of another type"
	switch ute.Type.Kind() {
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64,
		reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		want = "a whole number written without a fraction or an exponent"
	case reflect.Float32, reflect.Float64:
		want = "a number"
	case reflect.String:
		want = "a string"
	case reflect.Bool:
		want = "true or false"
	}
	// Go's path names a nested field without its array indexes
	// (events.quantity), so only a top-level one is a JSON pointer.
	if strings.Contains(ute.Field, ".") {
		detail := fmt.Sprintf("the field %s must be %s (got %s)", ute.Field, want, ute.Value)
		return &errs.Error{Code: errs.Invalid, Message: detail, Fields: []errs.FieldError{{Detail: detail}}, Err: ute}
	}
	pointer := "/" + ute.Field
	detail := fmt.Sprintf("%s must be %s (got %s)", pointer, want, ute.Value)
	return &errs.Error{Code: errs.Invalid, Message: detail, Fields: []errs.FieldError{{Pointer: pointer, Detail: detail}}, Err: ute}
}

func orDefault(s, def string) string {
	if s == "" {
		return def
	}
	return s
}

// deadlineProblem is the 503 for a request whose deadline passed
// (answerWithin) before the database or Stripe answered, where nothing
// said more (an error with a code other than internal keeps its answer):
// a retry may pass, and replays what did commit under its key.
func deadlineProblem(err error) *errs.Error {
	if !errors.Is(err, context.DeadlineExceeded) {
		return nil
	}
	if e, ok := errs.As(err); ok && e.Code != errs.Internal {
		return nil
	}
	return errs.Wrap(err, errs.Unavailable, "the request did not finish in time: the database or Stripe did not answer; retry it, with the same Idempotency-Key where it has one")
}
