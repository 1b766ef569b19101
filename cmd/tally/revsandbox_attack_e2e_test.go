package main

import (
	"context"
	"fmt"
	"maps"
	"testing"
	"time"
)

// Two replicas with the sandbox on, started at the same moment on a
// database where the sandbox never ran: both come up (the sandbox's schema
// and migrations are created once, whoever gets there first).
func TestRevSandboxTwoProcessesStartAtOnce(t *testing.T) {
	t.Parallel()
	for round := range 10 {
		env := sandboxEnv(t)
		type result struct {
			err  error
			logs string
		}
		const n = 3
		results := make(chan result, n)
		stops := make([]context.CancelFunc, n)
		dones := make([]chan error, n)
		for i := range n {
			e := maps.Clone(env)
			ctx, cancel := context.WithCancel(context.Background())
			stops[i] = cancel
			done := make(chan error, 1)
			dones[i] = done
			logs := &syncBuffer{}
			bound := make(chan struct{}, 1)
			renv := environment{getenv: func(k string) string { return e[k] }, stdout: logs, stderr: logs,
				listening: func(string, string) { bound <- struct{}{} }}
			go func() { done <- runIn(ctx, []string{"tally", "serve"}, renv) }()
			go func() {
				select {
				case <-bound:
					results <- result{}
				case err := <-done:
					done <- err
					results <- result{err: fmt.Errorf("exited before it listened: %v", err), logs: logs.String()}
				case <-time.After(patience):
					results <- result{err: fmt.Errorf("did not listen within %s", patience), logs: logs.String()}
				}
			}()
		}
		for range n {
			if r := <-results; r.err != nil {
				t.Errorf("round %d: a replica %v\n%s", round, r.err, r.logs)
			}
		}
		for i := range n {
			stops[i]()
			select {
			case <-dones[i]:
			case <-time.After(20 * time.Second):
				t.Errorf("round %d: replica %d did not stop", round, i)
			}
		}
		if t.Failed() {
			return
		}
	}
}
