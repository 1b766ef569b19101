package app

import (
	"context"
	"log/slog"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/db"
)

// verifier runs the invariant check of `tally verify` every interval and
// publishes what it found as tally_invariant_breaches, which an alert
// watches. One replica at a time runs it (an advisory lock), and it is
// paced: one run per interval (default 15 minutes), each a handful of
// aggregate reads in one read-only snapshot, bounded by a timeout, so it
// never weighs on the money paths.
type verifier struct {
	db       *gorm.DB
	logger   *slog.Logger
	interval time.Duration
	breaches prometheus.Gauge
	runs     *prometheus.CounterVec
}

// verifyTimeout bounds one background verify.
const verifyTimeout = 2 * time.Minute

var verifyLock = db.LockKey("background verify")

func newVerifier(gdb *gorm.DB, logger *slog.Logger, interval time.Duration, reg prometheus.Registerer) *verifier {
	v := &verifier{db: gdb, logger: logger, interval: interval,
		breaches: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "tally_invariant_breaches", Help: "Invariant breaches the last background verify found (see tally verify); 0 when clean.",
		}),
		runs: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tally_verify_runs_total", Help: "Background verifies, by result: ok, breaches, error.",
		}, []string{"result"}),
	}
	if reg != nil {
		reg.MustRegister(v.breaches, v.runs)
	}
	return v
}

func (v *verifier) Name() string { return "invariant-verify" }

func (v *verifier) Run(ctx context.Context) error {
	if v.interval <= 0 {
		<-ctx.Done()
		return nil
	}
	t := time.NewTicker(v.interval)
	defer t.Stop()
	for {
		v.verifyOnce(ctx)
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

func (v *verifier) verifyOnce(ctx context.Context) {
	ctx, cancel := context.WithTimeout(ctx, verifyTimeout)
	defer cancel()
	var problems int
	ran, err := db.TryExclusive(ctx, v.db, verifyLock, func(ctx context.Context) error {
		rep, err := Verify(ctx, v.db)
		problems = len(rep.Problems)
		return err
	})
	switch {
	case !ran && err == nil:
		return // another replica verifies
	case err != nil:
		v.runs.WithLabelValues("error").Inc()
		if ctx.Err() == nil {
			v.logger.WarnContext(ctx, "background verify failed", "error", err)
		}
		return
	}
	v.breaches.Set(float64(problems))
	if problems > 0 {
		v.runs.WithLabelValues("breaches").Inc()
		v.logger.ErrorContext(ctx, "background verify found invariant breaches; run tally verify", "problems", problems)
		return
	}
	v.runs.WithLabelValues("ok").Inc()
}
