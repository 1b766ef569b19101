package events_test

import (
	"context"
	"encoding/json"
	"errors"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/db/dbtest"
	"github.com/tallybilling/tally/internal/events"
)

// Many writers commit out of id order (a transaction that took its id early
// commits late) while one poller follows the cursor: the poller must see every
// committed event exactly once and never an event of a rolled-back transaction.
func TestFeedPollerMissesNothingUnderConcurrentWriters(t *testing.T) {
	t.Parallel()
	gdb := dbtest.New(t)
	ctx := context.Background()
	feed := events.NewFeed(gdb)

	const writers, perWriter = 16, 40
	var mu sync.Mutex
	committed := map[string]bool{}
	errRollback := errors.New("rolled back on purpose")

	var wg sync.WaitGroup
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(w), 7))
			for i := range perWriter {
				key := string(rune('A'+w)) + "-" + time.Now().Format("150405.000000000") + "-" + string(rune('a'+i%26))
				rollback := rng.IntN(10) == 0
				err := db.InTx(ctx, gdb, func(tx *gorm.DB) error {
					if err := events.Append(ctx, tx, "", events.PaymentFailed{PaymentID: key}); err != nil {
						return err
					}
					// Hold the transaction open so later-numbered events commit first.
					time.Sleep(time.Duration(rng.IntN(4000)) * time.Microsecond)
					if rollback {
						return errRollback
					}
					return nil
				})
				if rollback {
					if !errors.Is(err, errRollback) {
						t.Errorf("rollback: %v", err)
					}
					continue
				}
				if err != nil {
					t.Errorf("append: %v", err)
					return
				}
				mu.Lock()
				committed[key] = true
				mu.Unlock()
			}
		}()
	}
	writersDone := make(chan struct{})
	go func() { wg.Wait(); close(writersDone) }()

	seen := map[string]int{}
	var cursor events.Cursor
	poll := func() int {
		page, err := feed.List(ctx, cursor, 7)
		if err != nil {
			t.Fatalf("list: %v", err)
		}
		for _, e := range page.Events {
			var data struct {
				PaymentID string `json:"payment_id"`
			}
			if err := json.Unmarshal(e.Data, &data); err != nil {
				t.Fatal(err)
			}
			seen[data.PaymentID]++
		}
		cursor = page.Next
		return len(page.Events)
	}
	for done := false; !done; {
		select {
		case <-writersDone:
			done = true
		default:
			if poll() == 0 {
				time.Sleep(time.Millisecond)
			}
		}
	}
	// The feed holds events back while any older transaction on the server
	// (other tests' databases included) is running, so drain until every
	// committed event arrived or a generous deadline passed.
	deadline := time.Now().Add(15 * time.Second)
	for len(seen) < len(committed) && time.Now().Before(deadline) {
		if poll() == 0 {
			time.Sleep(5 * time.Millisecond)
		}
	}
	for poll() > 0 {
	}

	if len(committed) == 0 {
		t.Fatal("no events committed")
	}
	for key := range committed {
		if seen[key] != 1 {
			t.Errorf("committed event %s seen %d times", key, seen[key])
		}
	}
	for key, n := range seen {
		if !committed[key] {
			t.Errorf("poller saw %s (%d times), which was never committed", key, n)
		}
	}
	t.Logf("%d events committed, %d seen", len(committed), len(seen))
}

func TestCursorRoundTripAndMalformed(t *testing.T) {
	t.Parallel()
	c := events.Cursor{TxID: 12345, ID: 678}
	got, err := events.ParseCursor(c.String())
	if err != nil || got != c {
		t.Fatalf("round trip = %+v, %v", got, err)
	}
	for _, bad := range []string{"!!", "MTIz", "eC55", "MS4tMQ"} {
		if _, err := events.ParseCursor(bad); err == nil {
			t.Errorf("ParseCursor(%q) accepted a malformed cursor", bad)
		}
	}
}

func FuzzParseCursor(f *testing.F) {
	for _, s := range []string{"", events.Cursor{TxID: 1, ID: 2}.String(), "MS4y", "garbage", "MTg0NDY3NDQwNzM3MDk1NTE2MTUuOQ"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		c, err := events.ParseCursor(s)
		if err != nil {
			return
		}
		again, err := events.ParseCursor(c.String())
		if err != nil || again != c {
			t.Fatalf("cursor %q parsed to %+v but does not round-trip: %+v %v", s, c, again, err)
		}
	})
}

// An event committed behind an older, still running transaction is held back
// from the feed, and HeldBack says for how long; once that transaction ends
// the event shows and nothing waits.
func TestHeldBackMeasuresEventsWaitingForOlderTransactions(t *testing.T) {
	t.Parallel()
	gdb := dbtest.New(t)
	ctx := context.Background()
	feed := events.NewFeed(gdb)

	older := gdb.Begin()
	if err := older.Exec(`SELECT pg_current_xact_id()`).Error; err != nil {
		t.Fatal(err)
	}
	err := db.InTx(ctx, gdb, func(tx *gorm.DB) error {
		return events.Append(ctx, tx, "", events.CreditsLowBalance{})
	})
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(50 * time.Millisecond)
	page, err := feed.List(ctx, events.Cursor{}, 10)
	if err != nil || len(page.Events) != 0 {
		t.Fatalf("feed while an older transaction runs: %d events, %v; want none", len(page.Events), err)
	}
	held, err := feed.HeldBack(ctx)
	if err != nil || held < 40*time.Millisecond {
		t.Fatalf("HeldBack = %s, %v; want at least 40ms", held, err)
	}
	if err := older.Rollback().Error; err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(15 * time.Second)
	for {
		page, err = feed.List(ctx, events.Cursor{}, 10)
		if err != nil {
			t.Fatal(err)
		}
		if len(page.Events) == 1 || time.Now().After(deadline) {
			break
		}
		time.Sleep(10 * time.Millisecond) // other tests' transactions on the server
	}
	if len(page.Events) != 1 {
		t.Fatalf("feed after the older transaction ended: %d events, want 1", len(page.Events))
	}
}
