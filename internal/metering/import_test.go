package metering_test

import (
	"context"
	"fmt"
	"io"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tallybilling/tally/internal/errs"
	"github.com/tallybilling/tally/internal/metering"
)

// importCSV imports body as CSV and fails the test on an error.
func importCSV(t *testing.T, svc *metering.Service, body string, dry bool) metering.ImportSummary {
	t.Helper()
	sum, err := svc.Import(context.Background(), strings.NewReader(body), metering.ImportOptions{Format: metering.ImportCSV, DryRun: dry})
	if err != nil {
		t.Fatalf("import: %v", err)
	}
	return sum
}

func statusOf(t *testing.T, svc *metering.Service, id string) metering.Status {
	t.Helper()
	ev, err := svc.Get(context.Background(), id)
	if err != nil {
		t.Fatalf("get %s: %v", id, err)
	}
	return ev.Status
}

// A file mixing historical, recent, duplicate, conflicting and bad rows:
// every row is counted once, history is stored and not queued, recent rows
// are queued, and importing the same file again changes nothing.
func TestImportClassifiesRowsAndIsIdempotent(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	link(t, e.db, "alice")
	now := time.Now().UTC()
	old := now.Add(-60 * 24 * time.Hour).Format(time.RFC3339)
	recent := now.Add(-time.Hour).Format(time.RFC3339)
	body := "customer_id,meter,value,timestamp,identifier\n" +
		"alice,api_calls,5," + old + ",h-1\n" +
		"alice,api_calls,7," + recent + ",r-1\n" +
		"alice,api_calls,7," + recent + ",r-1\n" + // the same again: duplicate
		"alice,api_calls,8," + recent + ",r-1\n" + // another value: conflict
		"bob,api_calls,2," + recent + ",r-2\n" + // unknown customer: created, waits
		"alice,api_calls,-1," + recent + ",bad-1\n" +
		"alice,api_calls,NaN," + recent + ",bad-2\n" +
		"alice,nope,1," + recent + ",bad-3\n" +
		"alice,api_calls,1,,bad-4\n" +
		"alice,api_calls,1," + recent + ",bad-\u202e5\n" +
		"alice,api_calls,1," + recent + ",\"bad-\xff6\"\n" +
		"alice,api_calls,1\n" +
		"\n"
	sum := importCSV(t, e.svc, body, false)
	want := metering.ImportSummary{Read: 12, Accepted: 3, Duplicates: 1, Conflicts: 1, Rejected: 7, Historical: 1, Queued: 2}
	if sum.Read != want.Read || sum.Accepted != want.Accepted || sum.Duplicates != want.Duplicates || sum.Conflicts != want.Conflicts ||
		sum.Rejected != want.Rejected || sum.Historical != want.Historical || sum.Queued != want.Queued {
		t.Fatalf("summary %+v, want counts %+v", sum, want)
	}
	if len(sum.Errors) != 8 {
		t.Fatalf("errors %+v, want 8 (7 rejected, 1 conflict)", sum.Errors)
	}
	lines := []int64{}
	for _, er := range sum.Errors {
		lines = append(lines, er.Line)
	}
	if fmt.Sprint(lines) != "[5 7 8 9 10 11 12 13]" {
		t.Errorf("error lines %v, want in file order [5 7 8 9 10 11 12 13]", lines)
	}
	if sum.Errors[0].Code != errs.IdentifierConflict {
		t.Errorf("line 5 code %s, want identifier_conflict", sum.Errors[0].Code)
	}
	if got := statusOf(t, e.svc, "h-1"); got != metering.StatusHistorical {
		t.Errorf("h-1 is %s, want historical", got)
	}
	if got := statusOf(t, e.svc, "r-1"); got != metering.StatusPending {
		t.Errorf("r-1 is %s, want pending", got)
	}
	if got := statusOf(t, e.svc, "r-2"); got != metering.StatusWaitingCustomer {
		t.Errorf("r-2 is %s, want waiting_customer", got)
	}
	tot, err := e.svc.Totals(context.Background(), metering.TotalsQuery{CustomerID: "alice", Meter: testMeter,
		From: ptr(now.Add(-90 * 24 * time.Hour)), To: ptr(now)})
	if err != nil {
		t.Fatal(err)
	}
	if tot.Meters[0].Total != 12 || tot.Meters[0].Events != 2 {
		t.Errorf("alice's total %+v, want 12 over 2 events (history counts)", tot.Meters[0])
	}

	again := importCSV(t, e.svc, body, false)
	if again.Accepted != 0 || again.Duplicates != 4 || again.Conflicts != 1 || again.Rejected != 7 {
		t.Errorf("second import %+v, want nothing accepted, 4 duplicates", again)
	}
}

func ptr[T any](v T) *T { return &v }

// A dry run classifies the rows and stores nothing.
func TestImportDryRunStoresNothing(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	recent := time.Now().Add(-time.Hour).UTC().Format(time.RFC3339)
	sum := importCSV(t, e.svc, "identifier,timestamp,value,meter,customer_id\nd-1,"+recent+",3,api_calls,carol\n", true)
	if sum.Accepted != 1 || sum.Queued != 1 {
		t.Fatalf("dry run %+v, want 1 accepted and queued", sum)
	}
	if _, err := e.svc.Get(context.Background(), "d-1"); !errs.Is(err, errs.NotFound) {
		t.Fatalf("after a dry run, d-1: %v, want not_found", err)
	}
}

