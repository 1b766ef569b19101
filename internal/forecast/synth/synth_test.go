package synth

import (
	"bytes"
	"flag"
	"os"
	"path/filepath"
	"testing"
)

var update = flag.Bool("update", false, "rewrite testdata/series.csv and testdata/series.md from Set")

// The committed series set is what Set generates: the backtest figures in
// BENCHMARKS.md are reproducible from the generator, and a change to the
// generator cannot leave a stale file behind.
func TestCommittedSetIsGenerated(t *testing.T) {
	t.Parallel()
	set := Set()
	var csv, index bytes.Buffer
	if err := WriteCSV(&csv, set); err != nil {
		t.Fatal(err)
	}
	if err := WriteIndex(&index, set); err != nil {
		t.Fatal(err)
	}
	for name, want := range map[string][]byte{"series.csv": csv.Bytes(), "series.md": index.Bytes()} {
		path := filepath.Join("..", "testdata", name)
		if *update {
			if err := os.WriteFile(path, want, 0o644); err != nil {
				t.Fatal(err)
			}
			continue
		}
		got, err := os.ReadFile(path)
		if err != nil {
			t.Fatalf("%v (run go test ./internal/forecast/synth -update)", err)
		}
		if !bytes.Equal(got, want) {
			t.Errorf("%s differs from what Set generates; run go test ./internal/forecast/synth -update", path)
		}
	}
}

// Set is deterministic: two calls give the same days.
func TestSetIsDeterministic(t *testing.T) {
	t.Parallel()
	a, b := Set(), Set()
	if len(a) != len(b) {
		t.Fatalf("%d series, then %d", len(a), len(b))
	}
	for i := range a {
		if a[i].ID != b[i].ID || !equal(a[i].Daily, b[i].Daily) {
			t.Fatalf("series %s differs between two calls", a[i].ID)
		}
	}
}

func equal(a, b []float64) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}
