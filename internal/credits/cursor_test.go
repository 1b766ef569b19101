package credits

import (
	"testing"

	"github.com/tallybilling/tally/internal/errs"
)

// FuzzParseCursor feeds the ledger's ?cursor= (outside input) to the parser:
// it never panics, refuses what it cannot read as invalid_request, and reads
// back every cursor formatCursor makes.
func FuzzParseCursor(f *testing.F) {
	for _, seed := range []string{"", formatCursor(1), formatCursor(1 << 62), "bDEuMA", "bDEuLTU", "l1.5", "%%%", "bDEu"} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, c string) {
		seq, err := parseCursor(c)
		if err != nil {
			if !errs.Is(err, errs.Invalid) {
				t.Fatalf("parseCursor(%q): %v, want invalid_request", c, err)
			}
			return
		}
		if seq < 1 {
			t.Fatalf("parseCursor(%q) = %d, want a positive position", c, seq)
		}
		if c != "" {
			if back, err := parseCursor(formatCursor(seq)); err != nil || back != seq {
				t.Fatalf("cursor of %d does not round-trip: %d, %v", seq, back, err)
			}
		}
	})
}
