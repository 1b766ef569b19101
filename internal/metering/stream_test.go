package metering_test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/tallybilling/tally/internal/config"
	"github.com/tallybilling/tally/internal/metering"
)

// One event Stripe refuses in a v2 stream request must not take the other
// events of its chunk (up to 100, across customers) to the dead-letter
// queue with it: the chunk is resent one event at a time and only the
// poisoned event dies.
func TestStreamRefusalDeadLettersOnlyThePoisonedEvent(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	link(t, e.db, "vera")
	link(t, e.db, "walt")
	e.fake.SetFault(func(r *http.Request) (int, string, bool) {
		if r.URL.Path != "/v2/billing/meter_event_stream" {
			return 0, "", false
		}
		body, _ := io.ReadAll(r.Body)
		if bytes.Contains(body, []byte(`"identifier":"poison"`)) {
			return http.StatusBadRequest, `{"error":{"type":"invalid_request_error","code":"invalid_request","message":"Invalid value for events[37].payload."}}`, true
		}
		return 0, "", false
	})
	var evs []metering.EventInput
	var good []string
	for i := range 150 {
		id := fmt.Sprintf("chunk-%03d", i)
		if i == 37 {
			id = "poison"
		} else {
			good = append(good, id)
		}
		evs = append(evs, ev([]string{"vera", "walt"}[i%2], id, 1))
	}
	ingest(t, e.svc, evs...)
	cfg := fastConfig()
	cfg.Transport = config.MeterTransportV2
	cfg.BatchSize = 250
	w := metering.NewWorker(e.workerOptions(t, cfg))
	if _, err := w.RunOnce(context.Background()); err != nil {
		t.Fatal(err)
	}

	poison, err := e.svc.Get(context.Background(), "poison")
	if err != nil || poison.Status != metering.StatusDead || !strings.Contains(poison.LastError, "Invalid value") {
		t.Errorf("poisoned event %+v %v: want dead with Stripe's message", poison, err)
	}
	if n := countRows(t, e.db, `status = 'dead'`); n != 1 {
		t.Errorf("%d dead events, want only the poisoned one", n)
	}
	if n := countRows(t, e.db, `status = 'delivered'`); n != int64(len(good)) {
		t.Errorf("%d delivered events, want the other %d", n, len(good))
	}
	for _, id := range good {
		if c := e.fake.Count(id); c != 1 {
			t.Errorf("%s accepted %d times by Stripe, want 1", id, c)
		}
	}
	if c := e.fake.Count("poison"); c != 0 {
		t.Errorf("poison accepted %d times by Stripe, want 0", c)
	}
}
