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
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
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

// The push does not stall silently: while the host fails, the failures
// count up, the failing time and the lag of the oldest undelivered event
// grow; once the host answers again both are back to 0.
func TestPusherMetricsShowAFailingReceiver(t *testing.T) {
	t.Parallel()
	gdb := dbtest.New(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	err := db.InTx(ctx, gdb, func(tx *gorm.DB) error {
		return events.Append(ctx, tx, "c1", events.CreditsLowBalance{CustomerID: "c1", Balance: 1})
	})
	if err != nil {
		t.Fatal(err)
	}
	var failing atomic.Bool
	failing.Store(true)
	host := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if failing.Load() {
			w.WriteHeader(http.StatusServiceUnavailable)
		}
	}))
	defer host.Close()
	reg := prometheus.NewRegistry()
	p := events.NewPusher(events.PusherOptions{DB: gdb, URL: host.URL, Secret: "s", MinBackoff: 10 * time.Millisecond,
		MaxBackoff: 20 * time.Millisecond, Idle: 10 * time.Millisecond, Registry: reg})
	done := make(chan struct{})
	go func() { defer close(done); _ = p.Run(ctx) }()

	metric := func(name string) float64 {
		mfs, err := reg.Gather()
		if err != nil {
			t.Fatal(err)
		}
		for _, mf := range mfs {
			if mf.GetName() == name {
				m := mf.GetMetric()[0]
				if m.Counter != nil {
					return m.Counter.GetValue()
				}
				return m.Gauge.GetValue()
			}
		}
		t.Fatalf("no metric %s", name)
		return 0
	}
	deadline := time.Now().Add(10 * time.Second)
	for metric("tally_events_push_failures_total") < 3 || metric("tally_events_push_failing_seconds") <= 0.05 || metric("tally_events_push_lag_seconds") <= 0 {
		if time.Now().After(deadline) {
			t.Fatalf("while failing: failures %v, failing %v s, lag %v s", metric("tally_events_push_failures_total"),
				metric("tally_events_push_failing_seconds"), metric("tally_events_push_lag_seconds"))
		}
		time.Sleep(20 * time.Millisecond)
	}
	failing.Store(false)
	for metric("tally_events_push_failing_seconds") != 0 || metric("tally_events_push_lag_seconds") != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("after recovery: failing %v s, lag %v s", metric("tally_events_push_failing_seconds"), metric("tally_events_push_lag_seconds"))
		}
		time.Sleep(20 * time.Millisecond)
	}
	cancel()
	<-done
}
