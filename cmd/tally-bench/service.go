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
	base string
	// baseURL is base parsed once: each request's URL is a copy of it with
	// the path set, not a string parsed again per request.
	baseURL *url.URL
	key     string
	// auth is the Authorization header's value, built once and shared by
	// every request (the transport only reads it).
	auth   []string
	client *http.Client
}

// jsonContentType is the Content-Type of every request body, shared.
var jsonContentType = []string{"application/json"}

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
	base = strings.TrimRight(base, "/")
	// -url was checked to parse (settings.validate); a base that does not
	// leaves baseURL nil and every request fails as it did before.
	u, err := url.Parse(base)
	if err != nil {
		u = nil
	}
	s := service{base: base, baseURL: u, client: &http.Client{Transport: transport}}
	return s.withKey(key)
}

// withKey is s sending key instead, on the same connections.
func (s service) withKey(key string) *service {
	s.key = key
	s.auth = []string{"Bearer " + key}
	return &s
}

// url is base+path as NewRequest would parse it, without parsing base
// again: path is already escaped (url.PathEscape of each id) and holds
// neither a query nor a fragment; one that does is parsed whole.
func (s *service) url(path string) (*url.URL, error) {
	if s.baseURL == nil || strings.ContainsAny(path, "?#") {
		return url.Parse(s.base + path)
	}
	full := s.baseURL.EscapedPath() + path
	unescaped, err := url.PathUnescape(full)
	if err != nil {
		return nil, &url.Error{Op: "parse", URL: s.base + path, Err: err}
	}
	// As url.Parse does: RawPath only when full is not Path's own escaping.
	u := *s.baseURL
	u.Path, u.RawPath = unescaped, ""
	if u.EscapedPath() != full {
		u.RawPath = full
	}
	return &u, nil
}

// request is one call: want is the success status; allow402 makes a 402
// insufficient_credits an expected refusal rather than an error.
type request struct {
	method string
	path   string
	body   []byte
	// header holds extra headers under their canonical names; do adds
	// Content-Type and Authorization to it, so each call needs its own map.
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
	u, err := s.url(r.path)
	if err != nil {
		return outcome{errLabel: "request", errDetail: err.Error()}
	}
	// The request is filled in as NewRequestWithContext would, with the
	// headers set under their canonical names in r.header itself: no URL
	// parsing, no header map copied and no name canonicalized per request.
	header := r.header
	if header == nil {
		header = make(http.Header, 2)
	}
	req := &http.Request{
		Method:     r.method,
		URL:        u,
		Proto:      "HTTP/1.1",
		ProtoMajor: 1,
		ProtoMinor: 1,
		Header:     header,
		Host:       strings.TrimSuffix(u.Host, ":"),
	}
	if r.body != nil {
		data := r.body
		req.ContentLength = int64(len(data))
		req.Body = io.NopCloser(bytes.NewReader(data))
		req.GetBody = func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(data)), nil }
		header["Content-Type"] = jsonContentType
	}
	if !r.noAuth {
		header["Authorization"] = s.auth
	}
	req = req.WithContext(ctx)
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
