package metering_test

import (
	"context"
	"fmt"
	"slices"
	"testing"

	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/metering"
)

// The list pages through one status in the order events were accepted,
// and within one request's events (which share their acceptance time) in
// the identifiers' order, whatever they are made of: every event once,
// however the pages cut a request. The status index holds no identifier
// (migration 00060), so PostgreSQL orders each group of equal times
// itself, by the database's collation, which the expected order here asks
// PostgreSQL for rather than assuming one.
func TestListPagesThroughRequestsInAcceptanceThenIdentifierOrder(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	link(t, e.db, "lena")
	prefixes := []string{"a-", "B-", "_", "Z", "é", "0", "a", "ünder-", "~"}
	var want []string
	for batch := range 3 {
		var evs []metering.EventInput
		var ids []string
		for i := range 60 {
			id := fmt.Sprintf("%s%d-%d", prefixes[(i*7+batch)%len(prefixes)], batch, i)
			evs = append(evs, ev("lena", id, 1))
			ids = append(ids, id)
		}
		ingest(t, e.svc, evs...)
		// The request's identifiers in the database's order, asked of
		// PostgreSQL apart from the stored rows.
		var sorted []string
		if err := e.db.Raw(`SELECT id FROM unnest(?::text[]) AS id ORDER BY id`, db.Array(ids)).Scan(&sorted).Error; err != nil {
			t.Fatal(err)
		}
		want = append(want, sorted...)
	}
	var got []string
	cursor := ""
	for page := 0; ; page++ {
		if page > len(want) {
			t.Fatalf("still paging after %d pages", page)
		}
		p, err := e.svc.List(context.Background(), metering.ListQuery{Status: metering.StatusPending, Limit: 7, Cursor: cursor})
		if err != nil {
			t.Fatalf("page %d: %v", page, err)
		}
		for _, ev := range p.Events {
			got = append(got, ev.Identifier)
		}
		if p.Next == "" {
			break
		}
		cursor = p.Next
	}
	if !slices.Equal(got, want) {
		t.Errorf("listed %d events:\n%q\nwant %d, each request's in identifier order:\n%q", len(got), got, len(want), want)
	}
}
