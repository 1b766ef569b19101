package stripehook_test

import (
	"context"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/db/dbtest"
	"github.com/tallybilling/tally/internal/stripehook"
)

// Settled events older than the cutoff go, in batches of the size asked;
// younger ones, and old ones still failed, parked or unprocessed, stay.
func TestPurgeSettledKeepsWhatIsStillNeeded(t *testing.T) {
	t.Parallel()
	gdb := dbtest.New(t)
	ctx := context.Background()
	now := time.Now()
	old, young := now.Add(-40*24*time.Hour), now.Add(-30*24*time.Hour)
	insert := func(id, status string, at time.Time) {
		t.Helper()
		err := gdb.Exec(`INSERT INTO stripe_events (id, type, livemode, payload, status, received_at) VALUES (?, 'x.y', false, '{}', ?, ?)`,
			id, status, at).Error
		if err != nil {
			t.Fatal(err)
		}
	}
	for i := range 5 {
		insert(fmt.Sprintf("evt_old_processed_%d", i), "processed", old)
	}
	insert("evt_old_ignored", "ignored", old)
	insert("evt_old_failed", "failed", old)
	insert("evt_old_parked", "parked", old)
	insert("evt_old_received", "received", old)
	insert("evt_young_processed", "processed", young)

	cutoff := now.Add(-35 * 24 * time.Hour)
	if n, err := stripehook.PurgeSettled(ctx, gdb, cutoff, 4); err != nil || n != 4 {
		t.Fatalf("one batch of 4: %d, %v; want 4", n, err)
	}
	n, err := db.PurgeInBatches(ctx, 4, func(ctx context.Context, size int) (int64, error) {
		return stripehook.PurgeSettled(ctx, gdb, cutoff, size)
	})
	if err != nil || n != 2 {
		t.Fatalf("the rest: %d, %v; want the 2 settled old events left", n, err)
	}
	var left []string
	if err := gdb.Raw(`SELECT id FROM stripe_events ORDER BY id`).Scan(&left).Error; err != nil {
		t.Fatal(err)
	}
	want := []string{"evt_old_failed", "evt_old_parked", "evt_old_received", "evt_young_processed"}
	if !slices.Equal(left, want) {
		t.Errorf("left %v, want %v", left, want)
	}
}
