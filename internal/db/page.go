package db

import (
	"fmt"

	"github.com/tallybilling/tally/internal/errs"
)

// MaxPageSize is the most rows one page of a list returns, whatever it
// lists (openapi.yaml's Limit parameter says the same).
const MaxPageSize = 500

// CheckPageSize refuses a page size outside 1 to MaxPageSize with
// errs.Invalid on the limit parameter.
func CheckPageSize(limit int) error {
	if limit < 1 || limit > MaxPageSize {
		return errs.InvalidField("limit", fmt.Sprintf("limit must be between 1 and %d", MaxPageSize))
	}
	return nil
}
