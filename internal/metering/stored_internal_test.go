package metering

import (
	"testing"

	"github.com/tallybilling/tally/internal/db/dbtest"
)

// Reading back the stored events of no identifiers (an empty array) finds
// none and fails nothing.
func TestStoredEventsOfNoIdentifiers(t *testing.T) {
	t.Parallel()
	gdb := dbtest.New(t)
	found, err := storedEvents(gdb, nil)
	if err != nil || len(found) != 0 {
		t.Errorf("stored events of no identifiers: %v, %v", found, err)
	}
}
