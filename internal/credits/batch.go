package credits

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/errs"
)

// Group commit for consumes.
//
// Concurrent consumes (and hold captures, which spend the same way) are
// gathered into batches, each applied by one call of the database function
// credits_consume_batch (migration 00036): one round trip and one commit
// for the whole batch, instead of six round trips and a commit each. The
// consumes of a batch that are their customer's only item (consume-many)
// and need one draw are applied together, one statement per table, with
// each key written once with its answer (credits_consume_set, migration
// 00049); the rest go item by item as before. Each
// operation keeps its own idempotency record, its own answer and its own
// refusal: a 402 or a reused key writes nothing for that operation and
// does not touch its neighbours. Operations that need more than a draw
// (expiry or hold expiry due, a low-balance notice, an automatic top-up, a
// key to take over, a balance row another transaction holds) come back
// 'defer' having written nothing and run, in order, through the full path
// (consume or endHold inside db.Once) before their customer's next batch;
// so does every operation the set did not apply when the batch would have
// waited for a lock (below), and every operation of a batch whose
// statement failed, each in its own transaction, where a failure stays its
// own and a batch that did commit after all is replayed from its stored
// answers.
//
// Lock order: db.Once (the full path, and every other endpoint with an
// Idempotency-Key) claims one key, then waits for the balance row. A batch
// keeps every key it claims, and every balance row it locks, to its
// commit: the set-based part locks balance rows first and writes keys
// after; the loop claims its operations' keys one after another, in
// arrival order. So a batch waits for no lock longer than 50 ms
// (migrations 00052 and 00055): when the set would, it rolls back and its
// operations go through the loop; when the loop would, everything the loop
// did rolls back, and every operation the set did not apply comes back
// 'defer' and runs through the full path once the batch has committed,
// where it waits for its key with no other key held. Waiting longer
// deadlocked, for a second (deadlock_timeout) until PostgreSQL failed a
// whole batch onto the full path: with the same request sent to another
// server, whose batch held the same keys and claimed them in another order
// (TestRevcDuplicatesBothServersNoDeadlock), or with another endpoint sent
// the same key.
//
// There is no timer. A batch starts as soon as operations wait and fewer
// than maxConsumeBatches run, and takes every waiting operation whose
// customer is in no running batch: a customer is in at most one batch at a
// time, in arrival order, so batches never wait on each other's balance
// locks. Many customers so get a statement each at once, committed
// together by PostgreSQL's group commit; a hot customer's consumes pile up
// while its batch runs and go in the next one together, past the one
// commit per row lock that bounds a transaction per consume.

const (
	// maxConsumeBatches is how many batches run at once. Two: one commits
	// while the next gathers, so each commit carries the consumes that
	// arrived meanwhile. More batches at once only made them smaller (1.2
	// consumes a batch at 16 workers with 12) and the commits more: on the
	// 2-core machine, consume-many at 16 workers went from 2,090 ops/s
	// with 12 to 3,310 with 4 and 3,660 to 3,930 with 2 (1 did no better;
	// BENCHMARKS.md, issue 11, quiet run). Measured again with the
	// set-based batch (00049), consume-many at 16 workers on the shared
	// machine: 0.57x and 0.59x with 2, 0.27x to 0.43x with 1, 3 or 4.
	// Each holds a pooled connection.
	maxConsumeBatches = 2
	// maxConsumeBatch bounds one statement's work (and a hot customer's
	// lock hold).
	maxConsumeBatch = 256
	// consumeBatchTimeout bounds one batch and the full path after it; it
	// does not follow a request's context, whose batch holds others too.
	consumeBatchTimeout = 30 * time.Second
	// batchAnswerGrace is how long past its request's end an operation a
	// batch has taken still waits for the batch's answer (do).
	batchAnswerGrace = 3 * time.Second
	// fullPathChains is how many customers' operations a batch runs
	// through the full path at once (runFull), each on a pooled
	// connection of its own.
	fullPathChains = 4
)

