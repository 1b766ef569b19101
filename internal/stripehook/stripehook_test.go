package stripehook_test

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/config"
	"github.com/tallybilling/tally/internal/db/dbtest"
	"github.com/tallybilling/tally/internal/payments"
	"github.com/tallybilling/tally/internal/stripehook"
)

// defaultOptions are the Options app.New passes on a default configuration
// (config.Default), over a payments Service configured the same way.
func defaultOptions(t *testing.T, gdb *gorm.DB, secrets ...string) stripehook.Options {
	cfg := config.Default()
	pay := payments.New(payments.Options{DB: gdb, Config: cfg.Checkout, RevokeFrom: cfg.Credits.RevokeFrom})
	return stripehook.Options{DB: gdb, Payments: pay, Secrets: secrets, MaxAttempts: cfg.Stripe.EventMaxAttempts,
		RetryInterval: cfg.Stripe.EventRetryInterval, Lease: cfg.Stripe.EventLease, Logger: dbtest.Logger(t)}
}

// Settings come from config, which holds every default: an unset attempt
// limit or retry interval in hand-built Options is a programming error that
// New refuses, rather than quietly choosing a value of its own.
func TestNewRefusesUnsetSettings(t *testing.T) {
	t.Parallel()
	for name, tweak := range map[string]func(*stripehook.Options){
		"MaxAttempts":   func(o *stripehook.Options) { o.MaxAttempts = 0 },
		"RetryInterval": func(o *stripehook.Options) { o.RetryInterval = 0 },
		"Lease":         func(o *stripehook.Options) { o.Lease = 0 },
	} {
		t.Run(name, func(t *testing.T) {
			o := defaultOptions(t, nil)
			tweak(&o)
			defer func() {
				if msg := fmt.Sprint(recover()); !strings.Contains(msg, name) {
					t.Fatalf("New panicked with %q, want the unset %s named", msg, name)
				}
			}()
			stripehook.New(o)
		})
	}
}

// Replicas retrying at once never take the same event: every due event is
// claimed by exactly one RetryDue call and processed once.
func TestRetryClaimsNeverOverlap(t *testing.T) {
	t.Parallel()
	gdb := dbtest.New(t)
	ctx := context.Background()
	past := time.Now().Add(-time.Minute)
	const n = 60
	for i := range n {
		err := gdb.Exec(`INSERT INTO stripe_events (id, type, livemode, payload, status, attempts, next_attempt_at, received_at)
			VALUES (?, 'radar.early_fraud_warning.created', false, ?, 'failed', 1, ?, ?)`,
			fmt.Sprintf("evt_due_%d", i),
			fmt.Sprintf(`{"id":"evt_due_%d","object":"event","type":"radar.early_fraud_warning.created","data":{"object":{"id":"issfr_%d"}}}`, i, i),
			past, past).Error
		if err != nil {
			t.Fatal(err)
		}
	}
	intakes := make([]*stripehook.Intake, 4)
	for i := range intakes {
		intakes[i] = stripehook.New(defaultOptions(t, gdb))
	}
	var claimed atomic.Int64
	var wg sync.WaitGroup
	for i := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				got, err := intakes[i%len(intakes)].RetryDue(ctx, 7)
				if err != nil {
					t.Error(err)
					return
				}
				if got == 0 {
					return
				}
				claimed.Add(int64(got))
			}
		}()
	}
	wg.Wait()
	if claimed.Load() != n {
		t.Fatalf("claimed %d events in total, want %d (each once)", claimed.Load(), n)
	}
	var wrong int64
	if err := gdb.Raw(`SELECT count(*) FROM stripe_events WHERE status <> 'ignored' OR attempts <> 2`).Scan(&wrong).Error; err != nil || wrong != 0 {
		t.Fatalf("%d events not processed exactly once (%v)", wrong, err)
	}
}

// An outcome is recorded without waiting for the WAL flush, for its own
// statement only: the pooled connection that recorded it still commits
// synchronously afterwards, so the money transactions that run on it next
// keep their durability.
func TestOutcomeCommitLeavesTheConnectionSynchronous(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	// One connection: whatever the outcome's statement left on its
	// session, the checks below see.
	gdb := dbtest.NewOneConn(t)
	past := time.Now().Add(-time.Minute)
	err := gdb.Exec(`INSERT INTO stripe_events (id, type, livemode, payload, status, attempts, next_attempt_at, received_at)
		VALUES ('evt_sync_1', 'radar.early_fraud_warning.created', false,
		'{"id":"evt_sync_1","object":"event","type":"radar.early_fraud_warning.created","data":{"object":{"id":"issfr_1"}}}',
		'failed', 1, ?, ?)`, past, past).Error
	if err != nil {
		t.Fatal(err)
	}
	if got, err := stripehook.New(defaultOptions(t, gdb)).RetryDue(ctx, 5); err != nil || got != 1 {
		t.Fatalf("RetryDue = %d, %v; want the one event", got, err)
	}
	var status string
	var attempts int
	if err := gdb.Raw(`SELECT status, attempts FROM stripe_events WHERE id = 'evt_sync_1'`).Row().Scan(&status, &attempts); err != nil {
		t.Fatal(err)
	}
	if status != "ignored" || attempts != 2 {
		t.Fatalf("event %s after %d attempts, want ignored after 2", status, attempts)
	}
	var setting string
	if err := gdb.Raw(`SHOW synchronous_commit`).Row().Scan(&setting); err != nil {
		t.Fatal(err)
	}
	if setting != "on" {
		t.Fatalf("synchronous_commit on the connection afterwards = %q, want on", setting)
	}
}
