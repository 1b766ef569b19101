package metering

import (
	"context"
	"errors"
	"slices"
	"sync"
	"time"

	"golang.org/x/time/rate"

	"github.com/tallybilling/tally/internal/stripeapi"
)

// jitterMargin is the slack paced leaves for network and scheduling jitter.
const jitterMargin = 100 * time.Millisecond

// paced is the request rate that keeps Stripe's count of arrivals in any
// one-second window at or below limit. Stripe counts arrivals; we control
// only departures. Spacing departures exactly 1/limit apart puts limit+1 of
// them exactly one second apart, so a request delayed by a millisecond on
// the way would make limit+1 arrive within one second. Spacing them
// (1s+jitterMargin)/limit apart tolerates that much jitter. With burst 1,
// the spacing holds even after idle time.
func paced(limit float64) rate.Limit {
	return rate.Every(time.Duration(float64(time.Second+jitterMargin) / limit))
}

// pause stops all sending of this worker for d (or longer if already
// paused) and returns when it ends.
func (w *Worker) pause(d time.Duration) time.Time {
	w.mu.Lock()
	defer w.mu.Unlock()
	if until := w.now().Add(d); until.After(w.pausedUntil) {
		w.pausedUntil = until
	}
	return w.pausedUntil
}

func (w *Worker) pauseLeft() time.Duration {
	w.mu.Lock()
	defer w.mu.Unlock()
	return max(0, w.pausedUntil.Sub(w.now()))
}

// acquire waits for permission to send one request under claim c. When it
// may not (shutting down, paused by a 429, holding back for the rate share,
// the lease too close to its end) it returns false and when the unsent
// events should be due again.
func (w *Worker) acquire(ctx context.Context, c *claim) (bool, time.Time) {
	if ctx.Err() != nil {
		return false, w.now()
	}
	if p := max(w.pauseLeft(), w.holdLeft()); p > 0 {
		return false, w.now().Add(p)
	}
	if w.now().Add(w.cfg.SendTimeout).After(c.leaseEnd) {
		return false, w.now()
	}
	w.waitMu.Lock()
	err := w.limiter.Wait(ctx)
	w.waitMu.Unlock()
	if err != nil {
		return false, w.now()
	}
	// A 429, or a failing heartbeat, may have come while this goroutine
	// waited for its turn.
	if p := max(w.pauseLeft(), w.holdLeft()); p > 0 {
		return false, w.now().Add(p)
	}
	w.mu.Lock()
	w.lastSend = time.Now()
	w.mu.Unlock()
	return true, time.Time{}
}

// deliverEach sends events one request each (v1), groups of one customer and
// meter one after the other, up to Concurrency groups at once.
func (w *Worker) deliverEach(ctx context.Context, c *claim, evs []claimedEvent) {
	var groups [][]claimedEvent
	index := map[string]int{}
	for _, ev := range evs {
		k := ev.CustomerID + "\x00" + ev.Meter
		i, ok := index[k]
		if !ok {
			i = len(groups)
			index[k] = i
			groups = append(groups, nil)
		}
		groups[i] = append(groups[i], ev)
	}
	work := make(chan []claimedEvent)
	var wg sync.WaitGroup
	for range min(w.opts.Concurrency, len(groups)) {
		wg.Go(func() {
			for g := range work {
				w.sendGroup(ctx, c, g)
			}
		})
	}
	for _, g := range groups {
		work <- g
	}
	close(work)
	wg.Wait()
}

// sendGroup sends the events of one customer and meter one after the other.
// Deliveries are recorded together when the group ends: should the process
// die first, the lease expires, the events are sent again and Stripe's
// duplicate answer records them then.
func (w *Worker) sendGroup(ctx context.Context, c *claim, g []claimedEvent) {
	var sent, dup []claimedEvent
	defer func() {
		w.delivered(ctx, sent, resultDelivered)
		w.delivered(ctx, dup, resultDuplicate)
	}()
	for i, ev := range g {
		if ok, retryAt := w.acquire(ctx, c); !ok {
			w.release(ctx, c, g[i:], retryAt)
			return
		}
		sentAt := w.now()
		sctx, cancel := withTimeout(ctx, w.cfg.SendTimeout)
		err := w.client.CreateMeterEvent(sctx, ev.meterEvent())
		cancel()
		switch {
		case err == nil:
			sent = append(sent, ev)
		case stripeapi.IsDuplicate(err):
			dup = append(dup, ev)
		default:
			w.settle(ctx, c, []claimedEvent{ev}, sentAt, err)
		}
	}
}