// batchCall is one consume or capture waiting for its batch.
type batchCall struct {
	ctx  context.Context
	item batchItem
	// full runs the operation through the full path in a transaction of
	// its own and returns its answer as stored for replay.
	full func(ctx context.Context) ([]byte, bool, error)
	// spent is the credits an answer of its (not a replay) spent, counted
	// in tally_credits_consumed_total when the batch answers, whether or
	// not its request still waits; nil: it spends nothing (a hold).
	spent func(answer []byte) int64
	done  chan batchDone // buffered: the answer is sent once
}

// batchDone is a call's answer: the JSON answer (as stored under its key),
// whether it is a replay, or the error.
type batchDone struct {
	answer   []byte
	replayed bool
	err      error
}

func newBatchCall(ctx context.Context, item batchItem, full func(ctx context.Context) ([]byte, bool, error)) *batchCall {
	return &batchCall{ctx: ctx, item: item, full: full, done: make(chan batchDone, 1)}
}

type consumeBatcher struct {
	s *Service

	mu    sync.Mutex
	queue []*batchCall
	// busy counts the running batches' operations of each customer.
	busy    map[string]bool
	running int

	// What went the full path: operations a batch deferred, and those of
	// batches whose statement failed; exported as
	// tally_credits_batch_deferred_total and
	// tally_credits_batch_fell_back_total (New).
	deferred, fellBack atomic.Int64
}

// do queues c and waits for its answer. A request whose context ends while
// still queued is taken out and applies nothing; once a batch has it, it
// waits for the batch's answer, so that what it returns is what happened,
// but no longer than batchAnswerGrace past its context's end: a batch held
// by a database that stopped answering runs on for up to
// consumeBatchTimeout, and its callers would get no answer at all once the
// server's write timeout passed. Such a caller is answered Unavailable;
// the batch may still apply its operation, which a retry with the same
// key then replays.
func (b *consumeBatcher) do(c *batchCall) batchDone {
	b.mu.Lock()
	b.queue = append(b.queue, c)
	b.dispatch()
	b.mu.Unlock()
	select {
	case d := <-c.done:
		return d
	case <-c.ctx.Done():
	}
	b.mu.Lock()
	for i, q := range b.queue {
		if q == c {
			b.queue = append(b.queue[:i:i], b.queue[i+1:]...)
			b.mu.Unlock()
			return batchDone{err: db.Translate(c.ctx.Err(), nil)}
		}
	}
	b.mu.Unlock()
	grace := time.NewTimer(batchAnswerGrace)
	defer grace.Stop()
	select {
	case d := <-c.done:
		return d
	case <-grace.C:
		return batchDone{err: errs.Wrap(c.ctx.Err(), errs.Unavailable,
			"the request ended while its batch was still being applied (the database did not answer in time): retry it with the same Idempotency-Key, which answers what it did")}
	}
}

// dispatch starts batches while operations wait and fewer than
// maxConsumeBatches run. A batch takes, in arrival order, the waiting
// operations of customers in no running batch. b.mu is held.
func (b *consumeBatcher) dispatch() {
	if b.busy == nil {
		b.busy = map[string]bool{}
	}
	for b.running < maxConsumeBatches && len(b.queue) > 0 {
		var batch, rest []*batchCall
		for _, c := range b.queue {
			if len(batch) < maxConsumeBatch && !b.busy[c.item.Customer] {
				batch = append(batch, c)
			} else {
				rest = append(rest, c)
			}
		}
		if len(batch) == 0 {
			return
		}
		for _, c := range batch {
			b.busy[c.item.Customer] = true
		}
		b.queue = rest
		b.running++
		go b.runThenDispatch(batch)
	}
}

func (b *consumeBatcher) runThenDispatch(batch []*batchCall) {
	b.run(batch)
	b.mu.Lock()
	defer b.mu.Unlock()
	b.running--
	for _, c := range batch {
		delete(b.busy, c.item.Customer)
	}
	b.dispatch()
}

