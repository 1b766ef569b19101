package db

import (
	"context"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/stdlib"
)

// A connection handed out before the latest connection failure is pinged
// before reuse, however recently it was used; one handed out after it is
// not, unless it idled past pgx's own second.
func TestPingStaleAfterAConnectionFailure(t *testing.T) {
	ping := func(idle time.Duration) bool {
		return pingStale(context.Background(), stdlib.ShouldPingParams{IdleDuration: idle})
	}
	noteConnectionLost()
	if !ping(50 * time.Millisecond) {
		t.Error("a connection last used 50ms before the failure is not pinged")
	}
	time.Sleep(20 * time.Millisecond)
	if ping(5 * time.Millisecond) {
		t.Error("a connection handed out after the failure is pinged")
	}
	if !ping(2 * time.Second) {
		t.Error("a connection idle for 2s is not pinged")
	}
}
