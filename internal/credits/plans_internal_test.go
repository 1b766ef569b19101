package credits

import (
	"strings"
	"testing"
	"time"

	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/db/dbtest"
)

// The background workers' queries reach credit_grants through an index,
// never by reading every grant: on a database of a million customers a
// scan costs a tenth of a second of both cores, and the forecast watcher
// made one per customer it looked at. With sequential scans priced out,
// the planner still picks one only when no index can answer, so the
// plan says whether an index matches the query's words (a partial
// index's predicate must be implied by the WHERE clause as written).
func TestBackgroundQueriesReadGrantsThroughAnIndex(t *testing.T) {
	t.Parallel()
	gdb := dbtest.New(t)
	now := time.Date(2026, 11, 30, 12, 0, 0, 0, time.UTC)
	for name, q := range map[string]struct {
		sql  string
		args []any
	}{
		"forecast watcher's available": {watchAvailableSQL, []any{"cus_1", now, now}},
		"sweeper's due customers":      {sweepDueSQL, []any{now, sweepBatch, now, sweepBatch, sweepBatch}},
	} {
		var plan []string
		err := gdb.Transaction(func(tx *gorm.DB) error {
			if err := tx.Exec("SET LOCAL enable_seqscan = off").Error; err != nil {
				return err
			}
			return tx.Raw("EXPLAIN "+q.sql, q.args...).Scan(&plan).Error
		})
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		text := strings.Join(plan, "\n")
		if strings.Contains(text, "Seq Scan on credit_grants") {
			t.Errorf("%s reads every grant:\n%s", name, text)
		}
	}
}
