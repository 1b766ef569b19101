package httpapi

import (
	"context"
	"encoding/json"

	"github.com/tallybilling/tally/internal/db"
)

// idempotencyKey builds the guard for one request: the caller's key, scoped
// per customer (or per API key where no customer is in the path), and a hash
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

// replayedHeader is the Idempotent-Replayed header value: set only on replays.
func replayedHeader(replayed bool) *bool {
	if !replayed {
		return nil
	}
	t := true
	return &t
}
