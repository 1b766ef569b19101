package payments

import (
	"context"

	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/customers"
	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/errs"
	"github.com/tallybilling/tally/internal/events"
	"github.com/tallybilling/tally/internal/stripeapi"
)

// subscribed moves a plan's payment to succeeded when its subscription
// session completes; nothing is credited.
func (s *Service) subscribed(ctx context.Context, ev EventRef, paymentID string, cs CheckoutSession) error {
	return s.inEventTx(ctx, ev, paymentID, cs.Livemode, cs.PaymentIntent, func(tx *gorm.DB, p Payment) error {
		if err := ownSession(p, cs.ID); err != nil {
			return err
		}
		if p.Status == Succeeded {
			return nil
		}
		ok, err := transition(ctx, tx, p, Succeeded, ev, "subscription started")
		if err != nil || !ok {
			return err
		}
		now := s.now()
		if err := updatePayment(ctx, tx, p.ID, map[string]any{
			"status": string(Succeeded), "succeeded_at": now, "failure_reason": nil, "updated_at": now,
		}); err != nil {
			return err
		}
		// A plan moves no money through tally: nothing received, no tax, no
		// credits, no PaymentIntent (see events.PaymentSucceeded).
		return events.Append(ctx, tx, p.CustomerID, events.PaymentSucceeded{
			PaymentID: p.ID, Item: p.Item, ItemKind: string(p.ItemKind), Quantity: p.Quantity,
			Currency: p.Currency, Price: p.Amount, PriceCurrency: p.Currency, StripeEventID: ev.ID,
		})
	})
}

// SubscriptionChanged keeps a customer's subscription status from
// customer.subscription.created, .updated and .deleted. An event older than
// the last one applied changes nothing. The customer comes from our
// metadata on the subscription, else from its Stripe customer.
// Errors: ErrNotOurs, *Rejection (livemode), errs.Unavailable.
func (s *Service) SubscriptionChanged(ctx context.Context, ev EventRef, sub Subscription) error {
	if sub.Livemode != s.livemode {
		return reject("event livemode=%t does not match our Stripe key (livemode=%t)", sub.Livemode, s.livemode)
	}
	customerID := sub.Metadata[stripeapi.MetadataCustomerID]
	if customerID == "" && sub.Customer != "" {
		c, err := customers.GetByStripeCustomer(ctx, s.db, sub.Customer)
		switch {
		case err == nil:
			customerID = c.ID
		case !errs.Is(err, errs.NotFound):
			return err
		}
	}
	if customerID == "" {
		return ErrNotOurs
	}
	return db.InTx(ctx, s.db, func(tx *gorm.DB) error {
		_, err := customers.Get(ctx, tx, customerID)
		if errs.Is(err, errs.NotFound) {
			return reject("subscription %s names customer %s, which tally does not know", sub.ID, customerID)
		}
		if err != nil {
			return err
		}
		// A conditional upsert (only a newer event than the one applied
		// overwrites the status) stays SQL.
		res := tx.Exec(`INSERT INTO subscriptions (stripe_subscription_id, customer_id, status, plan, stripe_event_created, updated_at)
			VALUES (?, ?, ?, NULLIF(?, ''), ?, ?)
			ON CONFLICT (stripe_subscription_id) DO UPDATE SET status = EXCLUDED.status,
				plan = COALESCE(EXCLUDED.plan, subscriptions.plan),
				stripe_event_created = EXCLUDED.stripe_event_created, updated_at = EXCLUDED.updated_at
			WHERE subscriptions.stripe_event_created <= EXCLUDED.stripe_event_created`,
			sub.ID, customerID, sub.Status, sub.Metadata[stripeapi.MetadataItem], ev.Created, s.now())
		if res.Error != nil {
			return db.Translate(res.Error, nil)
		}
		if res.RowsAffected == 0 {
			return nil // an older event than the status we hold
		}
		return events.Append(ctx, tx, customerID, events.SubscriptionUpdated{
			SubscriptionID: sub.ID, Status: sub.Status, Plan: sub.Metadata[stripeapi.MetadataItem], StripeEventID: ev.ID,
		})
	})
}
