package metering_test

import (
	"context"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tallybilling/tally/internal/config"
	"github.com/tallybilling/tally/internal/metering"
)

// Stripe judges a meter event's timestamp by its own clock. With tally's
// clock a minute ahead of Stripe's, an event stamped 4.5 minutes ahead of
// tally (inside the 5 minutes intake allows) is 5.5 minutes ahead of
// Stripe, which refuses it. That refusal means "not yet", not "never": the
// event is tried again once its timestamp has come on tally's clock, and
// Stripe takes it then, once. A refusal of an event whose time has come
// still dead-letters it, as before.
func TestAnEventStripeFindsTooFarAheadIsTriedAgainWhenItsTimeComes(t *testing.T) {
	t.Parallel()
	k := newSkewed(t, config.MeterTransportV1)
	e, svc, stripeClock, run, ctx := k.env, k.svc, k.stripeClock, k.run, context.Background()

	run()
	got, err := svc.Get(ctx, "ahead")
	if err != nil {
		t.Fatal(err)
	}
	if got.Status != metering.StatusPending || got.Attempts != 1 || !strings.Contains(got.LastError, "5 minutes in the future") {
		t.Fatalf("the event Stripe found too far ahead: %+v, want pending after 1 attempt with Stripe's refusal", got)
	}
	// Not asked again before its timestamp has come on tally's clock.
	stripeClock.Add(3 * time.Minute)
	run()
	if n := requestsPerIdentifier(t, e.fake)["ahead"]; n != 1 {
		t.Errorf("%d requests for the event before its time, want 1", n)
	}
	stripeClock.Add(2 * time.Minute) // tally's clock is 30 s past the timestamp, Stripe's 30 s before it
	run()
	if got, _ := svc.Get(ctx, "ahead"); got.Status != metering.StatusDelivered || got.Attempts != 2 {
		t.Errorf("the event once its time came: %+v, want delivered on the second attempt", got)
	}
	if c := e.fake.Count("ahead"); c != 1 {
		t.Errorf("Stripe accepted the event %d times, want 1", c)
	}
	assertDeliveredOnce(t, e, []string{"ahead", "now"})
}

// The v2 stream answers before it validates: with tally's clock a minute
// ahead of Stripe's, an event stamped 4.5 minutes ahead of tally is taken
// with a 200 and then dropped by Stripe as too far ahead, so it must not be
// sent (and recorded delivered) before its timestamp has come on tally's
// clock. Sent then, Stripe keeps it.
func TestAStreamedEventIsSentOnlyOnceItsTimeHasCome(t *testing.T) {
	t.Parallel()
	k := newSkewed(t, config.MeterTransportV2)
	e, svc, stripeClock, run, ctx := k.env, k.svc, k.stripeClock, k.run, context.Background()

	run()
	if got, _ := svc.Get(ctx, "now"); got.Status != metering.StatusDelivered {
		t.Errorf("the event of now: %+v, want delivered", got)
	}
	if got, _ := svc.Get(ctx, "ahead"); got.Status != metering.StatusPending || got.Attempts != 0 {
		t.Errorf("the event ahead before its time: %+v, want pending and never sent", got)
	}
	stripeClock.Add(4 * time.Minute) // tally's clock 30 s before the timestamp
	run()
	if got, _ := svc.Get(ctx, "ahead"); got.Status != metering.StatusPending || got.Attempts != 0 {
		t.Errorf("the event ahead 30 s before its time: %+v, want pending and never sent", got)
	}
	stripeClock.Add(time.Minute) // tally's clock 30 s past the timestamp, Stripe's 30 s before it
	run()
	if got, _ := svc.Get(ctx, "ahead"); got.Status != metering.StatusDelivered || got.Attempts != 1 {
		t.Errorf("the event once its time came: %+v, want delivered on the first attempt", got)
	}
	assertDeliveredOnce(t, e, []string{"ahead", "now"})
}

