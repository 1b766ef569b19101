package stripeapi

import (
	"net/http"
	"testing"
	"time"
)

func TestParseRetryAfter(t *testing.T) {
	t.Parallel()
	now := time.Date(2026, 1, 1, 12, 0, 0, 0, time.UTC)
	cases := map[string]time.Duration{
		"":     0,
		"7":    7 * time.Second,
		" 2 ":  2 * time.Second,
		"0.5":  500 * time.Millisecond,
		"-3":   0,
		"soon": 0,
		now.Add(90 * time.Second).Format(http.TimeFormat): 90 * time.Second,
		now.Add(-time.Minute).Format(http.TimeFormat):     0,
	}
	for in, want := range cases {
		if got := parseRetryAfter(in, now); got != want {
			t.Errorf("parseRetryAfter(%q) = %v, want %v", in, got, want)
		}
	}
}

func TestKindFor(t *testing.T) {
	t.Parallel()
	cases := []struct {
		status     int
		code, msg  string
		meterEvent bool
		want       Kind
	}{
		{429, "rate_limit", "", true, KindRateLimited},
		{500, "", "", false, KindServer},
		{503, "", "", true, KindServer},
		{401, "", "", false, KindAuth},
		{401, "billing_meter_event_session_expired", "", true, KindSessionExpired},
		{403, "", "", false, KindAuth},
		{409, "idempotency_key_in_use", "", false, KindConflict},
		{400, "", "An event already exists with identifier x.", true, KindDuplicate},
		{400, "", "This identifier has already been used for a meter event.", true, KindDuplicate},
		{400, "resource_already_exists", "", true, KindDuplicate},
		// Only meter events have identifiers to duplicate.
		{400, "resource_already_exists", "", false, KindInvalid},
		{400, "parameter_missing", "Missing required param: identifier.", true, KindInvalid},
		{404, "resource_missing", "No such meter", false, KindInvalid},
	}
	for _, tc := range cases {
		if got := kindFor(tc.status, tc.code, tc.msg, tc.meterEvent); got != tc.want {
			t.Errorf("kindFor(%d, %q, %q, %v) = %s, want %s", tc.status, tc.code, tc.msg, tc.meterEvent, got, tc.want)
		}
	}
}
