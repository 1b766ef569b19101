package db_test

import (
	"reflect"
	"strings"
	"testing"

	"github.com/tallybilling/tally/internal/db/dbtest"
)

// The consume set, the hot customer's run and the hold and capture
// functions carry planner settings of their own (migrations 00053, 00057
// and 00059): without them a
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
		"credits_consume_run": {"enable_seqscan=off"},
		"credits_consume_set": {"enable_bitmapscan=off", "plan_cache_mode=force_generic_plan", "enable_seqscan=off", "lock_timeout=50ms"},
		"credits_hold_one":    {"enable_seqscan=off"},
	}
	names := make([]string, 0, len(want))
	for name := range want {
		names = append(names, name)
	}
	var rows []struct {
		Name      string
		Signature string
		Settings  *string
	}
	// Every function of a pinned name, with settings or without: a new
	// overload left beside the old one would be the one called.
	err := gdb.Raw(`SELECT p.proname AS name, p.oid::regprocedure::text AS signature,
			array_to_string(p.proconfig, E'\n') AS settings
		FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
		WHERE n.nspname = current_schema() AND (p.proconfig IS NOT NULL OR p.proname IN ?)`, names).Scan(&rows).Error
	if err != nil {
		t.Fatal(err)
	}
	got := map[string][]string{}
	for _, r := range rows {
		if _, dup := got[r.Name]; dup {
			t.Errorf("function %s has more than one overload (%s): one of them runs without the settings pinned here", r.Name, r.Signature)
		}
		got[r.Name] = nil
		if r.Settings != nil {
			got[r.Name] = strings.Split(*r.Settings, "\n")
		}
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