// Whether an event was ahead of tally's clock is judged as of its send, not
// as of Stripe's answer: an event stamped a second after the send began,
// which Stripe (5 minutes behind) refused as too far ahead in a send that
// took two seconds, is tried again at once, not dead-lettered because its
// timestamp passed while Stripe answered.
func TestAheadIsJudgedAsOfTheSendNotTheAnswer(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ctx := context.Background()
	stripeClock := &simClock{t: time.Now()}
	var slow atomic.Bool
	tallyClock := func() time.Time { return stripeClock.Now().Add(5 * time.Minute) }
	e.fake.SetClock(stripeClock.Now)
	e.fake.SetFault(func(r *http.Request) (int, string, bool) {
		if !slow.CompareAndSwap(true, false) {
			return 0, "", false
		}
		// Stripe refuses the event as 5 min 1 s ahead of its clock, and
		// its answer takes two seconds to arrive.
		stripeClock.Add(2 * time.Second)
		return http.StatusBadRequest, `{"error":{"type":"invalid_request_error","param":"timestamp",` +
			`"message":"The event timestamp cannot be more than 5 minutes in the future."}}`, true
	})
	svc := metering.New(metering.Options{DB: e.db, Stripe: newClient(t, e.fake, 0), Catalog: testCatalog(), Now: tallyClock})
	link(t, e.db, "bo")
	at := tallyClock().Add(time.Second)
	ingest(t, svc, metering.EventInput{CustomerID: "bo", Meter: testMeter, Value: 4, Identifier: "slow", Timestamp: &at})
	opts := e.workerOptions(t, fastConfig())
	opts.Now = tallyClock
	w := metering.NewWorker(opts)
	// Claimed and sent a second before its timestamp, which is then 5 min
	// 1 s ahead of Stripe's clock.
	slow.Store(true)
	for range 3 {
		if _, err := w.RunOnce(ctx); err != nil {
			t.Fatal(err)
		}
	}
	got, err := svc.Get(ctx, "slow")
	if err != nil {
		t.Fatal(err)
	}
	if got.Status != metering.StatusDelivered || got.Attempts != 2 || e.fake.Count("slow") != 1 {
		t.Errorf("the event refused in a slow send: %+v, Stripe holds it %d times; want delivered on the second attempt, once",
			got, e.fake.Count("slow"))
	}
}

// skewed is a fake Stripe whose clock runs a minute behind tally's, holding
// two accepted events of customer "ada": "now", and "ahead", stamped 4.5
// minutes ahead of tally's clock (5.5 minutes ahead of Stripe's), and a
// delivery worker over the transport on tally's clock.
type skewed struct {
	env         *env
	svc         *metering.Service
	stripeClock *simClock
	// run gives the worker three rounds.
	run func()
}

func newSkewed(t *testing.T, transport string) skewed {
	t.Helper()
	e := newEnv(t)
	stripeClock := &simClock{t: time.Now()}
	tallyClock := func() time.Time { return stripeClock.Now().Add(time.Minute) }
	e.fake.SetClock(stripeClock.Now)
	svc := metering.New(metering.Options{DB: e.db, Stripe: newClient(t, e.fake, 0), Catalog: testCatalog(), Now: tallyClock})
	link(t, e.db, "ada")
	ahead := tallyClock().Add(4*time.Minute + 30*time.Second)
	res := ingest(t, svc,
		metering.EventInput{CustomerID: "ada", Meter: testMeter, Value: 7, Identifier: "ahead", Timestamp: &ahead},
		metering.EventInput{CustomerID: "ada", Meter: testMeter, Value: 2, Identifier: "now"},
	)
	if res.Accepted != 2 {
		t.Fatalf("intake %+v, want 2 accepted", res)
	}
	cfg := fastConfig()
	cfg.Transport = transport
	opts := e.workerOptions(t, cfg)
	opts.Now = tallyClock
	w := metering.NewWorker(opts)
	run := func() {
		t.Helper()
		for range 3 {
			if _, err := w.RunOnce(context.Background()); err != nil {
				t.Fatal(err)
			}
		}
	}
	return skewed{env: e, svc: svc, stripeClock: stripeClock, run: run}
}
