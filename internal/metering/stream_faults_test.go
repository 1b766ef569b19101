package metering_test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"testing"
	"time"

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

// Opening a v2 session is not sending events. When Stripe refuses to open
// one (a 400 or 404: the account, the URL or the API version is wrong) no
// event is at fault: none is dead-lettered, they wait for the operator
// like after a refused key. When opening fails with a 5xx or times out no
// event may have reached Stripe, so none is marked maybe sent (which would
// later make a requeue demand force and a cancel send an adjustment).
func TestStreamSessionOpenFailuresBlameNoEvent(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	link(t, e.db, "fern")
	status := http.StatusBadRequest
	e.fake.SetFault(func(r *http.Request) (int, string, bool) {
		if r.URL.Path == "/v2/billing/meter_event_session" && status != 0 {
			return status, `{"error":{"type":"invalid_request_error","message":"Meter event sessions are not available (injected)."}}`, true
		}
		return 0, "", false
	})
	ingest(t, e.svc, ev("fern", "open-1", 1), ev("fern", "open-2", 2), ev("fern", "open-3", 3))
	cfg := fastConfig()
	cfg.Transport = config.MeterTransportV2
	opts := e.workerOptions(t, cfg)
	opts.AuthPause = 50 * time.Millisecond
	w := metering.NewWorker(opts)
	ctx := context.Background()
	if _, err := w.RunOnce(ctx); err != nil {
		t.Fatal(err)
	}
	if n := countRows(t, e.db, `status = 'dead'`); n != 0 {
		t.Fatalf("%d events dead-lettered because Stripe refused to open a session, want none", n)
	}
	if n := countRows(t, e.db, `status = 'pending' AND last_error LIKE '%not available%'`); n != 3 {
		t.Errorf("%d events pending with the session's error, want 3", n)
	}

	status = http.StatusInternalServerError
	time.Sleep(100 * time.Millisecond)
	if _, err := w.RunOnce(ctx); err != nil {
		t.Fatal(err)
	}
	if n := countRows(t, e.db, `maybe_sent_at IS NOT NULL`); n != 0 {
		t.Errorf("%d events marked maybe sent after a failed session open, want none: no event left tally", n)
	}

	status = 0
	waitFor(t, "every event delivered", 30*time.Second, func() bool {
		time.Sleep(50 * time.Millisecond)
		if _, err := w.RunOnce(ctx); err != nil {
			t.Fatal(err)
		}
		return countRows(t, e.db, `status = 'delivered'`) == 3
	})
	assertDeliveredOnce(t, e, []string{"open-1", "open-2", "open-3"})
}

// A 429's Retry-After is honoured up to MaxRetryAfter (by default
// TALLY_METER_BACKOFF_MAX, at least a minute): one answer asking for a day
// (a proxy's, or Stripe's on a bad day) must not stop all usage delivery of
// the instance for that day, on either transport.
func TestRetryAfterIsCappedAtBackoffMax(t *testing.T) {
	t.Parallel()
	for _, transport := range []string{config.MeterTransportV1, config.MeterTransportV2} {
		t.Run(transport, func(t *testing.T) {
			t.Parallel()
			e := newEnv(t)
			link(t, e.db, "gus")
			e.fake.FailNext(1, http.StatusTooManyRequests, "86400")
			ingest(t, e.svc, ev("gus", "day-1", 1), ev("gus", "day-2", 2))
			cfg := fastConfig()
			cfg.Transport = transport
			opts := e.workerOptions(t, cfg)
			opts.MaxRetryAfter = 200 * time.Millisecond
			startWorker(t, metering.NewWorker(opts))
			waitFor(t, "both events delivered after the 429", 20*time.Second, func() bool {
				return countRows(t, e.db, `status = 'delivered'`) == 2
			})
			assertDeliveredOnce(t, e, []string{"day-1", "day-2"})
		})
	}
}
