package sandbox

import (
	"context"
	"database/sql"
	"embed"
	"encoding/json"
	"fmt"
	"io/fs"
	"time"

	"github.com/pressly/goose/v3"
	"github.com/pressly/goose/v3/lock"
	"gorm.io/gorm"
)

// Store keeps an Account's state. Commit is called with the account's
// lock held, once per operation, with everything the operation changed:
// a store that takes it whole or not at all keeps the account consistent.
type Store interface {
	Load(ctx context.Context) (Snapshot, error)
	Commit(ctx context.Context, ch changes) error
}

// Snapshot is a stored state.
type Snapshot struct {
	Objects     []*object
	Events      []*event
	Deliveries  []*Delivery
	Attempts    []Attempt
	Idempotency map[string]idempotentResult
	MeterEvents []MeterEvent
}

// changes is what one operation wrote.
type changes struct {
	Objects     []*object
	Events      []*event
	Deliveries  []*Delivery
	Attempts    []Attempt
	Idempotency map[string]idempotentResult
	MeterEvents []MeterEvent
}

func (c changes) empty() bool {
	return len(c.Objects) == 0 && len(c.Events) == 0 && len(c.Deliveries) == 0 && len(c.Attempts) == 0 &&
		len(c.Idempotency) == 0 && len(c.MeterEvents) == 0
}

// memoryStore keeps nothing beyond the account's own memory (tests).
type memoryStore struct{}

func (memoryStore) Load(context.Context) (Snapshot, error) { return Snapshot{}, nil }
func (memoryStore) Commit(context.Context, changes) error  { return nil }

// The sandbox's schema is its own: the stripe_sandbox schema, migrated by
// its own numbered files with their own goose version table, and created
// only where a sandbox runs, so that a production database never holds it.
//
//go:embed migrations/*.sql
var migrationFiles embed.FS

// Schema is the PostgreSQL schema of the sandbox's tables.
const Schema = "stripe_sandbox"

// migrationLockID keys the advisory lock of the sandbox's migrations (crc32
// of "tally sandbox migrations"), distinct from tally's own.
const migrationLockID int64 = 1436612377

// PostgresStore keeps the state in the stripe_sandbox schema of tally's
// database, so it survives a restart of tally.
type PostgresStore struct{ db *gorm.DB }

// OpenPostgresStore creates the stripe_sandbox schema when missing and
// applies its migrations.
func OpenPostgresStore(ctx context.Context, gdb *gorm.DB) (*PostgresStore, error) {
	// CREATE SCHEMA IF NOT EXISTS is not safe against itself: of two
	// replicas starting at once on a database where no sandbox ran, one
	// failed on pg_namespace's unique index and did not start. The
	// migrations' lock, taken for the transaction, puts them in turn.
	err := gdb.WithContext(ctx).Transaction(func(tx *gorm.DB) error {
		if err := tx.Exec(`SELECT pg_advisory_xact_lock(?)`, migrationLockID).Error; err != nil {
			return err
		}
		return tx.Exec(`CREATE SCHEMA IF NOT EXISTS ` + Schema).Error
	})
	if err != nil {
		return nil, fmt.Errorf("sandbox: create schema %s: %w", Schema, err)
	}
	sqlDB, err := gdb.DB()
	if err != nil {
		return nil, err
	}
	sub, err := fs.Sub(migrationFiles, "migrations")
	if err != nil {
		return nil, err
	}
	locker, err := lock.NewPostgresSessionLocker(lock.WithLockID(migrationLockID), lock.WithLockTimeout(1, 60))
	if err != nil {
		return nil, err
	}
	p, err := goose.NewProvider(goose.DialectPostgres, sqlDB, sub,
		goose.WithSessionLocker(locker), goose.WithDisableGlobalRegistry(true),
		goose.WithTableName(Schema+".goose_db_version"))
	if err != nil {
		return nil, fmt.Errorf("sandbox: migrations: %w", err)
	}
	if _, err := p.Up(ctx); err != nil {
		return nil, fmt.Errorf("sandbox: migrate: %w", err)
	}
	return &PostgresStore{db: gdb}, nil
}

type objectRow struct {
	ID      string
	Type    string
	Seq     int64
	Data    string
	Private string
}

type eventRow struct {
	ID      string
	Seq     int64
	Type    string
	Created int64
	Payload string
}

type idempotencyRow struct {
	Key       string
	Method    string
	Path      string
	Params    string
	Status    int
	Body      string
	CreatedAt time.Time
}

type meterEventRow struct {
	Seq        int64
	Identifier string
	EventName  string
	Payload    string
	Ts         time.Time
	Via        string
	Duplicate  bool
	ReceivedAt time.Time
}

