// Package events is tally's outbound business event log: every change that a
// host application may care about (payment succeeded, credits low, usage dead,
// ...) is appended in the same database transaction as the change itself, and
// read back as a feed that a poller follows with a cursor.
package events

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
	"time"

	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/errs"
)

// Stored is an event as the feed returns it.
type Stored struct {
	ID         int64
	Type       string
	CustomerID string
	Data       json.RawMessage
	CreatedAt  time.Time
	// Position is the feed cursor just after this event.
	Position Cursor
}

// Append writes an event of data's type about customerID ("" for none)
// inside the caller's transaction tx, so the event exists if and only if the
// change that caused it commits.
func Append(ctx context.Context, tx *gorm.DB, customerID string, data Payload) error {
	typ, body, err := Encode(data)
	if err != nil {
		return err
	}
	var customer *string
	if customerID != "" {
		customer = &customerID
	}
	err = tx.WithContext(ctx).Exec(
		`INSERT INTO events (type, customer_id, data) VALUES (?, ?, ?)`,
		typ, customer, body).Error
	return db.Translate(err, nil)
}

// Entry is one event for AppendMany: Data about CustomerID ("" for none).
type Entry struct {
	CustomerID string
	Data       Payload
}

// AppendMany writes entries, in their order, inside the caller's
// transaction tx, as Append writes each, in one statement whatever their
// number: for a change that makes many events at once (a batch of usage
// naming thousands of customers new to tally).
func AppendMany(ctx context.Context, tx *gorm.DB, entries []Entry) error {
	if len(entries) == 0 {
		return nil
	}
	types := make([]string, len(entries))
	customers := make([]*string, len(entries))
	bodies := make([]string, len(entries))
	for i, e := range entries {
		typ, body, err := Encode(e.Data)
		if err != nil {
			return err
		}
		types[i], bodies[i] = typ, body
		if e.CustomerID != "" {
			customers[i] = &e.CustomerID
		}
	}
	err := tx.WithContext(ctx).Exec(`INSERT INTO events (type, customer_id, data)
		SELECT e.type, e.customer_id, e.data::jsonb
		FROM unnest(?::text[], ?::text[], ?::text[]) WITH ORDINALITY AS e(type, customer_id, data, n)
		ORDER BY e.n`, db.Array(types), db.Array(customers), db.Array(bodies)).Error
	return db.Translate(err, nil)
}

// Encode is data as Append stores it: the event type and the JSON of its
// data column, for a caller that writes the events row in a statement of
// its own (a CTE that saves a round trip) rather than through Append.
func Encode(data Payload) (typ, body string, err error) {
	if data == nil {
		return "", "", errs.E(errs.Internal, "event without a payload")
	}
	b, err := json.Marshal(data)
	if err != nil {
		return "", "", fmt.Errorf("events: marshal %s: %w", data.Type(), err)
	}
	return data.Type(), string(b), nil
}

// Cursor is a position in the feed: the (transaction id, event id) of the last
// event seen. The zero Cursor is the beginning.
type Cursor struct {
	TxID uint64
	ID   int64
}

// String encodes c as the opaque token clients pass back as `after`.
func (c Cursor) String() string {
	return base64.RawURLEncoding.EncodeToString([]byte(strconv.FormatUint(c.TxID, 10) + "." + strconv.FormatInt(c.ID, 10)))
}

// ParseCursor decodes a token made by Cursor.String; "" is the beginning.
// A malformed token is errs.Invalid.
func ParseCursor(token string) (Cursor, error) {
	if token == "" {
		return Cursor{}, nil
	}
	bad := errs.InvalidField("after", "malformed cursor; pass back a next_cursor returned by this feed")
	raw, err := base64.RawURLEncoding.DecodeString(token)
	if err != nil {
		return Cursor{}, bad
	}
	tx, id, ok := strings.Cut(string(raw), ".")
	if !ok {
		return Cursor{}, bad
	}
	var c Cursor
	if c.TxID, err = strconv.ParseUint(tx, 10, 64); err != nil {
		return Cursor{}, bad
	}
	if c.ID, err = strconv.ParseInt(id, 10, 64); err != nil || c.ID < 0 {
		return Cursor{}, bad
	}
	return c, nil
}

// Page is one page of the feed; Next is where to continue (equal to the
// requested position when the page is empty).
type Page struct {
	Events []Stored
	Next   Cursor
}

// Feed reads the event log.
type Feed struct {
	db *gorm.DB
}

// NewFeed returns a Feed over gdb.
func NewFeed(gdb *gorm.DB) *Feed { return &Feed{db: gdb} }

// List returns up to limit events after the cursor, oldest first. An event is
// listed only once every transaction that started before its own has ended,
// so no event can later appear behind a cursor that a poller already holds.
// The price is that a long-running transaction delays the feed (never loses
// from it).
func (f *Feed) List(ctx context.Context, after Cursor, limit int) (Page, error) {
	if err := db.CheckPageSize(limit); err != nil {
		return Page{}, err
	}
	type row struct {
		ID         int64
		TxID       string
		Type       string
		CustomerID *string
		Data       string
		CreatedAt  time.Time
	}
	var rows []row
	// The horizon (txid below every running transaction's) is the feed's
	// guarantee, so this stays SQL.
	err := f.db.WithContext(ctx).Raw(`
		SELECT id, txid::text AS tx_id, type, customer_id, data::text AS data, created_at
		FROM events
		WHERE (txid, id) > (?::text::xid8, ?)
		  AND txid < pg_snapshot_xmin(pg_current_snapshot())
		ORDER BY txid, id
		LIMIT ?`, strconv.FormatUint(after.TxID, 10), after.ID, limit).Scan(&rows).Error
	if err != nil {
		return Page{}, db.Translate(err, nil)
	}
	page := Page{Events: make([]Stored, 0, len(rows)), Next: after}
	for _, r := range rows {
		txid, err := strconv.ParseUint(r.TxID, 10, 64)
		if err != nil {
			return Page{}, fmt.Errorf("events: bad txid %q: %w", r.TxID, err)
		}
		s := Stored{ID: r.ID, Type: r.Type, Data: json.RawMessage(r.Data), CreatedAt: r.CreatedAt, Position: Cursor{TxID: txid, ID: r.ID}}
		if r.CustomerID != nil {
			s.CustomerID = *r.CustomerID
		}
		page.Events = append(page.Events, s)
		page.Next = s.Position
	}
	return page, nil
}

// HeldBack reports how long the oldest committed event has been waiting
// below the feed's horizon, i.e. held back by an older transaction still
// running somewhere on the server (0 when nothing waits). Operators watch it
// as tally_events_feed_held_back_seconds.
func (f *Feed) HeldBack(ctx context.Context) (time.Duration, error) {
	var secs *float64
	err := f.db.WithContext(ctx).Raw(`
		SELECT extract(epoch FROM now() - min(created_at))::float8
		FROM events
		WHERE txid >= pg_snapshot_xmin(pg_current_snapshot())`).Scan(&secs).Error
	if err != nil {
		return 0, db.Translate(err, nil)
	}
	if secs == nil || *secs < 0 {
		return 0, nil
	}
	return time.Duration(*secs * float64(time.Second)), nil
}
