package stripeapi_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strconv"
	"testing"
	"time"

	"github.com/tallybilling/tally/internal/stripeapi/stripefake"
)

// Stripe lists events newest first. A backlog of more events than one
// listing keeps (a webhook endpoint broken for days on a busy account)
// must be worked through from its oldest end: the oldest events are the
// ones Stripe has given up delivering and will drop first. Before, the
// listing kept the newest 10,000 and silently dropped the older ones,
// which no later catch-up listed again.
func TestListEventsKeepsTheOldestOfABacklog(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	const total = 10_050
	base := time.Now().Add(-48 * time.Hour).Unix()
	id := func(i int) string { return fmt.Sprintf("evt_%05d", i) } // i = 0: the oldest
	fake.SetFault(func(r *http.Request) (int, string, bool) {
		if r.Method != http.MethodGet || r.URL.Path != "/v1/events" {
			return 0, "", false
		}
		q := r.URL.Query()
		limit, _ := strconv.Atoi(q.Get("limit"))
		start := total - 1 // newest first
		if after := q.Get("starting_after"); after != "" {
			n, _ := strconv.Atoi(after[len("evt_"):])
			start = n - 1
		}
		var data []map[string]any
		gte, _ := strconv.ParseInt(q.Get("created[gte]"), 10, 64)
		lowest := 0 // the oldest created at or after created[gte]
		for base+int64(lowest)*10 < gte {
			lowest++
		}
		for i := start; i >= lowest && len(data) < limit; i-- {
			data = append(data, map[string]any{"id": id(i), "object": "event", "type": "charge.refunded", "created": base + int64(i)*10,
				"livemode": false, "api_version": "2025-01-27.acacia", "data": map[string]any{"object": map[string]any{"id": "ch_" + id(i), "object": "charge"}}})
		}
		more := start-len(data) >= lowest
		body, _ := json.Marshal(map[string]any{"object": "list", "url": "/v1/events", "has_more": more, "data": data})
		return http.StatusOK, string(body), true
	})
	c := newFakeClient(t, fake)
	got, more, err := c.ListEvents(context.Background(), time.Unix(base, 0), []string{"charge.refunded"})
	if err != nil {
		t.Fatal(err)
	}
	if len(got) == 0 || got[0].ID != id(0) || !more {
		first := ""
		if len(got) > 0 {
			first = got[0].ID
		}
		t.Fatalf("listed %d events starting with %s (more %v); want the oldest first (%s) and more to come", len(got), first, more, id(0))
	}
	for i, ev := range got {
		if ev.ID != id(i) {
			t.Fatalf("event %d is %s, want %s (oldest first, none skipped)", i, ev.ID, id(i))
		}
	}
	rest, more, err := c.ListEvents(context.Background(), got[len(got)-1].Created, []string{"charge.refunded"})
	if err != nil || more || len(rest) == 0 || rest[len(rest)-1].ID != id(total-1) {
		t.Fatalf("listing on from the newest returned: %d events, more %v, %v; want the rest up to %s", len(rest), more, err, id(total-1))
	}
}
