package main

import (
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"net/url"
	"sync"
	"testing"
	"time"

	"github.com/tallybilling/tally/pkg/client"
)

// dbProxy stands between tally and PostgreSQL so a test can take the
// database away (every connection cut, new ones refused) and bring it back on
// the same address, as a database restart or failover looks to the service.
type dbProxy struct {
	t      testing.TB
	target string
	addr   string
	mu     sync.Mutex
	ln     net.Listener
	conns  map[net.Conn]bool
}

func newDBProxy(t testing.TB, target string) *dbProxy {
	// The first up binds a port of its own; later ones take it again.
	p := &dbProxy{t: t, target: target, addr: "127.0.0.1:0", conns: map[net.Conn]bool{}}
	p.up()
	t.Cleanup(p.down)
	return p
}

func (p *dbProxy) up() {
	p.t.Helper()
	var ln net.Listener
	var err error
	for range 50 { // the port may linger briefly after down
		if ln, err = net.Listen("tcp", p.addr); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		p.t.Fatalf("proxy listen: %v", err)
	}
	p.mu.Lock()
	p.ln = ln
	p.addr = ln.Addr().String()
	p.mu.Unlock()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go p.pipe(c)
		}
	}()
}

func (p *dbProxy) pipe(c net.Conn) {
	s, err := net.Dial("tcp", p.target)
	if err != nil {
		c.Close()
		return
	}
	p.mu.Lock()
	p.conns[c], p.conns[s] = true, true
	p.mu.Unlock()
	go func() { _, _ = io.Copy(s, c); s.Close() }()
	_, _ = io.Copy(c, s)
	c.Close()
}

func (p *dbProxy) down() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.ln != nil {
		p.ln.Close()
		p.ln = nil
	}
	for c := range p.conns {
		c.Close()
	}
	p.conns = map[net.Conn]bool{}
}

func getStatus(t testing.TB, u string) int {
	t.Helper()
	resp, err := http.Get(u)
	if err != nil {
		t.Fatalf("GET %s: %v", u, err)
	}
	resp.Body.Close()
	return resp.StatusCode
}

func waitStatus(t testing.TB, u string, want int, within time.Duration) time.Duration {
	t.Helper()
	start := time.Now()
	for {
		if getStatus(t, u) == want {
			return time.Since(start)
		}
		if time.Since(start) > within {
			t.Fatalf("GET %s did not answer %d within %s", u, want, within)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// With the database gone, tally stays alive, reports not ready and answers
// 503 problem+json; when the database returns it recovers without a restart.
func TestDatabaseOutageAndRecovery(t *testing.T) {
	t.Parallel()
	env := baseEnv(t)
	u, err := url.Parse(env["TALLY_DATABASE_URL"])
	if err != nil {
		t.Fatal(err)
	}
	proxy := newDBProxy(t, u.Host)
	u.Host = proxy.addr
	env["TALLY_DATABASE_URL"] = u.String()
	s := startServer(t, env)
	ctx := context.Background()

	if got := getStatus(t, s.URL+"/readyz"); got != http.StatusOK {
		t.Fatalf("readyz before the outage = %d", got)
	}
	if r, err := s.service(t).UpsertCustomerWithResponse(ctx, "dave", client.CustomerUpsert{}); err != nil || r.StatusCode() != http.StatusCreated {
		t.Fatalf("create dave: %v %v", err, r)
	}

	proxy.down()
	took := waitStatus(t, s.URL+"/readyz", http.StatusServiceUnavailable, 5*time.Second)
	t.Logf("readyz went 503 %s after the database vanished", took)
	if got := getStatus(t, s.URL+"/healthz"); got != http.StatusOK {
		t.Fatalf("healthz during the outage = %d, want 200 (the process is alive)", got)
	}
	r, err := s.service(t).GetCustomerWithResponse(ctx, "dave")
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "read during the outage", r.StatusCode(), r.Body, http.StatusServiceUnavailable)
	var p client.Problem
	if err := json.Unmarshal(r.Body, &p); err != nil || p.Code != client.ErrorCodeUnavailable {
		t.Fatalf("outage problem = %s", r.Body)
	}

	proxy.up()
	took = waitStatus(t, s.URL+"/readyz", http.StatusOK, 10*time.Second)
	t.Logf("readyz back to 200 %s after the database returned", took)
	r, err = s.service(t).GetCustomerWithResponse(ctx, "dave")
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "read after recovery", r.StatusCode(), r.Body, http.StatusOK)
}
