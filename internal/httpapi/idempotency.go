package httpapi

import (
	"context"
	"encoding/json"

	"github.com/tallybilling/tally/internal/db"
)

// idempotencyKey builds the guard for one request: the caller's key, in the
// caller's key space (see idempotencyScope), and a hash
// of the operation and its decoded body. The hash is over the typed body
// re-encoded, so whitespace and field order do not make two requests differ.
// An empty key gives the zero value (no guard).
func idempotencyKey(ctx context.Context, customerID, operation string, key *string, body any) db.IdempotencyKey {
	if key == nil {
		return db.IdempotencyKey{}
	}
	canonical, _ := json.Marshal(body)
	return db.IdempotencyKey{
		Scope:       idempotencyScope(ctx, customerID),
		Key:         *key,
		RequestHash: db.HashRequest([]byte(operation), canonical),
	}
}

// idempotencyScope is the space an Idempotency-Key value lives in.
//
// An end user's keys are its own: "user:<customer>", so a key the SPA chose
// never blocks (or replays) an operation of the backend for the same
// customer. Every API key, service or admin, shares one space, as Stripe
// scopes keys per account, so a retry sent with a rotated key is still a
// replay: "customer:<id>" when the operation names a customer, "account"
// when it names none (usage intake). Operations share a space: the same key
// on two operations is one key used for two requests (422 for the second).
func idempotencyScope(ctx context.Context, customerID string) string {
	if p, _ := principalFrom(ctx); p.isUser() {
		// The gate has checked that an end user only names its own customer.
		return "user:" + p.customerID
	}
	if customerID != "" {
		return "customer:" + customerID
	}
	return "account"
}

// replayedHeader is the Idempotent-Replayed header value: set only on replays.
func replayedHeader(replayed bool) *bool {
	if !replayed {
		return nil
	}
	t := true
	return &t
}
