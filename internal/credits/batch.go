package credits

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"hash/fnv"
	"sync"
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

// consumeCall is one consume waiting for its batch.
type consumeCall struct {
	ctx  context.Context
	in   ConsumeInput
	key  db.IdempotencyKey
	meta string
	done chan consumeDone // buffered: the answer is sent once
}

type consumeDone struct {
	res      ConsumeResult
	replayed bool
	err      error
}

type consumeBatcher struct {
	s      *Service
	shards [consumeShards]consumeShard
}

type consumeShard struct {
	mu      sync.Mutex
	queue   []*consumeCall
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
func (b *consumeBatcher) do(c *consumeCall) consumeDone {
	sh := &b.shards[shardOf(c.in.CustomerID)]
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
			return consumeDone{err: db.Translate(c.ctx.Err(), nil)}
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
		sh.queue = append([]*consumeCall(nil), sh.queue[n:]...)
		sh.mu.Unlock()
		b.run(batch)
	}
}

// batchItem is one consume as credits_consume_batch reads it.
type batchItem struct {
	Customer string          `json:"customer"`
	Scope    string          `json:"scope"`
	Key      string          `json:"key"`
	Hash     string          `json:"hash"`
	Amount   int64           `json:"amount"`
	Reason   string          `json:"reason"`
	Metadata json.RawMessage `json:"metadata"`
	ID       string          `json:"id"`
}

// batchAnswer is one row credits_consume_batch returns.
type batchAnswer struct {
	Status    string
	Result    *string
	Balance   *int64
	Available *int64
}

// run applies batch and answers every call in it, whatever happens.
func (b *consumeBatcher) run(batch []*consumeCall) {
	answered := make([]bool, len(batch))
	answer := func(i int, d consumeDone) {
		if !answered[i] {
			answered[i] = true
			batch[i].done <- d
		}
	}
	defer func() {
		if p := recover(); p != nil {
			for i := range batch {
				answer(i, consumeDone{err: fmt.Errorf("credits: consume batch panicked: %v", p)})
			}
		}
	}()
	s := b.s
	ctx, cancel := context.WithTimeout(context.WithoutCancel(batch[0].ctx), consumeBatchTimeout)
	defer cancel()
	items := make([]batchItem, len(batch))
	for i, c := range batch {
		items[i] = batchItem{
			Customer: c.in.CustomerID, Scope: c.key.Scope, Key: c.key.Key, Hash: hex.EncodeToString(c.key.RequestHash),
			Amount: c.in.Amount, Reason: c.in.Reason, Metadata: json.RawMessage(c.meta), ID: db.NewID("ctx"),
		}
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
		// Nothing is known of the batch: each consume runs on its own,
		// where a committed one replays and a failure is its own.
		s.logger.Warn("credits: consume batch failed; running its consumes one by one", "size", len(batch), "err", err)
		for i, c := range batch {
			answer(i, b.full(ctx, c))
		}
		return
	}
	var later []int
	for i, r := range rows {
		c := batch[i]
		switch r.Status {
		case "ok", "replay":
			var a consumeAnswer
			if r.Result == nil {
				answer(i, consumeDone{err: fmt.Errorf("credits: consume batch answered %s without a result", r.Status)})
				continue
			}
			if err := json.Unmarshal([]byte(*r.Result), &a); err != nil {
				answer(i, consumeDone{err: fmt.Errorf("credits: stored consume answer: %w", err)})
				continue
			}
			if r.Status == "ok" {
				s.consumed.Add(float64(a.Amount))
			}
			answer(i, consumeDone{res: ConsumeResult(a), replayed: r.Status == "replay"})
		case "reused":
			answer(i, consumeDone{err: db.KeyReusedError()})
		case "inflight":
			answer(i, consumeDone{err: db.KeyInFlightError()})
		case "insufficient":
			answer(i, consumeDone{err: insufficient(deref(r.Balance), deref(r.Available), c.in.Amount)})
		case "notfound":
			answer(i, consumeDone{err: errs.E(errs.NotFound, "customer %s not found", c.in.CustomerID)})
		case "defer":
			later = append(later, i)
		default:
			answer(i, consumeDone{err: fmt.Errorf("credits: consume batch answered %q", r.Status)})
		}
	}
	for _, i := range later {
		answer(i, b.full(ctx, batch[i]))
	}
}

// full runs one consume through the full path in a transaction of its own.
func (b *consumeBatcher) full(ctx context.Context, c *consumeCall) consumeDone {
	res, replayed, err := b.s.consumeOnce(ctx, c.in, c.key)
	return consumeDone{res: res, replayed: replayed, err: err}
}

func deref(p *int64) int64 {
	if p == nil {
		return 0
	}
	return *p
}
