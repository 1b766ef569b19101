// Package errs is tally's one error vocabulary. Domain packages return errors
// that carry a stable Code; internal/httpapi maps each code to an HTTP status
// and a problem+json body in one place. Anything without a code is internal
// and is answered without details.
package errs

import (
	"errors"
	"fmt"
	"time"
)

// Code is a stable, documented error code: a value of the ErrorCode enum of
// openapi.yaml, which clients switch on.
type Code string

// The codes. Each is a value of openapi.yaml's ErrorCode and has a row (its
// status and title) in internal/httpapi's problemTypes; a test there fails
// when one of the three lacks a code the others have.
const (
	Invalid                Code = "invalid_request"
	Unauthorized           Code = "unauthorized"
	Forbidden              Code = "forbidden"
	NotFound               Code = "not_found"
	Conflict               Code = "conflict"
	IdempotencyKeyReused   Code = "idempotency_key_reused"
	IdempotencyKeyInFlight Code = "idempotency_key_in_flight"
	InsufficientCredits    Code = "insufficient_credits"
	PayloadTooLarge        Code = "payload_too_large"
	RateLimited            Code = "rate_limited"
	PaymentProviderError   Code = "payment_provider_error"
	Unavailable            Code = "unavailable"
	Internal               Code = "internal"
	// IdentifierConflict: a usage event's identifier is already stored for
	// another event (another customer, meter, value or timestamp). It is
	// the code of a per-event intake result, not of a whole request.
	IdentifierConflict Code = "identifier_conflict"
)

// FieldError names one offending field of a request by JSON pointer.
type FieldError struct {
	Pointer string
	Detail  string
}

// Error is an error with a stable code, a human-readable message and optional
// structured extras that the HTTP layer renders as problem+json members.
type Error struct {
	Code    Code
	Message string
	// Fields lists offending fields for invalid_request.
	Fields []FieldError
	// Extra holds code-specific members, e.g. "balance" for insufficient_credits.
	// Only members openapi.yaml declares on Problem reach a client.
	Extra map[string]any
	// RetryAfter, when positive, is how long the caller should wait before
	// trying again (rate_limited, unavailable); the HTTP layer sends it as
	// Retry-After and retry_after_seconds.
	RetryAfter time.Duration
	// Unprocessable marks an Invalid error about a well-formed request that
	// asks for something tally cannot do (answered 422 rather than 400).
	Unprocessable bool
	// Err is the underlying cause, kept for logs and errors.Is; never shown.
	Err error
}

func (e *Error) Error() string {
	if e.Err != nil {
		return fmt.Sprintf("%s: %s: %v", e.Code, e.Message, e.Err)
	}
	return fmt.Sprintf("%s: %s", e.Code, e.Message)
}

func (e *Error) Unwrap() error { return e.Err }

// E builds an *Error with a formatted message.
func E(code Code, format string, args ...any) *Error {
	return &Error{Code: code, Message: fmt.Sprintf(format, args...)}
}

// Wrap builds an *Error that keeps err as its hidden cause.
func Wrap(err error, code Code, format string, args ...any) *Error {
	return &Error{Code: code, Message: fmt.Sprintf(format, args...), Err: err}
}

// InvalidField is the invalid_request error for one field.
func InvalidField(pointer, detail string) *Error {
	return &Error{Code: Invalid, Message: detail, Fields: []FieldError{{Pointer: pointer, Detail: detail}}}
}

// UnprocessableField is the invalid_request error for one field of a
// well-formed request whose value, though valid on its own, cannot be
// honoured (a quantity whose credits exceed the largest grant).
func UnprocessableField(pointer, detail string) *Error {
	e := InvalidField(pointer, detail)
	e.Unprocessable = true
	return e
}

// CodeOf returns the code of the first *Error in err's chain, or Internal.
func CodeOf(err error) Code {
	var e *Error
	if errors.As(err, &e) {
		return e.Code
	}
	return Internal
}

// Is reports whether err carries code.
func Is(err error, code Code) bool { return err != nil && CodeOf(err) == code }

// As returns the first *Error in err's chain.
func As(err error) (*Error, bool) {
	var e *Error
	ok := errors.As(err, &e)
	return e, ok
}
