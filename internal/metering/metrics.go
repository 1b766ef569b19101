package metering

import (
	"errors"

	"github.com/prometheus/client_golang/prometheus"
)

// Delivery results, the values of tally_usage_deliveries_total{result}.
const (
	resultDelivered   = "delivered"    // Stripe accepted the event
	resultDuplicate   = "duplicate"    // Stripe already held the identifier: delivered
	resultRetry       = "retry"        // 5xx, timeout, network: backed off
	resultRateLimited = "rate_limited" // 429: sending paused
	resultDead        = "dead"         // refused, or its timestamp left Stripe's window
)

type metrics struct {
	pending       prometheus.Gauge
	dead          prometheus.Gauge
	waiting       prometheus.Gauge
	waitingOldest prometheus.Gauge
	deliveries    *prometheus.CounterVec
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
	}
	if reg != nil {
		m.pending = register(reg, m.pending)
		m.dead = register(reg, m.dead)
		m.waiting = register(reg, m.waiting)
		m.waitingOldest = register(reg, m.waitingOldest)
		m.deliveries = register(reg, m.deliveries)
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