// deliverStream sends events through the v2 meter event stream, up to
// stripeapi.MaxStreamEvents per request, one request at a time.
func (w *Worker) deliverStream(ctx context.Context, c *claim, evs []claimedEvent) {
	for start := 0; start < len(evs); start += stripeapi.MaxStreamEvents {
		end := min(start+stripeapi.MaxStreamEvents, len(evs))
		chunk := evs[start:end]
		if ok, retryAt := w.acquire(ctx, c); !ok {
			w.release(ctx, c, evs[start:], retryAt)
			return
		}
		sentAt := w.now()
		err := w.sendStream(ctx, c, chunk)
		if k := stripeapi.KindOf(err); len(chunk) > 1 && !openFailed(err) && (k == stripeapi.KindInvalid || k == stripeapi.KindDuplicate) {
			// Stripe refuses the whole request for one bad event; the
			// others, of any customer, must not die with it. A refusal
			// as a duplicate is of one event too: the others were not
			// taken, so they are not delivered.
			w.log.Warn("Stripe refused a meter event stream request; sending its events one at a time",
				"events", len(chunk), "error", err)
			if !w.streamOneByOne(ctx, c, chunk, evs[end:]) {
				return
			}
			continue
		}
		w.settle(ctx, c, chunk, sentAt, err)
	}
}

// streamOneByOne sends each event of chunk in its own stream request, so
// only the ones Stripe refuses on their own are dead-lettered. Should it
// have to stop (shutdown, a 429 pause, the lease ending), it releases what
// is left of chunk and rest, and returns false.
func (w *Worker) streamOneByOne(ctx context.Context, c *claim, chunk, rest []claimedEvent) bool {
	var sent []claimedEvent
	defer func() { w.delivered(ctx, sent, resultDelivered) }()
	for i, ev := range chunk {
		if ok, retryAt := w.acquire(ctx, c); !ok {
			w.release(ctx, c, append(slices.Clone(chunk[i:]), rest...), retryAt)
			return false
		}
		sentAt := w.now()
		err := w.sendStream(ctx, c, chunk[i:i+1])
		if err == nil {
			sent = append(sent, ev)
			continue
		}
		w.settle(ctx, c, []claimedEvent{ev}, sentAt, err)
	}
	return true
}

func (w *Worker) sendStream(ctx context.Context, c *claim, chunk []claimedEvent) error {
	mes := make([]stripeapi.MeterEvent, len(chunk))
	for i, ev := range chunk {
		mes[i] = ev.meterEvent()
	}
	send := func(fresh bool) error {
		sess, err := w.streamSession(ctx, c, fresh)
		if err != nil {
			return err
		}
		sctx, cancel := withTimeout(ctx, w.cfg.SendTimeout)
		defer cancel()
		err = w.client.SendMeterEventStream(sctx, sess, mes)
		if stripeapi.IsSessionExpired(err) || stripeapi.KindOf(err) == stripeapi.KindAuth {
			// Forgotten at once: should opening its replacement fail,
			// the retry opens one again instead of trying this token.
			w.forgetSession(sess.Token)
		}
		return err
	}
	err := send(false)
	if stripeapi.IsSessionExpired(err) || stripeapi.KindOf(err) == stripeapi.KindAuth {
		// The token died early (clock skew, revoked): a new session, the
		// same events. Should the key itself be refused, opening fails too
		// and the auth pause follows.
		err = send(true)
	}
	return err
}

// forgetSession drops the cached v2 session if its token is still token.
func (w *Worker) forgetSession(token string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.session.Token == token {
		w.session = stripeapi.MeterEventSession{}
	}
}

// errReleased means the events were not sent and should go back as they are.
var errReleased = errors.New("metering: not sent")

// streamSession returns the cached v2 session, opening a new one when there
// is none, it ends within SessionRenewBefore, or fresh is asked for.
func (w *Worker) streamSession(ctx context.Context, c *claim, fresh bool) (stripeapi.MeterEventSession, error) {
	w.mu.Lock()
	sess := w.session
	w.mu.Unlock()
	if !fresh && sess.Token != "" && w.now().Add(w.opts.SessionRenewBefore).Before(sess.ExpiresAt) {
		return sess, nil
	}
	// Opening a session is a request too; it counts against the rate limit.
	if ok, _ := w.acquire(ctx, c); !ok {
		return stripeapi.MeterEventSession{}, errReleased
	}
	sctx, cancel := withTimeout(ctx, w.cfg.SendTimeout)
	defer cancel()
	sess, err := w.client.OpenMeterEventSession(sctx)
	if err != nil {
		return stripeapi.MeterEventSession{}, &sessionOpenError{err: err}
	}
	w.mu.Lock()
	w.session = sess
	w.mu.Unlock()
	w.log.Debug("meter event session opened", "expires_at", sess.ExpiresAt)
	return sess, nil
}

// sessionOpenError is a failure to open a v2 meter event session: no event
// left tally, and none is at fault (see settle).
type sessionOpenError struct{ err error }

func (e *sessionOpenError) Error() string { return e.err.Error() }
func (e *sessionOpenError) Unwrap() error { return e.err }

// openFailed reports whether err is a failure to open a v2 session.
func openFailed(err error) bool {
	var oe *sessionOpenError
	return errors.As(err, &oe)
}
