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
	resultDead        = "dead"         // refused, or attempts ran out
)

type metrics struct {
	pending    prometheus.Gauge
	dead       prometheus.Gauge
	deliveries *prometheus.CounterVec
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
		deliveries: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tally_usage_deliveries_total",
			Help: "Usage event send outcomes by result (delivered, duplicate, retry, rate_limited, dead).",
		}, []string{"result"}),
	}
	if reg != nil {
		m.pending = register(reg, m.pending)
		m.dead = register(reg, m.dead)
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
