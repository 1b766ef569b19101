package db

import (
	"context"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/stdlib"
)

// When the database restarts, fails over or a network path breaks, every
// pooled connection dies without the pool knowing. pgx checks a connection
// with a ping before it hands it out again, but only when it sat idle for
// more than a second; on a busy server most were used a moment ago, and
// each would fail the one request that gets it with a 503 after the
// database is back (an outage test saw 1 to 3 of 80 reads fail this way).
//
// So the first failure seen (a lost or refused connection, a shutdown, a
// failed readiness ping) is remembered, and every connection last handed
// out before it is pinged before its next use: the dead ones are dropped
// and replaced, and the requests get live ones. A connection costs one
// extra round trip after each outage, never in normal running.
//
// The time is kept per process, not per pool: Translate, which sees the
// failure, does not know which pool the error came from. A process has one
// pool in production; in tests, one server's outage makes the others' pools
// ping each connection once.
var connectionLostAt atomic.Int64 // UnixNano of the latest failure, 0 for none

// noteConnectionLost records that a connection to the database was seen to
// fail now.
func noteConnectionLost() { connectionLostAt.Store(time.Now().UnixNano()) }

// pingStale is the pool's choice of whether to ping a connection before it
// is reused: pgx's own rule (idle for more than a second), and also when it
// was last handed out before the latest connection failure.
func pingStale(_ context.Context, p stdlib.ShouldPingParams) bool {
	if p.IdleDuration > time.Second {
		return true
	}
	lost := connectionLostAt.Load()
	return lost != 0 && time.Now().Add(-p.IdleDuration).UnixNano() <= lost
}
