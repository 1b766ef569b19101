package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/tallybilling/tally/internal/text"
)

// service talks to the tally server under test. Requests are built by hand
// rather than through pkg/client so that the client's own cost is as small
// and as visible as possible.
type service struct {
	base   string
	key    string
	client *http.Client
}

func newService(base, key string, concurrency int) *service {
	// One transport for every worker, with an idle connection kept for each
	// (the default of 2 per host would measure connection setup). No proxy
	// from the environment: it would be measured too.
	transport := &http.Transport{
		MaxIdleConns:        2 * concurrency,
		MaxIdleConnsPerHost: 2 * concurrency,
		IdleConnTimeout:     90 * time.Second,
		DisableCompression:  true,
	}
	return &service{
		base:   strings.TrimRight(base, "/"),
		key:    key,
		client: &http.Client{Transport: transport},
	}
}

// request is one call: want is the success status; allow402 makes a 402
// insufficient_credits an expected refusal rather than an error.
type request struct {
	method   string
	path     string
	body     []byte
	header   http.Header
	noAuth   bool
	want     int
	allow402 bool
	// decode, when set, reads a successful answer's body and may turn it
	// into an error (a 202 whose events were rejected is not a success).
	decode func(body []byte) outcome
	// timeout bounds the whole call; 0 means 30 s.
	timeout time.Duration
}

// problem is the part of an RFC 9457 answer the report shows.
type problem struct {
	Code   string `json:"code"`
	Detail string `json:"detail"`
}

// do sends r and classifies the answer. The body is always read to the end
// so the connection goes back to the pool.
func (s *service) do(ctx context.Context, r request) outcome {
	timeout := r.timeout
	if timeout == 0 {
		timeout = 30 * time.Second
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var body io.Reader
	if r.body != nil {
		body = bytes.NewReader(r.body)
	}
	req, err := http.NewRequestWithContext(ctx, r.method, s.base+r.path, body)
	if err != nil {
		return outcome{errLabel: "request", errDetail: err.Error()}
	}
	for name, values := range r.header {
		req.Header[name] = values
	}
	if r.body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if !r.noAuth {
		req.Header.Set("Authorization", "Bearer "+s.key)
	}
	resp, err := s.client.Do(req)
	if err != nil {
		if errors.Is(err, context.Canceled) {
			return outcome{errLabel: "canceled", errDetail: err.Error()}
		}
		return outcome{errLabel: "transport", errDetail: err.Error()}
	}
	defer resp.Body.Close()

	switch {
	case resp.StatusCode == r.want && r.decode != nil:
		data, err := io.ReadAll(resp.Body)
		if err != nil {
			return outcome{errLabel: "transport", errDetail: err.Error()}
		}
		return r.decode(data)
	case resp.StatusCode == r.want:
		_, _ = io.Copy(io.Discard, resp.Body)
		return outcome{ok: true}
	case resp.StatusCode == http.StatusPaymentRequired && r.allow402:
		_, _ = io.Copy(io.Discard, resp.Body)
		return outcome{expected: true}
	}
	data, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	_, _ = io.Copy(io.Discard, resp.Body)
	var p problem
	if json.Unmarshal(data, &p) != nil || p.Code == "" {
		p = problem{Code: "unexpected", Detail: snippet(data)}
	}
	return outcome{
		errLabel:  fmt.Sprintf("HTTP %d %s", resp.StatusCode, p.Code),
		errDetail: p.Detail,
	}
}

// failure turns an outcome that is not a success into an error for setup
// steps, which must all succeed.
func (o outcome) failure(what string) error {
	if o.ok {
		return nil
	}
	if o.expected {
		return fmt.Errorf("%s: 402 insufficient_credits", what)
	}
	if o.errDetail == "" {
		return fmt.Errorf("%s: %s", what, o.errLabel)
	}
	return fmt.Errorf("%s: %s: %s", what, o.errLabel, o.errDetail)
}

// redactURL drops the password from a database URL before it is printed.
func redactURL(raw string) string {
	u, err := url.Parse(raw)
	if err != nil {
		return "(unparseable URL)"
	}
	return u.Redacted()
}

func snippet(b []byte) string {
	return text.Truncate(strings.TrimSpace(string(b)), 200)
}