// batchItem is one operation as credits_consume_batch reads it.
type batchItem struct {
	Kind     string `json:"kind"` // KindConsume or "capture"
	Customer string `json:"customer"`
	Scope    string `json:"scope"`
	Key      string `json:"key"`
	Hash     string `json:"hash"`
	// Amount is a consume's; a capture's, or null to capture all.
	Amount   *int64          `json:"amount"`
	Reason   string          `json:"reason,omitempty"`
	Metadata json.RawMessage `json:"metadata,omitempty"`
	Hold     string          `json:"hold,omitempty"`
	// ExpiresIn is a new hold's lifetime in seconds.
	ExpiresIn int64 `json:"expires_in,omitempty"`
	// ID is the ledger entry's, made here.
	ID string `json:"id"`
}

const (
	kindCapture = "capture"
	kindHold    = "hold"
)

func newBatchItem(kind, customer string, key db.IdempotencyKey) batchItem {
	return batchItem{Kind: kind, Customer: customer, Scope: key.Scope, Key: key.Key, Hash: hex.EncodeToString(key.RequestHash)}
}

const consumeBatchSQL = `SELECT status, result, balance, available FROM credits_consume_batch($1::jsonb, $2, $3, $4, $5, $6)`

// batchAnswer is one row credits_consume_batch returns.
type batchAnswer struct {
	Status    string
	Result    *string
	Balance   *int64
	Available *int64
}

// run applies batch and answers every call in it, whatever happens.
func (b *consumeBatcher) run(batch []*batchCall) {
	answered := make([]bool, len(batch))
	answer := func(i int, d batchDone) {
		if !answered[i] {
			answered[i] = true
			if c := batch[i]; d.err == nil && !d.replayed && c.spent != nil {
				b.s.consumed.Add(float64(c.spent(d.answer)))
			}
			batch[i].done <- d
		}
	}
	defer func() {
		if p := recover(); p != nil {
			for i := range batch {
				answer(i, batchDone{err: fmt.Errorf("credits: consume batch panicked: %v", p)})
			}
		}
	}()
	s := b.s
	ctx, cancel := context.WithTimeout(context.WithoutCancel(batch[0].ctx), consumeBatchTimeout)
	defer cancel()
	items := make([]batchItem, len(batch))
	for i, c := range batch {
		items[i] = c.item
		items[i].ID = db.NewID("ctx")
	}
	js, err := marshalBatch(items)
	var rows []batchAnswer
	if err == nil {
		threshold := s.cfg.DefaultLowBalanceThreshold
		// One statement, so one implicit transaction: the batch commits or
		// vanishes whole. It runs on the pgx connection beneath gorm's pool
		// (db.Pgx): gorm's statement building and reflection and
		// database/sql's conversions cost as much CPU as pgx's own work
		// on this statement in a profile of consume-many, every consume
		// paying a share.
		err = db.Pgx(ctx, s.db, func(conn *pgx.Conn) error {
			// The JSON goes as a string: pgx sends a []byte as bytea in
			// the exec and simple protocol modes a database URL may
			// choose (default_query_exec_mode, as behind PgBouncer).
			rs, err := conn.Query(ctx, consumeBatchSQL,
				string(js), s.now(), threshold, s.topUp != nil, db.ReservationLease.Seconds(), db.IdempotencyRetention.Seconds())
			if err != nil {
				return err
			}
			defer rs.Close()
			for rs.Next() {
				var r batchAnswer
				if err := rs.Scan(&r.Status, &r.Result, &r.Balance, &r.Available); err != nil {
					return err
				}
				rows = append(rows, r)
			}
			return rs.Err()
		})
	}
	if err == nil && len(rows) != len(batch) {
		err = fmt.Errorf("credits: consume batch of %d answered %d rows", len(batch), len(rows))
	}
	if err != nil && errs.Is(db.Translate(err, nil), errs.Unavailable) && !db.IsCanceledStatement(err) {
		// The database is out of reach (or the batch ran out of time):
		// running each operation on its own would wait as long again for
		// each. Whether the batch committed is unknown, as for any request
		// that loses its connection: a retry with the same key replays or
		// applies once. A batch the server cancelled (statement_timeout)
		// rolled back on a working connection: its operations, each a
		// smaller statement, go the full path below.
		err = db.Translate(err, nil)
		for i := range batch {
			answer(i, batchDone{err: err})
		}
		return
	}
	if err != nil {
		// Nothing is known of the batch: each operation runs on its own,
		// where a committed one replays and a failure is its own.
		s.logger.Warn("credits: consume batch failed; running its operations one by one", "size", len(batch), "err", err)
		b.fellBack.Add(int64(len(batch)))
		all := make([]int, len(batch))
		for i := range all {
			all[i] = i
		}
		runFull(ctx, batch, all, answer)
		return
	}
	var later []int
	for i, r := range rows {
		it := batch[i].item
		switch r.Status {
		case "ok", "replay":
			if r.Result == nil {
				answer(i, batchDone{err: fmt.Errorf("credits: consume batch answered %s without a result", r.Status)})
				continue
			}
			answer(i, batchDone{answer: []byte(*r.Result), replayed: r.Status == "replay"})
		case "reused":
			answer(i, batchDone{err: db.KeyReusedError()})
		case "inflight":
			answer(i, batchDone{err: db.KeyInFlightError()})
		case "insufficient":
			answer(i, batchDone{err: insufficient(deref(r.Balance), deref(r.Available), deref(it.Amount))})
		case "notfound":
			answer(i, batchDone{err: errs.E(errs.NotFound, "customer %s not found", it.Customer)})
		case "hold_notfound":
			answer(i, batchDone{err: errs.E(errs.NotFound, "no hold %s for customer %s", it.Hold, it.Customer)})
		case "hold_ended":
			answer(i, batchDone{err: errs.E(errs.Conflict, "hold %s is %s, no longer active", it.Hold, derefString(r.Result))})
		case "too_much":
			answer(i, batchDone{err: errs.InvalidField("/amount", fmt.Sprintf("amount %d is more than the %d credits held", deref(it.Amount), deref(r.Balance)))})
		case "defer":
			later = append(later, i)
		default:
			answer(i, batchDone{err: fmt.Errorf("credits: consume batch answered %q", r.Status)})
		}
	}
	b.deferred.Add(int64(len(later)))
	runFull(ctx, batch, later, answer)
}

