package db_test

import (
	"testing"

	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/errs"
)

// Every list takes 1 to MaxPageSize rows per page (openapi.yaml's Limit);
// anything else is invalid_request naming the limit parameter.
func TestCheckPageSize(t *testing.T) {
	t.Parallel()
	for _, n := range []int{1, 50, db.MaxPageSize} {
		if err := db.CheckPageSize(n); err != nil {
			t.Errorf("limit %d: %v", n, err)
		}
	}
	for _, n := range []int{-1, 0, db.MaxPageSize + 1} {
		err := db.CheckPageSize(n)
		e, ok := errs.As(err)
		if !ok || e.Code != errs.Invalid || len(e.Fields) != 1 || e.Fields[0].Pointer != "limit" ||
			e.Message != "limit must be between 1 and 500" {
			t.Errorf("limit %d: %#v, want invalid_request on limit", n, err)
		}
	}
}
