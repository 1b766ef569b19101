package db

import (
	"strings"

	"github.com/google/uuid"
)

// NewID returns a new identifier "<prefix>_<32 hex>" built on a UUIDv7, so ids
// sort by creation time (good for index locality and cursor pagination) and
// say what they name, as Stripe's do.
func NewID(prefix string) string {
	return prefix + "_" + strings.ReplaceAll(uuid.Must(uuid.NewV7()).String(), "-", "")
}
