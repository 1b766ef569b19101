package main

import (
	"bytes"
	"encoding/json"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/tallybilling/tally/internal/config"
)

// The server's log writes its times in UTC, as the API answers them, on a
// host in any zone (this suite's is hostZone): replicas in different zones
// then write lines one can sort and compare.
func TestLogTimesAreInUTC(t *testing.T) {
	t.Parallel()
	var buf bytes.Buffer
	cfg := config.Default()
	cfg.LogLevel = slog.LevelInfo
	newLogger(cfg, &buf).Info("a line", "expires_at", time.Date(2026, 12, 2, 10, 0, 0, 0, hostZone), "at", time.Now())
	var line map[string]any
	if err := json.Unmarshal(buf.Bytes(), &line); err != nil {
		t.Fatalf("%v: %s", err, buf.Bytes())
	}
	for _, k := range []string{"time", "expires_at", "at"} {
		if s, _ := line[k].(string); !strings.HasSuffix(s, "Z") {
			t.Errorf("log field %s is %q, want a time in UTC", k, line[k])
		}
	}
	if want := time.Date(2026, 12, 2, 10, 0, 0, 0, hostZone).UTC().Format(time.RFC3339); line["expires_at"] != want {
		t.Errorf("expires_at logged as %v, want the same instant in UTC", line["expires_at"])
	}
}
