package events_test

import (
	"context"
	"strconv"
	"testing"
	"time"

	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/db/dbtest"
	"github.com/tallybilling/tally/internal/events"
)

// Old events go, in batches; a poller holding a cursor at a purged event
// goes on from the next one; with the push configured, events it has not
// delivered stay whatever their age.
func TestPurgeOldEvents(t *testing.T) {
	t.Parallel()
	gdb := dbtest.New(t)
	ctx := context.Background()
	feed := events.NewFeed(gdb)
	for i := range 6 {
		if err := db.InTx(ctx, gdb, func(tx *gorm.DB) error {
			return events.Append(ctx, tx, "", events.CreditsLowBalance{Balance: int64(i)})
		}); err != nil {
			t.Fatal(err)
		}
	}
	// An event shows once every older transaction on the server has ended.
	var page events.Page
	for deadline := time.Now().Add(30 * time.Second); len(page.Events) < 6; time.Sleep(20 * time.Millisecond) {
		var err error
		if page, err = feed.List(ctx, events.Cursor{}, 100); err != nil {
			t.Fatal(err)
		}
		if time.Now().After(deadline) {
			t.Fatalf("feed shows %d of 6 events after 30s", len(page.Events))
		}
	}
	// The first four are a hundred days old.
	ids := []int64{page.Events[0].ID, page.Events[1].ID, page.Events[2].ID, page.Events[3].ID}
	if err := gdb.Exec(`UPDATE events SET created_at = now() - interval '100 days' WHERE id IN ?`, ids).Error; err != nil {
		t.Fatal(err)
	}
	// The push has delivered the first two only.
	if err := gdb.Exec(`UPDATE event_push_state SET cursor_txid = ?::text::xid8, cursor_id = ? WHERE id = 1`,
		strconv.FormatUint(page.Events[1].Position.TxID, 10), page.Events[1].Position.ID).Error; err != nil {
		t.Fatal(err)
	}
	cutoff := time.Now().Add(-90 * 24 * time.Hour)
	purge := func(keepUnpushed bool) int64 {
		t.Helper()
		n, err := db.PurgeInBatches(ctx, 1, func(ctx context.Context, size int) (int64, error) {
			return events.Purge(ctx, gdb, cutoff, size, keepUnpushed)
		})
		if err != nil {
			t.Fatal(err)
		}
		return n
	}
	if n := purge(true); n != 2 {
		t.Fatalf("with the push configured: purged %d, want the 2 it delivered", n)
	}
	// A poller whose cursor was at the second (now purged) event.
	next, err := feed.List(ctx, page.Events[1].Position, 100)
	if err != nil || len(next.Events) != 4 || next.Events[0].ID != page.Events[2].ID {
		t.Fatalf("after a purged cursor: %+v %v, want the 4 events after it", next.Events, err)
	}
	if n := purge(false); n != 2 {
		t.Fatalf("without the push: purged %d, want the 2 old ones left", n)
	}
	rest, err := feed.List(ctx, events.Cursor{}, 100)
	if err != nil || len(rest.Events) != 2 || rest.Events[0].ID != page.Events[4].ID {
		t.Fatalf("left %+v %v, want the 2 young events", rest.Events, err)
	}
}
