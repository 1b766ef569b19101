package db_test

import (
	"testing"

	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/db/dbtest"
)

// A batch goes to PostgreSQL as binary arrays: an empty one and one
// holding text PostgreSQL would have to quote or escape in its text form
// arrive as they are.
func TestArraysArriveAsTheyAre(t *testing.T) {
	t.Parallel()
	gdb := dbtest.New(t)
	for _, vs := range [][]string{nil, {}, {"a"}, {`q"u,o{t}e\`, "NULL", "", " x "}} {
		var got []string
		if err := gdb.Raw(`SELECT unnest(?::text[])`, db.Array(vs)).Scan(&got).Error; err != nil {
			t.Fatalf("%q: %v", vs, err)
		}
		if len(got) != len(vs) {
			t.Fatalf("%q came back as %q", vs, got)
		}
		for i := range vs {
			if got[i] != vs[i] {
				t.Errorf("%q came back as %q", vs, got)
			}
		}
	}
}
