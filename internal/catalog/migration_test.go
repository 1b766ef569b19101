package catalog

import (
	"strings"
	"testing"
	"time"
)

const planYAML = `
plans:
  - id: api
    name: API usage
    stripe_price: price_123
    meter: api_calls
    stripe_meter_id: mtr_123
`

// A plan's delivery and live_from: the defaults, each accepted form, and
// every refused one named with its field.
func TestPlanDeliveryAndLiveFrom(t *testing.T) {
	t.Parallel()
	c, err := Parse([]byte(planYAML))
	if err != nil || c.Plans[0].Delivery != DeliveryLive || c.Plans[0].Shadow() || c.Plans[0].LiveFromText() != "" {
		t.Fatalf("defaults: %+v, %v; want live, no live_from", c.Plans, err)
	}
	c, err = Parse([]byte(planYAML + "    delivery: shadow\n    live_from: next_period\n"))
	if err != nil || !c.Plans[0].Shadow() || !c.Plans[0].LiveFromNextPeriod {
		t.Fatalf("shadow, next_period: %+v, %v", c.Plans, err)
	}
	c, err = Parse([]byte(planYAML + "    live_from: 2027-01-01T00:00:00+01:00\n"))
	if err != nil || c.Plans[0].LiveFrom == nil || !c.Plans[0].LiveFrom.Equal(time.Date(2026, 12, 31, 23, 0, 0, 0, time.UTC)) ||
		c.Plans[0].LiveFromText() != "2026-12-31T23:00:00Z" {
		t.Fatalf("a fixed live_from: %+v, %v", c.Plans, err)
	}
	for extra, want := range map[string]string{
		"    delivery: sometimes\n":   "plans[0].delivery",
		"    live_from: tomorrow\n":   "plans[0].live_from",
		"    live_from: 2027-01-01\n": "plans[0].live_from",
	} {
		if _, err := Parse([]byte(planYAML + extra)); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%q: %v, want an error naming %s", extra, err, want)
		}
	}
}
