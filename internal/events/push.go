package events

import (
	"bytes"
	"context"
	"crypto/hmac"
	crand "crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/text"
)

// SignatureHeader carries `t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`,
// the scheme Stripe uses, so host applications can reuse what they know.
const SignatureHeader = "Tally-Signature"

// Sign returns the SignatureHeader value for body at time t.
func Sign(secret string, t time.Time, body []byte) string {
	ts := strconv.FormatInt(t.Unix(), 10)
	mac := hmac.New(sha256.New, []byte(secret))
	mac.Write([]byte(ts))
	mac.Write([]byte("."))
	mac.Write(body)
	return "t=" + ts + ",v1=" + hex.EncodeToString(mac.Sum(nil))
}

// PusherOptions are what NewPusher needs: the database, the host's
// webhook and how to pace it.
type PusherOptions struct {
	DB *gorm.DB
	// URL is the host application's webhook; empty turns the push off.
	URL string
	// Secret signs every delivery (SignatureHeader).
	Secret string
	// Lease is how long one instance may push before it must renew; another
	// instance takes over when it lapses (a crashed pusher). Default 30 s.
	Lease time.Duration
	// Idle is how long to wait when there is nothing to push. Default 1 s.
	Idle time.Duration
	// MinBackoff and MaxBackoff bound the wait between attempts at one
	// failing event (doubling, with jitter). Default 1 s and 5 min.
	MinBackoff time.Duration
	MaxBackoff time.Duration
	// Client sends the deliveries; nil is a client with a 10 s timeout.
	Client *http.Client
	// Logger receives failed pushes; nil discards them.
	Logger *slog.Logger
	// Now is the clock; nil is time.Now.
	Now func() time.Time
	// Registry receives the push metrics (lag, failures, how long the
	// receiver has been failing); nil leaves them unregistered.
	Registry prometheus.Registerer
}

// Pusher delivers the event feed to the host application's webhook, in feed
// order and at least once: the cursor moves past an event only after the
// host answered 2xx, and a failing event is retried with backoff, never
// skipped. Receivers should deduplicate by the event id. Every replica runs a
// Pusher; a lease in the database lets one push at a time.
type Pusher struct {
	db     *gorm.DB
	feed   *Feed
	cfg    PusherOptions
	logger *slog.Logger
	now    func() time.Time
	holder string

	failures prometheus.Counter
	// failingSince is when the event being pushed first failed (unix
	// nanoseconds), 0 while pushes succeed.
	failingSince atomic.Int64
}

// NewPusher returns a Pusher; Run does nothing when o.URL is empty.
func NewPusher(o PusherOptions) *Pusher {
	if o.Lease <= 0 {
		o.Lease = 30 * time.Second
	}
	if o.Idle <= 0 {
		o.Idle = time.Second
	}
	if o.MinBackoff <= 0 {
		o.MinBackoff = time.Second
	}
	if o.MaxBackoff <= 0 {
		o.MaxBackoff = 5 * time.Minute
	}
	if o.Client == nil {
		o.Client = &http.Client{Timeout: 10 * time.Second}
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	var b [8]byte
	_, _ = crand.Read(b[:])
	p := &Pusher{db: o.DB, feed: NewFeed(o.DB), cfg: o, logger: o.Logger, now: o.Now, holder: hex.EncodeToString(b[:])}
	p.failures = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "tally_events_push_failures_total",
		Help: "Failed deliveries of business events to the host's webhook (each attempt counts).",
	})
	if o.Registry != nil && o.URL != "" {
		o.Registry.MustRegister(p.failures,
			prometheus.NewGaugeFunc(prometheus.GaugeOpts{
				Name: "tally_events_push_lag_seconds",
				Help: "Age of the oldest business event not yet delivered to the host's webhook (0 when none waits).",
			}, func() float64 {
				ctx, cancel := context.WithTimeout(context.Background(), time.Second)
				defer cancel()
				d, err := p.Lag(ctx)
				if err != nil {
					return 0
				}
				return d.Seconds()
			}),
			prometheus.NewGaugeFunc(prometheus.GaugeOpts{
				Name: "tally_events_push_failing_seconds",
				Help: "How long this instance has been failing to deliver the same business event to the host's webhook (0 while deliveries succeed).",
			}, func() float64 {
				since := p.failingSince.Load()
				if since == 0 {
					return 0
				}
				return p.now().Sub(time.Unix(0, since)).Seconds()
			}))
	}
	return p
}

// Lag is the age of the oldest event the push has not delivered yet, 0
// when none waits. The feed's (txid, id) index answers it.
func (p *Pusher) Lag(ctx context.Context) (time.Duration, error) {
	var oldest []time.Time
	err := p.db.WithContext(ctx).Raw(`SELECT e.created_at FROM events e, event_push_state s
		WHERE s.id = 1 AND (e.txid, e.id) > (s.cursor_txid, s.cursor_id)
		ORDER BY e.txid, e.id LIMIT 1`).Scan(&oldest).Error
	if err != nil {
		return 0, db.Translate(err, nil)
	}
	if len(oldest) == 0 {
		return 0, nil
	}
	return max(p.now().Sub(oldest[0]), 0), nil
}

// Name names the worker in logs.
func (p *Pusher) Name() string { return "event-push" }

// Run pushes until ctx ends.
func (p *Pusher) Run(ctx context.Context) error {
	if p.cfg.URL == "" {
		return nil
	}
	for {
		pushed, err := p.PushOnce(ctx)
		if err != nil && ctx.Err() == nil {
			p.logger.Warn("event push", "error", err)
		}
		if pushed > 0 && err == nil {
			continue
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(p.cfg.Idle):
		}
	}
}

