package db_test

import (
	"reflect"
	"strings"
	"testing"

	"github.com/tallybilling/tally/internal/db/dbtest"
)

// The consume set and the hold and capture functions carry planner
// settings of their own (migrations 00053 and 00057): without them a
// generic plan reads whole tables, which BENCHMARKS.md measured at half
// the speed. A CREATE OR REPLACE FUNCTION that omits its SET clauses drops
// them without an error, so a later migration rewriting one of these
// functions must restate them; this pins what the migrated schema holds.
// A function gaining a setting belongs in the list too.
func TestHotPathFunctionsKeepTheirPlannerSettings(t *testing.T) {
	t.Parallel()
	gdb := dbtest.New(t)
	want := map[string][]string{
		"credits_capture_one": {"enable_seqscan=off"},
		"credits_consume_set": {"enable_bitmapscan=off", "plan_cache_mode=force_generic_plan", "enable_seqscan=off", "lock_timeout=50ms"},
		"credits_hold_one":    {"enable_seqscan=off"},
	}
	var rows []struct {
		Name     string
		Settings string
	}
	err := gdb.Raw(`SELECT p.proname AS name, array_to_string(p.proconfig, E'\n') AS settings
		FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
		WHERE n.nspname = current_schema() AND p.proconfig IS NOT NULL`).Scan(&rows).Error
	if err != nil {
		t.Fatal(err)
	}
	got := map[string][]string{}
	for _, r := range rows {
		got[r.Name] = strings.Split(r.Settings, "\n")
	}
	for name, settings := range want {
		if !reflect.DeepEqual(got[name], settings) {
			t.Errorf("function %s runs with settings %q, want %q (a CREATE OR REPLACE without its SET clauses drops them)", name, got[name], settings)
		}
	}
	for name, settings := range got {
		if _, ok := want[name]; !ok {
			t.Errorf("function %s has settings %q this test does not pin; add it to the list", name, settings)
		}
	}
}