// Hostile input: a line far over the limit, NDJSON with wrong types, and a
// broken header. The long line is one rejected row, read past without
// holding it.
func TestImportHostileLines(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	recent := time.Now().Add(-time.Hour).UTC().Format(time.RFC3339)
	body := `{"customer_id":"dan","meter":"api_calls","value":1,"timestamp":"` + recent + `","identifier":"n-1"}` + "\n" +
		`{"customer_id":"dan","meter":"api_calls","value":"1","timestamp":"` + recent + `","identifier":"n-2"}` + "\n" +
		`{"customer_id":"dan","meter":"api_calls","value":1e400,"timestamp":"` + recent + `","identifier":"n-3"}` + "\n" +
		`{"customer_id":"dan","meter":"api_calls","value":1.5,"timestamp":"` + recent + `","identifier":"n-4"}` + "\n" +
		`{"customer_id":"dan","meter":"api_calls","value":1,"identifier":"n-5"}` + "\n" +
		`{"customer_id":"dan","meter":"api_calls","value":1,"timestamp":"` + recent + `","identifier":"` + strings.Repeat("x", 50<<20) + `"}` + "\n" +
		`not json` + "\n" +
		`{"customer_id":"dan","meter":"api_calls","value":9007199254740993,"timestamp":"` + recent + `","identifier":"n-6"}` + "\n" +
		`{"customer_id":"dan","meter":"api_calls","value":2,"timestamp":"` + recent + `","identifier":"n-7"}`
	sum, err := e.svc.Import(context.Background(), strings.NewReader(body), metering.ImportOptions{Format: metering.ImportNDJSON})
	if err != nil {
		t.Fatal(err)
	}
	if sum.Read != 9 || sum.Accepted != 2 || sum.Rejected != 7 {
		t.Fatalf("summary %+v, want 9 read, 2 accepted (n-1, n-7), 7 rejected", sum)
	}
	if sum.Errors[4].Line != 6 || !strings.Contains(sum.Errors[4].Detail, "longer than") {
		t.Errorf("the long line's error %+v", sum.Errors[4])
	}
	for _, bad := range []string{"", "customer_id,meter,value\n", "customer_id,meter,value,timestamp,identifier,extra\n", "customer_id,customer_id,meter,value,timestamp,identifier\n"} {
		if _, err := e.svc.Import(context.Background(), strings.NewReader(bad), metering.ImportOptions{Format: metering.ImportCSV}); !errs.Is(err, errs.Invalid) {
			t.Errorf("header %q: %v, want invalid_request", bad, err)
		}
	}
}

// Two imports of the same rows at once, and an import that fails half-way
// then runs again: every row is stored once, and the rerun finishes it.
func TestImportConcurrentAndResumed(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	recent := time.Now().Add(-time.Hour).UTC()
	var b strings.Builder
	b.WriteString(metering.ImportCSVHeader + "\n")
	const rows = 3 * metering.ImportBatch
	for i := range rows {
		fmt.Fprintf(&b, "cust-%d,api_calls,%d,%s,c-%d\n", i%50, i%7, recent.Add(time.Duration(i)*time.Millisecond).Format(time.RFC3339Nano), i)
	}
	body := b.String()

	// Cut after about one and a half batches.
	cut := &failingReader{r: strings.NewReader(body), after: len(body) / 2}
	part, err := e.svc.Import(context.Background(), cut, metering.ImportOptions{Format: metering.ImportCSV})
	if err == nil || part.Accepted == 0 || part.Accepted >= rows {
		t.Fatalf("interrupted import: %+v, %v; want an error after some rows", part, err)
	}

	var wg sync.WaitGroup
	sums := make([]metering.ImportSummary, 2)
	for i := range sums {
		wg.Go(func() { sums[i] = importCSV(t, e.svc, body, false) })
	}
	wg.Wait()
	accepted := part.Accepted + sums[0].Accepted + sums[1].Accepted
	if accepted != rows {
		t.Errorf("accepted %d + %d + %d, want %d in all", part.Accepted, sums[0].Accepted, sums[1].Accepted, rows)
	}
	for _, s := range sums {
		if s.Accepted+s.Duplicates != rows || s.Conflicts != 0 || s.Rejected != 0 {
			t.Errorf("summary %+v, want every row accepted or duplicate", s)
		}
	}
	var n int64
	if err := e.db.Raw(`SELECT count(*) FROM usage_events`).Scan(&n).Error; err != nil || n != rows {
		t.Errorf("%d rows stored (%v), want %d", n, err, rows)
	}
}

type failingReader struct {
	r     io.Reader
	after int
	read  int
}

func (f *failingReader) Read(p []byte) (int, error) {
	if f.read >= f.after {
		return 0, fmt.Errorf("connection reset")
	}
	p = p[:min(len(p), f.after-f.read)]
	n, err := f.r.Read(p)
	f.read += n
	return n, err
}

// A stream cut in the middle of a row: the whole rows before the cut are
// stored, the cut row is not (its value or identifier may be cut short),
// and the import answers the read error.
func TestImportCutMidRowStoresOnlyWholeRows(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	recent := time.Now().Add(-time.Hour).UTC().Format(time.RFC3339)
	body := metering.ImportCSVHeader + "\nann,api_calls,5," + recent + ",cut-1\nann,api_calls,7," + recent + ",cut-2\nann,api_calls,12"
	cut := &failingReader{r: strings.NewReader(body), after: len(body)}
	sum, err := e.svc.Import(context.Background(), cut, metering.ImportOptions{Format: metering.ImportCSV})
	if err == nil {
		t.Fatal("a cut stream imported without an error")
	}
	if sum.Accepted != 2 || sum.Read != 2 {
		t.Errorf("summary %+v, want the 2 whole rows read and accepted", sum)
	}
	if n := countRows(t, e.db, `true`); n != 2 {
		t.Errorf("%d rows stored, want 2", n)
	}
}
