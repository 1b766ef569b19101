package errs_test

import (
	"errors"
	"fmt"
	"testing"

	"github.com/tallybilling/tally/internal/errs"
)

// A code survives wrapping, and anything without one is internal: the HTTP
// layer answers by CodeOf, so a lost code would be a 500 or a leak.
func TestCodeOf(t *testing.T) {
	t.Parallel()
	cause := errors.New("db down")
	for _, c := range []struct {
		name string
		err  error
		want errs.Code
	}{
		{"coded", errs.E(errs.NotFound, "no %s", "x"), errs.NotFound},
		{"wrapped by fmt", fmt.Errorf("read: %w", errs.E(errs.Conflict, "taken")), errs.Conflict},
		{"the outer code wins", errs.Wrap(errs.E(errs.NotFound, "inner"), errs.Unavailable, "outer"), errs.Unavailable},
		{"uncoded", cause, errs.Internal},
		{"nil", nil, errs.Internal},
	} {
		t.Run(c.name, func(t *testing.T) {
			if got := errs.CodeOf(c.err); got != c.want {
				t.Errorf("CodeOf = %q, want %q", got, c.want)
			}
		})
	}
	if errs.Is(nil, errs.Internal) {
		t.Error("Is(nil, Internal): no error carries no code")
	}
	w := errs.Wrap(cause, errs.Unavailable, "database %s", "unreachable")
	if !errors.Is(w, cause) || w.Message != "database unreachable" || w.Error() != "unavailable: database unreachable: db down" {
		t.Errorf("Wrap = %v (message %q), want the cause kept and hidden from the message", w, w.Message)
	}
	if e, ok := errs.As(fmt.Errorf("x: %w", w)); !ok || e != w {
		t.Errorf("As = %v, %v", e, ok)
	}
}

func TestFieldErrors(t *testing.T) {
	t.Parallel()
	e := errs.InvalidField("/amount", "must be positive")
	if e.Code != errs.Invalid || e.Unprocessable || len(e.Fields) != 1 || e.Fields[0] != (errs.FieldError{Pointer: "/amount", Detail: "must be positive"}) {
		t.Errorf("InvalidField = %+v", e)
	}
	u := errs.UnprocessableField("/quantity", "too many")
	if u.Code != errs.Invalid || !u.Unprocessable || u.Fields[0].Pointer != "/quantity" {
		t.Errorf("UnprocessableField = %+v", u)
	}
}