// PushOnce takes the lease if it is free, then delivers one page of events.
// It returns how many were delivered; 0 with no error when another instance
// holds the lease or nothing is waiting.
func (p *Pusher) PushOnce(ctx context.Context) (int, error) {
	cursor, ok, err := p.lease(ctx)
	if err != nil || !ok {
		return 0, err
	}
	page, err := p.feed.List(ctx, cursor, 100)
	if err != nil {
		return 0, err
	}
	for i, e := range page.Events {
		if err := p.deliverWithRetry(ctx, e); err != nil {
			return i, err
		}
		if err := p.advance(ctx, e.Position); err != nil {
			return i + 1, err
		}
	}
	return len(page.Events), nil
}

// pushStateRow is the one row of event_push_state: how far the push has
// got in the feed and which instance holds the lease to push. The cursor's
// txid is xid8, which has no Go type: it is written from text.
type pushStateRow struct {
	ID         int `gorm:"primaryKey"`
	CursorTxid string
	CursorID   int64
	Holder     *string
	LeaseUntil *time.Time
	LastError  *string
	UpdatedAt  time.Time `gorm:"autoUpdateTime:false"`
}

func (pushStateRow) TableName() string { return "event_push_state" }

// held addresses the push state while this instance holds the lease.
func (p *Pusher) held(ctx context.Context) *gorm.DB {
	return p.db.WithContext(ctx).Model(&pushStateRow{}).Where("id = 1 AND holder = ?", p.holder)
}

// lease takes the lease, or renews it, unless another instance holds it
// unexpired; it stays SQL, a conditional claim that returns the cursor.
func (p *Pusher) lease(ctx context.Context) (Cursor, bool, error) {
	var rows []struct {
		TxID string
		ID   int64
	}
	now := p.now()
	err := p.db.WithContext(ctx).Raw(`
		UPDATE event_push_state SET holder = ?, lease_until = ?, updated_at = ?
		WHERE id = 1 AND (holder IS NULL OR holder = ? OR lease_until < ?)
		RETURNING cursor_txid::text AS tx_id, cursor_id AS id`,
		p.holder, now.Add(p.cfg.Lease), now, p.holder, now).Scan(&rows).Error
	if err != nil {
		return Cursor{}, false, db.Translate(err, nil)
	}
	if len(rows) == 0 {
		return Cursor{}, false, nil
	}
	txid, err := strconv.ParseUint(rows[0].TxID, 10, 64)
	if err != nil {
		return Cursor{}, false, fmt.Errorf("events: push cursor %q: %w", rows[0].TxID, err)
	}
	return Cursor{TxID: txid, ID: rows[0].ID}, true, nil
}

// advance moves the cursor, only while this instance still holds the lease.
func (p *Pusher) advance(ctx context.Context, c Cursor) error {
	now := p.now()
	res := p.held(ctx).Updates(map[string]any{
		"cursor_txid": gorm.Expr("?::text::xid8", strconv.FormatUint(c.TxID, 10)),
		"cursor_id":   c.ID,
		"lease_until": now.Add(p.cfg.Lease),
		"last_error":  nil,
		"updated_at":  now,
	})
	if res.Error != nil {
		return db.Translate(res.Error, nil)
	}
	if res.RowsAffected == 0 {
		return fmt.Errorf("events: push lease lost")
	}
	return nil
}

func (p *Pusher) deliverWithRetry(ctx context.Context, e Stored) error {
	body, err := json.Marshal(struct {
		ID         string          `json:"id"`
		Type       string          `json:"type"`
		CustomerID *string         `json:"customer_id,omitempty"`
		Data       json.RawMessage `json:"data"`
		CreatedAt  time.Time       `json:"created_at"`
	}{"evt_" + strconv.FormatInt(e.ID, 10), e.Type, nonEmpty(e.CustomerID), e.Data, e.CreatedAt})
	if err != nil {
		return err
	}
	wait := p.cfg.MinBackoff
	for attempt := 1; ; attempt++ {
		err := p.deliver(ctx, e, body)
		if err == nil {
			p.failingSince.Store(0)
			return nil
		}
		p.failures.Inc()
		p.failingSince.CompareAndSwap(0, p.now().UnixNano())
		p.logger.Warn("event push failed", "event_id", e.ID, "attempt", attempt, "error", err)
		// Keep the lease through the wait; if it is gone, another instance
		// has taken over and this one stops rather than push the same event.
		res := p.held(ctx).Updates(map[string]any{
			"last_error":  text.Truncate(err.Error(), 2000),
			"lease_until": p.now().Add(p.cfg.Lease + wait),
		})
		if res.Error != nil {
			return db.Translate(res.Error, nil)
		}
		if res.RowsAffected == 0 {
			return fmt.Errorf("events: push lease lost")
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(wait/2 + rand.N(wait/2+1)):
		}
		wait = min(wait*2, p.cfg.MaxBackoff)
	}
}

func (p *Pusher) deliver(ctx context.Context, e Stored, body []byte) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, p.cfg.URL, bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("User-Agent", "tally-webhooks/1")
	req.Header.Set("Tally-Event-Id", "evt_"+strconv.FormatInt(e.ID, 10))
	req.Header.Set("Tally-Event-Type", e.Type)
	req.Header.Set(SignatureHeader, Sign(p.cfg.Secret, p.now(), body))
	resp, err := p.cfg.Client.Do(req)
	if err != nil {
		return err
	}
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	resp.Body.Close()
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		return fmt.Errorf("host answered %d", resp.StatusCode)
	}
	return nil
}

func nonEmpty(s string) *string {
	if s == "" {
		return nil
	}
	return &s
}