// runFull answers the calls of batch at idx (in arrival order) through the
// full path: each customer's one after another, in order, and up to
// fullPathChains customers at once. When the loop of credits_consume_batch
// gives up a wait (00055), every operation the set did not apply comes
// here, up to a whole batch; one after another, 231 of them took about a
// second under -race (TestTwoServersOnOneDatabaseApplyEachKeyOnce). Each full path operation
// claims its key before its customer's balance row, as db.Once always
// does, so operations of different customers run side by side safely.
//
// Up to maxConsumeBatches × fullPathChains operations may so want a pooled
// connection at once, more than the smallest pool has; they wait for one
// but cannot deadlock the pool: the batch's own statement has given its
// connection back before runFull starts, and each operation holds one
// connection (its db.Once transaction) and asks for no other, the
// automatic top-up it may start included (it writes in that tx).
func runFull(ctx context.Context, batch []*batchCall, idx []int, answer func(int, batchDone)) {
	var chains [][]int
	chainOf := map[string]int{}
	for _, i := range idx {
		k, ok := chainOf[batch[i].item.Customer]
		if !ok {
			k = len(chains)
			chainOf[batch[i].item.Customer] = k
			chains = append(chains, nil)
		}
		chains[k] = append(chains[k], i)
	}
	slots := make(chan struct{}, fullPathChains)
	var wg sync.WaitGroup
	for _, chain := range chains {
		slots <- struct{}{}
		wg.Go(func() {
			defer func() { <-slots }()
			next := 0
			defer func() {
				if p := recover(); p != nil {
					for _, i := range chain[next:] {
						answer(i, batchDone{err: fmt.Errorf("credits: consume full path panicked: %v", p)})
					}
				}
			}()
			for ; next < len(chain); next++ {
				answer(chain[next], full(ctx, batch[chain[next]]))
			}
		})
	}
	wg.Wait()
}

func full(ctx context.Context, c *batchCall) batchDone {
	a, replayed, err := c.full(ctx)
	return batchDone{answer: a, replayed: replayed, err: err}
}

func deref(p *int64) int64 {
	if p == nil {
		return 0
	}
	return *p
}

func derefString(p *string) string {
	if p == nil {
		return ""
	}
	return *p
}