// Load reads the whole state.
func (s *PostgresStore) Load(ctx context.Context) (Snapshot, error) {
	var snap Snapshot
	db := s.db.WithContext(ctx)
	var objs []objectRow
	if err := db.Raw(`SELECT id, type, seq, data::text AS data, private::text AS private FROM ` + Schema + `.objects ORDER BY seq`).Scan(&objs).Error; err != nil {
		return snap, err
	}
	for _, r := range objs {
		snap.Objects = append(snap.Objects, &object{id: r.ID, typ: r.Type, seq: r.Seq, data: decodeObject([]byte(r.Data)), private: decodeObject([]byte(r.Private))})
	}
	var evs []eventRow
	if err := db.Raw(`SELECT id, seq, type, created, payload FROM ` + Schema + `.events ORDER BY seq`).Scan(&evs).Error; err != nil {
		return snap, err
	}
	for _, r := range evs {
		snap.Events = append(snap.Events, &event{id: r.ID, seq: r.Seq, typ: r.Type, created: r.Created, payload: []byte(r.Payload)})
	}
	if err := db.Raw(`SELECT event_id, event_type, seq, status, attempts, next_attempt_at, last_status, last_answer, last_error, delivered_at, created_at
		FROM ` + Schema + `.deliveries ORDER BY seq`).Scan(&snap.Deliveries).Error; err != nil {
		return snap, err
	}
	if err := db.Raw(`SELECT event_id, event_type, attempt AS n, at, status, answer, error, duration_ms
		FROM ` + Schema + `.delivery_attempts ORDER BY at, attempt`).Scan(&snap.Attempts).Error; err != nil {
		return snap, err
	}
	var keys []idempotencyRow
	if err := db.Raw(`SELECT key, method, path, params, status, body, created_at FROM ` + Schema + `.idempotency_keys`).Scan(&keys).Error; err != nil {
		return snap, err
	}
	snap.Idempotency = map[string]idempotentResult{}
	for _, k := range keys {
		var form map[string][]string
		if err := json.Unmarshal([]byte(k.Params), &form); err != nil {
			return snap, fmt.Errorf("idempotency key %q: %w", k.Key, err)
		}
		snap.Idempotency[k.Key] = idempotentResult{method: k.Method, path: k.Path, form: form, status: k.Status, body: []byte(k.Body), at: k.CreatedAt}
	}
	var mes []meterEventRow
	if err := db.Raw(`SELECT seq, identifier, event_name, payload::text AS payload, ts, via, duplicate, received_at FROM ` + Schema + `.meter_events ORDER BY seq`).Scan(&mes).Error; err != nil {
		return snap, err
	}
	for _, r := range mes {
		var payload map[string]string
		if err := json.Unmarshal([]byte(r.Payload), &payload); err != nil {
			return snap, fmt.Errorf("meter event %q: %w", r.Identifier, err)
		}
		snap.MeterEvents = append(snap.MeterEvents, MeterEvent{Seq: r.Seq, Identifier: r.Identifier, EventName: r.EventName, Payload: payload,
			Timestamp: r.Ts, Via: r.Via, Duplicate: r.Duplicate, ReceivedAt: r.ReceivedAt})
	}
	return snap, nil
}

// Commit writes ch in one transaction.
func (s *PostgresStore) Commit(ctx context.Context, ch changes) error {
	return s.db.WithContext(ctx).Transaction(func(tx *gorm.DB) error {
		for _, o := range ch.Objects {
			data, err := json.Marshal(o.data)
			if err != nil {
				return err
			}
			private, err := json.Marshal(o.private)
			if err != nil {
				return err
			}
			if err := tx.Exec(`INSERT INTO `+Schema+`.objects (id, type, seq, data, private, updated_at) VALUES (?, ?, ?, ?::jsonb, ?::jsonb, now())
				ON CONFLICT (id) DO UPDATE SET data = EXCLUDED.data, private = EXCLUDED.private, updated_at = now()`,
				o.id, o.typ, o.seq, string(data), string(private)).Error; err != nil {
				return err
			}
		}
		for _, ev := range ch.Events {
			if err := tx.Exec(`INSERT INTO `+Schema+`.events (id, seq, type, created, payload) VALUES (?, ?, ?, ?, ?)`,
				ev.id, ev.seq, ev.typ, ev.created, string(ev.payload)).Error; err != nil {
				return err
			}
		}
		for _, d := range ch.Deliveries {
			if err := tx.Exec(`INSERT INTO `+Schema+`.deliveries (event_id, event_type, seq, status, attempts, next_attempt_at, last_status, last_answer, last_error, delivered_at, created_at)
				VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
				ON CONFLICT (event_id) DO UPDATE SET status = EXCLUDED.status, attempts = EXCLUDED.attempts, next_attempt_at = EXCLUDED.next_attempt_at,
					last_status = EXCLUDED.last_status, last_answer = EXCLUDED.last_answer, last_error = EXCLUDED.last_error, delivered_at = EXCLUDED.delivered_at`,
				d.EventID, d.EventType, d.Seq, d.Status, d.Attempts, d.NextAttemptAt, d.LastStatus, d.LastAnswer, d.LastError, d.DeliveredAt, d.CreatedAt).Error; err != nil {
				return err
			}
		}
		for _, at := range ch.Attempts {
			if err := tx.Exec(`INSERT INTO `+Schema+`.delivery_attempts (event_id, event_type, attempt, at, status, answer, error, duration_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?)`,
				at.EventID, at.EventType, at.N, at.At, at.Status, at.Answer, at.Error, at.DurationMS).Error; err != nil {
				return err
			}
		}
		for key, r := range ch.Idempotency {
			params, err := json.Marshal(r.form)
			if err != nil {
				return err
			}
			if err := tx.Exec(`INSERT INTO `+Schema+`.idempotency_keys (key, method, path, params, status, body, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)
				ON CONFLICT (key) DO UPDATE SET method = EXCLUDED.method, path = EXCLUDED.path, params = EXCLUDED.params,
					status = EXCLUDED.status, body = EXCLUDED.body, created_at = EXCLUDED.created_at`,
				key, r.method, r.path, string(params), r.status, string(r.body), r.at).Error; err != nil {
				return err
			}
		}
		for _, me := range ch.MeterEvents {
			payload, err := json.Marshal(me.Payload)
			if err != nil {
				return err
			}
			if err := tx.Exec(`INSERT INTO `+Schema+`.meter_events (seq, identifier, event_name, payload, ts, via, duplicate, received_at) VALUES (?, ?, ?, ?::jsonb, ?, ?, ?, ?)`,
				me.Seq, me.Identifier, me.EventName, string(payload), me.Timestamp, me.Via, me.Duplicate, me.ReceivedAt).Error; err != nil {
				return err
			}
		}
		return nil
	}, &sql.TxOptions{})
}
