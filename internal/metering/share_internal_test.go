package metering

import (
	"fmt"
	"slices"
	"testing"
)

// The shares of the live workers add up to at most the limit, and a
// worker's share never grows when another joins: what lets workers that
// briefly see different sets of live workers stay under the limit together.
func TestSharesAddUpAndShrinkAsWorkersJoin(t *testing.T) {
	t.Parallel()
	for _, limit := range []float64{1, 20, 25, 25.5, 1000} {
		var ids []string
		prev := map[string]float64{}
		for n := 1; n <= 40; n++ {
			// Join in an order that lands new ids between existing ones.
			ids = append(ids, fmt.Sprintf("w%03d", (n*37)%101))
			slices.Sort(ids)
			sum := 0.0
			for _, id := range ids {
				s := shareOf(limit, ids, id)
				if s <= 0 {
					t.Fatalf("limit %v, %d workers: %s gets %v", limit, n, id, s)
				}
				if p, ok := prev[id]; ok && s > p {
					t.Errorf("limit %v: %s's share grew from %v to %v when worker %d joined", limit, id, p, s, n)
				}
				prev[id] = s
				sum += s
			}
			if sum > limit+1e-9 {
				t.Errorf("limit %v, %d workers: shares add up to %v", limit, n, sum)
			}
		}
	}
	if got := shareOf(20, []string{"a", "b", "c"}, "c"); got != 6 {
		t.Errorf("third of three at 20/s gets %v, want 6 (7+7+6)", got)
	}
	if got := shareOf(25.5, []string{"a"}, "a"); got != 25.5 {
		t.Errorf("a lone worker gets %v, want the whole limit 25.5", got)
	}
}
