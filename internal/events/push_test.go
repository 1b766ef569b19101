package events_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/db/dbtest"
	"github.com/tallybilling/tally/internal/events"
)

// Two instances push the feed to a host that fails at first: the host gets
// every event, correctly signed, in feed order, each accepted exactly once.
func TestPusherDeliversInOrderDespiteFailures(t *testing.T) {
	t.Parallel()
	gdb := dbtest.New(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	const secret = "whsec_host"
	const n = 30
	for i := range n {
		err := db.InTx(ctx, gdb, func(tx *gorm.DB) error {
			return events.Append(ctx, tx, "c1", events.CreditsLowBalance{CustomerID: "c1", Balance: int64(i)})
		})
		if err != nil {
			t.Fatal(err)
		}
	}

	var mu sync.Mutex
	var accepted []int
	calls := 0
	host := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		sig := r.Header.Get(events.SignatureHeader)
		ts, _, _ := strings.Cut(strings.TrimPrefix(sig, "t="), ",")
		var unix int64
		fmt.Sscan(ts, &unix)
		if sig != events.Sign(secret, time.Unix(unix, 0), body) {
			t.Errorf("bad signature %q", sig)
			w.WriteHeader(http.StatusBadRequest)
			return
		}
		mu.Lock()
		defer mu.Unlock()
		calls++
		if calls <= 3 || calls%7 == 0 {
			w.WriteHeader(http.StatusInternalServerError)
			return
		}
		var e struct {
			Type string
			Data struct{ Balance int }
		}
		if err := json.Unmarshal(body, &e); err != nil || e.Type != "credits.low_balance" || r.Header.Get("Tally-Event-Type") != e.Type {
			t.Errorf("body %s: %v", body, err)
		}
		accepted = append(accepted, e.Data.Balance)
	}))
	defer host.Close()

	logger := slog.New(slog.NewTextHandler(io.Discard, nil))
	opts := events.PusherOptions{DB: gdb, URL: host.URL, Secret: secret, Idle: 5 * time.Millisecond, MinBackoff: 5 * time.Millisecond,
		MaxBackoff: 20 * time.Millisecond, Logger: logger, Now: time.Now}
	var wg sync.WaitGroup
	for range 2 {
		p := events.NewPusher(opts)
		wg.Add(1)
		go func() { defer wg.Done(); _ = p.Run(ctx) }()
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		mu.Lock()
		got := len(accepted)
		mu.Unlock()
		if got >= n || time.Now().After(deadline) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	cancel()
	wg.Wait()
	mu.Lock()
	defer mu.Unlock()
	if len(accepted) != n {
		t.Fatalf("host accepted %d events, want %d: %v", len(accepted), n, accepted)
	}
	for i, got := range accepted {
		if got != i {
			t.Fatalf("accepted out of order or twice: %v", accepted)
		}
	}
}
