package metering_test

import (
	"context"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/tallybilling/tally/internal/metering"
)

// Stripe dedupes identifiers only over about 24 hours. A dead event whose
// first send may have reached Stripe more than 24 hours ago is not
// requeued (a resend could be counted twice): it stays dead, with
// last_error saying why, and is not counted. A younger one is requeued.
func TestRequeueSkipsEventsFirstSentOverADayAgo(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	link(t, e.db, "uma")
	e.fake.SetFault(func(r *http.Request) (int, string, bool) {
		body := make([]byte, 4096)
		n, _ := r.Body.Read(body)
		form, _ := url.ParseQuery(string(body[:n]))
		if strings.HasPrefix(form.Get("identifier"), "age-") {
			// A gateway timeout: Stripe may or may not have kept the event.
			return http.StatusGatewayTimeout, `{"error":{"type":"api_error","message":"Gateway timeout."}}`, true
		}
		return 0, "", false
	})
	cfg := fastConfig()
	cfg.MaxAttempts = 1
	var t0 time.Time
	sendAt := func(at time.Time) {
		t.Helper()
		opts := fastOptions(t)
		opts.Now = func() time.Time { return at }
		if _, err := metering.NewWorker(e.db, newClient(t, e.fake, 0), cfg, opts).RunOnce(ctx); err != nil {
			t.Fatal(err)
		}
	}
	ingest(t, e.svc, ev("uma", "age-old", 1))
	t0 = time.Now()
	sendAt(t0)
	ingest(t, e.svc, ev("uma", "age-young", 2))
	sendAt(t0.Add(2 * time.Hour))
	if n := countRows(t, e.db, `status = 'dead'`); n != 2 {
		t.Fatalf("%d dead events, want both after one timed-out attempt", n)
	}

	later := metering.NewService(e.db, newClient(t, e.fake, 0), testCatalog(), func() time.Time { return t0.Add(25 * time.Hour) })
	if n, err := later.Requeue(ctx, metering.RequeueInput{Identifiers: []string{"age-old"}}); err != nil || n != 0 {
		t.Fatalf("requeue of the day-old event by identifier: %d %v, want 0", n, err)
	}
	n, err := later.Requeue(ctx, metering.RequeueInput{AllDead: true})
	if err != nil || n != 1 {
		t.Fatalf("requeue all dead 25h after the first send: %d %v, want 1 (only the younger event)", n, err)
	}
	old, _ := e.svc.Get(ctx, "age-old")
	if old.Status != metering.StatusDead || old.Attempts != 1 ||
		!strings.Contains(old.LastError, "24 hours") || !strings.Contains(old.LastError, "Gateway timeout") {
		t.Errorf("day-old event %+v: want still dead, attempts kept, last_error explaining the 24 hours and keeping Stripe's error", old)
	}
	young, _ := e.svc.Get(ctx, "age-young")
	if young.Status != metering.StatusPending || young.Attempts != 0 {
		t.Errorf("younger event %+v: want pending with attempts reset", young)
	}
	// Asking again does not stack the explanation.
	if n, err := later.Requeue(ctx, metering.RequeueInput{AllDead: true}); err != nil || n != 0 {
		t.Fatalf("second requeue: %d %v, want 0", n, err)
	}
	again, _ := e.svc.Get(ctx, "age-old")
	if again.LastError != old.LastError {
		t.Errorf("last_error changed on a second requeue:\n%s\nwas\n%s", again.LastError, old.LastError)
	}
}
