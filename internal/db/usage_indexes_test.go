package db_test

import (
	"testing"

	"github.com/tallybilling/tally/internal/db/dbtest"
)

// A usage event's index entries must not end in its identifier after
// columns every event of one request shares (status, acceptance time,
// meter): such entries are all unique, so B-tree deduplication cannot fold
// them, and each insert searches its request's other events by identifier.
// Migration 00060 took it off the status index: 137 MB became 8.4 MB for
// the same 900,000 events (BENCHMARKS.md).
func TestUsageEventIndexesLeaveTheIdentifierOut(t *testing.T) {
	t.Parallel()
	gdb := dbtest.New(t)
	var idx []struct {
		Index string
		Def   string
		Pos   int
	}
	err := gdb.Raw(`SELECT i.indexrelid::regclass::text AS index, pg_get_indexdef(i.indexrelid) AS def, k.pos
		FROM pg_index i
		CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, pos)
		JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
		WHERE i.indrelid = 'usage_events'::regclass AND a.attname = 'identifier'`).Scan(&idx).Error
	if err != nil {
		t.Fatal(err)
	}
	for _, i := range idx {
		if i.Pos != 1 {
			t.Errorf("index %s has the identifier at position %d: %s", i.Index, i.Pos, i.Def)
		}
	}
	var statusIndexes int64
	if err := gdb.Raw(`SELECT count(*) FROM pg_indexes WHERE tablename = 'usage_events'
		AND indexdef LIKE '%(status, created_at)'`).Scan(&statusIndexes).Error; err != nil {
		t.Fatal(err)
	}
	if statusIndexes != 1 {
		t.Errorf("%d indexes of usage_events on (status, created_at), want 1 (the dead-letter list, the purge and the gauges read it)", statusIndexes)
	}
}
