package credits

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"hash/fnv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/errs"
)

// Group commit for consumes.
//
// Concurrent consumes are gathered per shard (a customer always lands in
// the same shard) and applied by one call of the database function
// credits_consume_batch (migration 00035): one round trip and one commit
// for the whole batch, instead of six round trips and a commit each. Each
// consume keeps its own idempotency record, its own answer and its own
// refusal: a 402 or a reused key writes nothing for that consume and does
// not touch its neighbours. Consumes that need more than a draw (expiry or
// hold expiry due, a low-balance notice, an automatic top-up, a key to
// take over) come back 'defer' having written nothing and run, in order,
// through the full path (consume inside db.Once), before the shard's next
// batch; so does every consume of a batch whose statement failed, each in
// its own transaction, where a failure stays its own and a batch that did
// commit after all is replayed from its stored answers.
//
// There is no timer: a shard runs a batch as soon as one is waiting and
// none is running, so a batch holds whatever arrived while the previous one
// ran. An idle shard costs nothing, and nothing lingers when load falls.
// Because a customer's consumes never run in two batches at once, batches
// never wait on each other's balance locks.

const (
	// consumeShards is how many batches may run at once: enough that one
	// batch's commit overlaps others' work, few enough that batches grow.
	consumeShards = 8
	// maxConsumeBatch bounds one statement's work (and a hot customer's
	// lock hold).
	maxConsumeBatch = 128
	// consumeBatchTimeout bounds one batch and the full path after it; it
	// does not follow a request's context, whose batch holds others too.
	consumeBatchTimeout = 30 * time.Second
)

// batchCall is one consume or capture waiting for its batch.
type batchCall struct {
	ctx  context.Context
	item batchItem
	// full runs the operation through the full path in a transaction of
	// its own and returns its answer as stored for replay.
	full func(ctx context.Context) ([]byte, bool, error)
	done chan batchDone // buffered: the answer is sent once
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
	s      *Service
	shards [consumeShards]consumeShard
	// What went the full path: operations a batch deferred, and those of
	// batches whose statement failed (for tests and the logs).
	deferred, fellBack atomic.Int64
}

type consumeShard struct {
	mu      sync.Mutex
	queue   []*batchCall
	running bool
}

func shardOf(customerID string) int {
	h := fnv.New32a()
	h.Write([]byte(customerID))
	return int(h.Sum32() % consumeShards)
}

// do queues c and waits for its answer. A request whose context ends while
// still queued is taken out and applies nothing; once its batch has it, it
// waits for the batch's answer (bounded by consumeBatchTimeout), so what it
// returns is what happened.
func (b *consumeBatcher) do(c *batchCall) batchDone {
	sh := &b.shards[shardOf(c.item.Customer)]
	sh.mu.Lock()
	sh.queue = append(sh.queue, c)
	if !sh.running {
		sh.running = true
		go b.drain(sh)
	}
	sh.mu.Unlock()
	select {
	case d := <-c.done:
		return d
	case <-c.ctx.Done():
	}
	sh.mu.Lock()
	for i, q := range sh.queue {
		if q == c {
			sh.queue = append(sh.queue[:i:i], sh.queue[i+1:]...)
			sh.mu.Unlock()
			return batchDone{err: db.Translate(c.ctx.Err(), nil)}
		}
	}
	sh.mu.Unlock()
	return <-c.done
}

// drain runs the shard's batches until its queue is empty.
func (b *consumeBatcher) drain(sh *consumeShard) {
	for {
		sh.mu.Lock()
		n := min(len(sh.queue), maxConsumeBatch)
		if n == 0 {
			sh.running = false
			sh.mu.Unlock()
			return
		}
		batch := sh.queue[:n:n]
		sh.queue = append([]*batchCall(nil), sh.queue[n:]...)
		sh.mu.Unlock()
		b.run(batch)
	}
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
	// ID is the ledger entry's, made here.
	ID string `json:"id"`
}

const kindCapture = "capture"

func newBatchItem(kind, customer string, key db.IdempotencyKey) batchItem {
	return batchItem{Kind: kind, Customer: customer, Scope: key.Scope, Key: key.Key, Hash: hex.EncodeToString(key.RequestHash)}
}

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
	js, err := json.Marshal(items)
	var rows []batchAnswer
	if err == nil {
		threshold := s.cfg.DefaultLowBalanceThreshold
		// One statement, so one implicit transaction: the batch commits or
		// vanishes whole.
		err = s.db.WithContext(ctx).Raw(`SELECT status, result, balance, available FROM credits_consume_batch(?::jsonb, ?, ?, ?, ?, ?)`,
			string(js), s.now(), threshold, s.topUp != nil, db.ReservationLease.Seconds(), db.IdempotencyRetention.Seconds()).
			Scan(&rows).Error
	}
	if err == nil && len(rows) != len(batch) {
		err = fmt.Errorf("credits: consume batch of %d answered %d rows", len(batch), len(rows))
	}
	if err != nil {
		// Nothing is known of the batch: each operation runs on its own,
		// where a committed one replays and a failure is its own.
		s.logger.Warn("credits: consume batch failed; running its operations one by one", "size", len(batch), "err", err)
		b.fellBack.Add(int64(len(batch)))
		for i, c := range batch {
			answer(i, full(ctx, c))
		}
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
	for _, i := range later {
		answer(i, full(ctx, batch[i]))
	}
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
