package metering

import (
	"context"
	"errors"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Delivery results, the values of tally_usage_deliveries_total{result}.
const (
	resultDelivered   = "delivered"    // Stripe accepted the event
	resultDuplicate   = "duplicate"    // Stripe already held the identifier: delivered
	resultRetry       = "retry"        // 5xx, timeout, network: backed off; or refused while stamped ahead: sent again at its timestamp
	resultRateLimited = "rate_limited" // 429: sending paused
	resultDead        = "dead"         // refused, or its timestamp left Stripe's window
)

type metrics struct {
	pending       prometheus.Gauge
	dead          prometheus.Gauge
	waiting       prometheus.Gauge
	waitingOldest prometheus.Gauge
	deliveries    *prometheus.CounterVec
	cancels       *prometheus.CounterVec
	deliveryLag   prometheus.Histogram
	oldestPending prometheus.Gauge
	// unconfirmedOldest: see its Help.
	unconfirmedOldest prometheus.Gauge
}

// newMetrics builds the worker's metrics and registers them on reg (nil:
// kept unregistered). Several workers on one registry share the collectors.
func newMetrics(reg prometheus.Registerer) *metrics {
	m := &metrics{
		pending: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "tally_usage_events_pending",
			Help: "Usage events waiting to be sent to Stripe (status pending, across all instances).",
		}),
		dead: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "tally_usage_events_dead",
			Help: "Usage events dead-lettered and waiting for an operator.",
		}),
		waiting: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "tally_usage_events_waiting_customer",
			Help: "Usage events waiting for their customer to get a Stripe customer (status waiting_customer).",
		}),
		waitingOldest: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "tally_usage_events_waiting_customer_oldest_seconds",
			Help: "Age of the timestamp of the oldest usage event waiting for a Stripe customer (0 when none waits); at 35 days less an hour it is dead-lettered too_old.",
		}),
		deliveries: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tally_usage_deliveries_total",
			Help: "Usage event send outcomes by result (delivered, duplicate, retry, rate_limited, dead).",
		}, []string{"result"}),
		cancels: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tally_usage_cancels_total",
			Help: "Meter event adjustments (cancels) sent to Stripe, by result (cancelled, retry, rate_limited, refused).",
		}, []string{"result"}),
		deliveryLag: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "tally_usage_delivery_lag_seconds",
			Help:    "Time from a usage event's acceptance to its delivery to Stripe.",
			Buckets: []float64{.1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 1800, 3600, 4 * 3600, 24 * 3600},
		}),
		oldestPending: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "tally_usage_oldest_pending_seconds",
			Help: "Age, since it was accepted, of the oldest usage event waiting to be sent (status pending; 0 when none).",
		}),
		unconfirmedOldest: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "tally_usage_events_unconfirmed_oldest_seconds",
			Help: "Time since the first send whose answer was lost (a timeout or a 5xx: maybe_sent_at) of the oldest usage event still waiting to be sent (0 when none). Stripe deduplicates identifiers over about 24 hours: a resend after that, of an event Stripe kept, is counted twice.",
		}),
	}
	if reg != nil {
		m.pending = register(reg, m.pending)
		m.dead = register(reg, m.dead)
		m.waiting = register(reg, m.waiting)
		m.waitingOldest = register(reg, m.waitingOldest)
		m.deliveries = register(reg, m.deliveries)
		m.cancels = register(reg, m.cancels)
		m.deliveryLag = register(reg, m.deliveryLag)
		m.oldestPending = register(reg, m.oldestPending)
		m.unconfirmedOldest = register(reg, m.unconfirmedOldest)
	}
	return m
}

func register[C prometheus.Collector](reg prometheus.Registerer, c C) C {
	if err := reg.Register(c); err != nil {
		var already prometheus.AlreadyRegisteredError
		if errors.As(err, &already) {
			if existing, ok := already.ExistingCollector.(C); ok {
				return existing
			}
		}
		panic(err) // a name clash with another collector is a programming error
	}
	return c
}

// refreshGauges recounts the backlog at most once a second, and the
// waiting events at most once every waitingCountEvery: waiting events can be
// many (usage of customers who never check out), and counting them is a
// scan, while their oldest timestamp, which the alert watches, is one
// index probe (usage_events_undelivered_time).
func (w *Worker) refreshGauges(ctx context.Context) {
	now := w.now()
	w.mu.Lock()
	if d := now.Sub(w.gaugesAt); d >= 0 && d < time.Second {
		w.mu.Unlock()
		return
	}
	w.gaugesAt = now
	countWaiting := now.Sub(w.waitingAt) >= waitingCountEvery || now.Before(w.waitingAt)
	if countWaiting {
		w.waitingAt = now
	}
	w.mu.Unlock()
	var counts struct {
		Pending, Dead int64
		OldestWaiting *time.Time
		OldestPending *time.Time
		// The first possible send of the oldest pending event whose
		// answer was lost.
		OldestUnconfirmed *time.Time
	}
	err := w.db.WithContext(ctx).Raw(`
		SELECT count(*) FILTER (WHERE status = 'pending') AS pending,
		       count(*) FILTER (WHERE status = 'dead') AS dead,
		       (SELECT min(occurred_at) FROM usage_events WHERE status = 'waiting_customer') AS oldest_waiting,
		       min(created_at) FILTER (WHERE status = 'pending') AS oldest_pending,
		       min(maybe_sent_at) FILTER (WHERE status = 'pending') AS oldest_unconfirmed
		FROM usage_events WHERE status IN ('pending', 'dead')`).Scan(&counts).Error
	var waiting int64
	if err == nil && countWaiting {
		err = w.db.WithContext(ctx).Model(&eventRow{}).Where("status = ?", string(StatusWaitingCustomer)).Count(&waiting).Error
	}
	if err != nil {
		if ctx.Err() == nil {
			w.log.Warn("count usage backlog", "error", err)
		}
		return
	}
	w.m.pending.Set(float64(counts.Pending))
	w.m.dead.Set(float64(counts.Dead))
	if countWaiting {
		w.m.waiting.Set(float64(waiting))
	}
	w.m.waitingOldest.Set(ageAt(now, counts.OldestWaiting))
	w.m.oldestPending.Set(ageAt(now, counts.OldestPending))
	w.m.unconfirmedOldest.Set(ageAt(now, counts.OldestUnconfirmed))
}

// ageAt is how many seconds t is before now; 0 when t is nil (none) or
// after now.
func ageAt(now time.Time, t *time.Time) float64 {
	if t == nil {
		return 0
	}
	return max(0, now.Sub(*t).Seconds())
}

// waitingCountEvery is how often the waiting events are counted.
const waitingCountEvery = 30 * time.Second
