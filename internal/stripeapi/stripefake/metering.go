package stripefake

import (
	"context"
	"time"
)

// MeterEventAdjustments returns how many meter event adjustments named
// identifier.
func (f *Fake) MeterEventAdjustments(identifier string) int {
	return f.acct.MeterEventAdjustments(identifier)
}

// StartSubscription gives the Stripe customer an active subscription to
// price whose current period is [start, end).
func (f *Fake) StartSubscription(customer, price string, start, end time.Time) string {
	id, err := f.acct.StartSubscription(context.Background(), customer, price, start, end)
	if err != nil {
		panic(err)
	}
	return id
}
