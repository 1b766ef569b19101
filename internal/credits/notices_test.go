package credits_test

import (
	"testing"
	"time"
)

// With TALLY_CREDITS_EXPIRING_NOTICE=720h,168h,24h each grant gets each
// notice once, as it enters each horizon; a grant already inside a short
// horizon gets that notice only; sweepers running again send nothing new.
func TestExpiryNoticesAtSeveralHorizons(t *testing.T) {
	t.Parallel()
	cfg := defaultCfg()
	cfg.ExpiringNotice = 720 * time.Hour
	cfg.ExpiringNotices = []time.Duration{720 * time.Hour, 168 * time.Hour, 24 * time.Hour}
	f := newFixture(t, cfg)
	now := f.clock.Now()
	at := func(d time.Duration) *time.Time { t := now.Add(d); return &t }
	far := f.grant("multi", 10, at(10*24*time.Hour))   // in the 720h span
	week := f.grant("multi", 10, at(3*24*time.Hour))   // in the 168h span
	soon := f.grant("multi", 10, at(12*time.Hour))     // in the 24h span
	never := f.grant("multi", 10, at(60*24*time.Hour)) // beyond every horizon

	notices := func() map[string][]int64 {
		t.Helper()
		var rows []struct {
			GrantID string
			Notice  int64
		}
		if err := f.db.Raw(`SELECT data->>'grant_id' AS grant_id, (data->>'notice_seconds')::bigint AS notice
			FROM events WHERE type = 'credits.expiring' ORDER BY id`).Scan(&rows).Error; err != nil {
			t.Fatal(err)
		}
		out := map[string][]int64{}
		for _, r := range rows {
			out[r.GrantID] = append(out[r.GrantID], r.Notice)
		}
		return out
	}
	h := func(hours int64) int64 { return hours * 3600 }
	for range 2 {
		if _, err := f.sweep.SweepOnce(f.ctx); err != nil {
			t.Fatal(err)
		}
	}
	got := notices()
	if len(got[far.GrantID]) != 1 || got[far.GrantID][0] != h(720) ||
		len(got[week.GrantID]) != 1 || got[week.GrantID][0] != h(168) ||
		len(got[soon.GrantID]) != 1 || got[soon.GrantID][0] != h(24) || len(got[never.GrantID]) != 0 {
		t.Fatalf("first round: %v", got)
	}
	// Five days later: far enters the week, week enters the day.
	f.clock.Set(now.Add(5*24*time.Hour + time.Hour))
	for range 2 {
		if _, err := f.sweep.SweepOnce(f.ctx); err != nil {
			t.Fatal(err)
		}
	}
	got = notices()
	if want := []int64{h(720), h(168)}; len(got[far.GrantID]) != 2 || got[far.GrantID][1] != want[1] {
		t.Fatalf("far: %v", got[far.GrantID])
	}
	if len(got[week.GrantID]) != 1 {
		// week expired (3 days) before this round: no notice for an expired grant.
		t.Fatalf("week: %v", got[week.GrantID])
	}
	if len(got[soon.GrantID]) != 1 || len(got[never.GrantID]) != 0 {
		t.Fatalf("second round: %v", got)
	}
	// Nine days in: far is within a day.
	f.clock.Set(now.Add(9*24*time.Hour + time.Hour))
	if _, err := f.sweep.SweepOnce(f.ctx); err != nil {
		t.Fatal(err)
	}
	if got := notices()[far.GrantID]; len(got) != 3 || got[2] != h(24) {
		t.Fatalf("far: %v", got)
	}
	f.mustVerify()
}
