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

// Any dead event still inside Stripe's window can be requeued, however long
// ago it died. Only where a send may have reached Stripe (a timeout or a
// 5xx) more than 24 hours ago is force needed, since Stripe dedupes
// identifiers only over about 24 hours; an event outside the window stays
// dead whatever. Each is explained per identifier.
func TestRequeueNeedsForceOnlyWhereStripeMayHoldTheEvent(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ctx := context.Background()
	link(t, e.db, "uma")
	// Each identifier's first attempt meets a gateway timeout (Stripe may
	// or may not have kept it), every later one a refusal; "clean-" ones
	// are refused from the start.
	seen := map[string]bool{}
	e.fake.SetFault(func(r *http.Request) (int, string, bool) {
		body := make([]byte, 4096)
		n, _ := r.Body.Read(body)
		id, _ := url.ParseQuery(string(body[:n]))
		ident := id.Get("identifier")
		if !strings.HasPrefix(ident, "clean-") && !seen[ident] {
			seen[ident] = true
			return http.StatusGatewayTimeout, `{"error":{"type":"api_error","message":"Gateway timeout."}}`, true
		}
		return http.StatusBadRequest, `{"error":{"type":"invalid_request_error","message":"No active meter was found for event_name api_calls."}}`, true
	})
	t0 := time.Now()
	clock := &simClock{t: t0}
	svc := metering.New(metering.Options{DB: e.db, Stripe: newClient(t, e.fake, 0), Catalog: testCatalog(), Now: clock.Now})
	cfg := fastConfig()
	cfg.BackoffMax = time.Millisecond
	opts := e.workerOptions(t, cfg)
	opts.Now = clock.Now
	w := metering.NewWorker(opts)
	send := func() {
		t.Helper()
		for range 3 {
			clock.Add(time.Second)
			if _, err := w.RunOnce(ctx); err != nil {
				t.Fatal(err)
			}
		}
	}
	ingest(t, svc, ev("uma", "age-old", 1), ev("uma", "clean-old", 1),
		metering.EventInput{CustomerID: "uma", Meter: testMeter, Value: 1, Identifier: "edge", Timestamp: new(t0.Add(-metering.DeliveryWindow + 26*time.Hour))})
	send()
	clock.Add(2 * time.Hour)
	ingest(t, svc, ev("uma", "age-young", 2))
	send()
	if n := countRows(t, e.db, `status = 'dead' AND dead_code = 'stripe_refused'`); n != 4 {
		t.Fatalf("%d events dead stripe_refused, want all 4", n)
	}

	clock.Set(t0.Add(25 * time.Hour))
	later := metering.New(metering.Options{DB: e.db, Stripe: newClient(t, e.fake, 0), Catalog: testCatalog(), Now: clock.Now})
	res, err := later.Requeue(ctx, metering.RequeueInput{Identifiers: []string{"age-old", "clean-old", "age-young", "edge", "nobody"}})
	if err != nil {
		t.Fatal(err)
	}
	want := []struct {
		requeued bool
		skip     metering.RequeueSkip
		text     string
	}{
		{false, metering.SkipForceRequired, "more than 24 hours ago"},
		{true, "", ""},
		{true, "", ""},
		{false, metering.SkipForceRequired, "force"},
		{false, metering.SkipNotDead, "no usage event"},
	}
	if res.Requeued != 2 || res.Skipped != 3 || len(res.Results) != len(want) {
		t.Fatalf("requeue 25h later: %+v, want 2 requeued and 3 skipped", res)
	}
	for i, w := range want {
		r := res.Results[i]
		if r.Requeued != w.requeued || r.Skip != w.skip || !strings.Contains(r.Detail, w.text) {
			t.Errorf("result %d (%s): %+v, want requeued=%v skip=%q mentioning %q", i, r.Identifier, r, w.requeued, w.skip, w.text)
		}
	}
	if got, _ := svc.Get(ctx, "age-old"); got.Status != metering.StatusDead || got.Attempts != 2 || !strings.Contains(got.LastError, "No active meter") {
		t.Errorf("age-old %+v: want still dead, attempts and error kept", got)
	}

	// Two more days: edge has left Stripe's window; force requeues age-old
	// but not edge.
	clock.Set(t0.Add(72 * time.Hour))
	later = metering.New(metering.Options{DB: e.db, Stripe: newClient(t, e.fake, 0), Catalog: testCatalog(), Now: clock.Now})
	res, err = later.Requeue(ctx, metering.RequeueInput{AllDead: true})
	if err != nil || res.Requeued != 0 || res.Skipped != 2 || len(res.Results) != 2 ||
		res.Results[0].Identifier != "age-old" || res.Results[0].Skip != metering.SkipForceRequired ||
		res.Results[1].Identifier != "edge" || res.Results[1].Skip != metering.SkipTooOld {
		t.Fatalf("requeue all dead without force: %+v %v, want age-old force_required and edge too_old", res, err)
	}
	res, err = later.Requeue(ctx, metering.RequeueInput{AllDead: true, Force: true})
	if err != nil || res.Requeued != 1 || res.Skipped != 1 || res.Results[0].Identifier != "edge" || res.Results[0].Skip != metering.SkipTooOld {
		t.Fatalf("requeue all dead with force: %+v %v, want age-old requeued and edge still too_old", res, err)
	}
	if got, _ := svc.Get(ctx, "age-old"); got.Status != metering.StatusPending || got.Attempts != 0 || got.MaybeSentAt == nil {
		t.Errorf("forced age-old %+v: want pending, attempts reset, maybe_sent_at kept", got)
	}
}
