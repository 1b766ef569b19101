package stripeapi

import (
	"context"
	"time"

	"github.com/stripe/stripe-go/v82"

	"github.com/tallybilling/tally/internal/errs"
)

// Period is a subscription's billing period: [Start, End).
type Period struct {
	Start, End time.Time
}

func (c *client) CancelMeterEvent(ctx context.Context, eventName, identifier string) error {
	if eventName == "" || identifier == "" {
		return errs.E(errs.Invalid, "stripeapi: cancel meter event: an event name and an identifier are required")
	}
	params := &stripe.BillingMeterEventAdjustmentCreateParams{
		EventName: stripe.String(eventName),
		Type:      stripe.String("cancel"),
		Cancel:    &stripe.BillingMeterEventAdjustmentCreateCancelParams{Identifier: stripe.String(identifier)},
	}
	params.SetIdempotencyKey("tally-cancel-" + identifier)
	ctx, capture := withCapture(ctx)
	if _, err := c.meter.V1BillingMeterEventAdjustments.Create(ctx, params); err != nil {
		return classify("cancel meter event", err, capture, false)
	}
	return nil
}

func (c *client) BillingPeriod(ctx context.Context, stripeCustomerID, price string) (Period, bool, error) {
	if stripeCustomerID == "" || price == "" {
		return Period{}, false, errs.E(errs.Invalid, "stripeapi: billing period: a Stripe customer and a price are required")
	}
	params := &stripe.SubscriptionListParams{Customer: stripe.String(stripeCustomerID), Price: stripe.String(price)}
	ctx, capture := withCapture(ctx)
	for sub, err := range c.api.V1Subscriptions.List(ctx, params) {
		if err != nil {
			return Period{}, false, classify("list subscriptions", err, capture, false)
		}
		if sub.Status != stripe.SubscriptionStatusActive && sub.Status != stripe.SubscriptionStatusTrialing {
			continue
		}
		// Since API version 2025-03-31 the period is on each item.
		for _, it := range sub.Items.Data {
			if it.Price != nil && it.Price.ID == price && it.CurrentPeriodEnd > 0 {
				return Period{Start: time.Unix(it.CurrentPeriodStart, 0).UTC(), End: time.Unix(it.CurrentPeriodEnd, 0).UTC()}, true, nil
			}
		}
	}
	return Period{}, false, nil
}
