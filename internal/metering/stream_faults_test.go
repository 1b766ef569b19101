package metering_test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"testing"

	"github.com/tallybilling/tally/internal/config"
	"github.com/tallybilling/tally/internal/metering"
)

// A v2 stream request is taken or refused whole. Stripe refusing one with a
// "duplicate identifier" answer (one event of the chunk it already holds,
// say whose earlier answer was lost) says nothing of the chunk's other
// events: none of them was taken, so they must not be recorded delivered.
// Only the event Stripe holds counts as delivered; the others reach Stripe,
// each exactly once.
func TestStreamDuplicateRefusalDeliversTheRestOfTheChunk(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	link(t, e.db, "dora")
	link(t, e.db, "emil")
	// Stripe already holds "held" (a send whose answer was lost): a
	// request carrying it with other events is refused as a duplicate.
	e.fake.SetFault(func(r *http.Request) (int, string, bool) {
		if r.URL.Path != "/v2/billing/meter_event_stream" {
			return 0, "", false
		}
		body, _ := io.ReadAll(r.Body)
		if bytes.Contains(body, []byte(`"identifier":"held"`)) {
			return http.StatusBadRequest, `{"error":{"type":"invalid_request_error","code":"resource_already_exists","message":"An event already exists with identifier held."}}`, true
		}
		return 0, "", false
	})
	var evs []metering.EventInput
	var others []string
	for i := range 60 {
		id := fmt.Sprintf("dup-chunk-%02d", i)
		if i == 20 {
			id = "held"
		} else {
			others = append(others, id)
		}
		evs = append(evs, ev([]string{"dora", "emil"}[i%2], id, 1))
	}
	ingest(t, e.svc, evs...)
	cfg := fastConfig()
	cfg.Transport = config.MeterTransportV2
	w := metering.NewWorker(e.workerOptions(t, cfg))
	ctx := context.Background()
	for range 5 {
		if _, err := w.RunOnce(ctx); err != nil {
			t.Fatal(err)
		}
	}
	held, err := e.svc.Get(ctx, "held")
	if err != nil || held.Status != metering.StatusDelivered {
		t.Errorf("held %+v %v: want delivered (Stripe holds it)", held, err)
	}
	for _, id := range others {
		got, err := e.svc.Get(ctx, id)
		if err != nil {
			t.Fatal(err)
		}
		if c := e.fake.Count(id); c != 1 || got.Status != metering.StatusDelivered {
			t.Errorf("%s: %s in tally, accepted %d times by Stripe; want delivered and accepted once", id, got.Status, c)
		}
	}
}
