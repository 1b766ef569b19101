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
// paced: one run per interval (default 15 minutes) for the whole fleet,
// across restarts (background_runs keeps when the last one started), each
// a handful of aggregate reads in one read-only snapshot, bounded by a
// timeout. Those reads scan the ledger, so on a large database a run
// costs real CPU: starting one at every process start, as it once did,
// put a full scan under the load of every deploy.
type verifier struct {
	db       *gorm.DB
	logger   *slog.Logger
	now      func() time.Time
	interval time.Duration
	breaches prometheus.Gauge
	runs     *prometheus.CounterVec
}

// verifyCheckEvery is how often a replica asks whether a verify is due:
// a replica that starts, or takes over from one that stopped, runs the
// next one at most this late.
const verifyCheckEvery = time.Minute

// verifyTimeout bounds one background verify.
const verifyTimeout = 2 * time.Minute

// VerifyJob names the background verify in background_runs and its lock.
const VerifyJob = "background verify"

var verifyLock = db.LockKey(VerifyJob)

func newVerifier(gdb *gorm.DB, logger *slog.Logger, now func() time.Time, interval time.Duration, reg prometheus.Registerer) *verifier {
	v := &verifier{db: gdb, logger: logger, now: now, interval: interval,
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
	t := time.NewTicker(min(v.interval, verifyCheckEvery))
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
	due := false
	ran, err := db.TryExclusive(ctx, v.db, verifyLock, func(ctx context.Context) error {
		// Under the lock, so two replicas never both find it due. The
		// start is recorded before the run: a run that fails or times out
		// waits for the next interval instead of starting again in a
		// minute.
		now := v.now()
		res := v.db.WithContext(ctx).Exec(`INSERT INTO background_runs AS r (name, last_run_at) VALUES (?, ?)
			ON CONFLICT (name) DO UPDATE SET last_run_at = excluded.last_run_at
			WHERE r.last_run_at <= excluded.last_run_at - make_interval(secs => ?)`,
			VerifyJob, now, v.interval.Seconds())
		if res.Error != nil {
			return db.Translate(res.Error, nil)
		}
		if due = res.RowsAffected == 1; !due {
			return nil
		}
		rep, err := Verify(ctx, v.db)
		problems = len(rep.Problems)
		return err
	})
	switch {
	case (!ran || !due) && err == nil:
		return // another replica verifies, or one did less than an interval ago
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
