package main

import (
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// The URL a request goes to is built from the base parsed once; it must be
// the URL that parsing base+path whole gives, escapes and all.
func TestServiceURLIsWhatParsingTheWholeURLGives(t *testing.T) {
	t.Parallel()
	for _, base := range []string{"http://127.0.0.1:8080", "http://127.0.0.1:8080/", "https://tally.example.com/prefix/",
		"http://h:1/pre%20fix", "http://[::1]:8080", "http://h:/x"} {
		svc := newService(base, "k", 1)
		for _, path := range []string{"/healthz", "/v1/customers/" + url.PathEscape("bench-abc-12") + "/balance",
			"/v1/customers/" + url.PathEscape("a b/c%d é") + "/credits/consume", "/v1/payments/x?expand=1#f"} {
			got, err := svc.url(path)
			if err != nil {
				t.Fatalf("%s + %s: %v", base, path, err)
			}
			want, err := url.Parse(strings.TrimRight(base, "/") + path)
			if err != nil {
				t.Fatal(err)
			}
			if *got != *want || got.String() != want.String() || got.RequestURI() != want.RequestURI() {
				t.Errorf("%s + %s: %#v, want %#v", base, path, got, want)
			}
		}
	}
}

// seen is what a test server was sent.
type seen struct {
	method, uri, host, auth, contentType, idempotencyKey, body string
	contentLength                                              int64
}

func recordingServer(t *testing.T, answer func(w http.ResponseWriter, r *http.Request)) (string, func() []seen) {
	var mu sync.Mutex
	var got []seen
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		mu.Lock()
		got = append(got, seen{r.Method, r.RequestURI, r.Host, r.Header.Get("Authorization"), r.Header.Get("Content-Type"),
			r.Header.Get("Idempotency-Key"), string(body), r.ContentLength})
		mu.Unlock()
		answer(w, r)
	}))
	t.Cleanup(srv.Close)
	return srv.URL, func() []seen {
		mu.Lock()
		defer mu.Unlock()
		return append([]seen(nil), got...)
	}
}

// Each request carries its method, escaped path, key (the admin's for the
// admin copy, none when noAuth), JSON body and extra headers.
func TestServiceSendsTheRequestItIsGiven(t *testing.T) {
	t.Parallel()
	base, got := recordingServer(t, func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(http.StatusOK) })
	svc := newService(base+"/", "svc-key", 2)
	admin := svc.withKey("admin-key")
	ctx := t.Context()
	outs := []outcome{
		svc.do(ctx, request{method: http.MethodPost, path: "/v1/customers/" + url.PathEscape("a b") + "/credits/consume",
			body: []byte(`{"amount":1}`), header: http.Header{"Idempotency-Key": {"k1"}}, want: http.StatusOK}),
		admin.do(ctx, request{method: http.MethodGet, path: "/v1/admin/verify", want: http.StatusOK}),
		svc.do(ctx, request{method: http.MethodGet, path: "/healthz", noAuth: true, want: http.StatusOK}),
	}
	for i, o := range outs {
		if !o.ok {
			t.Errorf("request %d: %+v, want ok", i, o)
		}
	}
	host := strings.TrimPrefix(base, "http://")
	want := []seen{
		{"POST", "/v1/customers/a%20b/credits/consume", host, "Bearer svc-key", "application/json", "k1", `{"amount":1}`, 12},
		{"GET", "/v1/admin/verify", host, "Bearer admin-key", "", "", "", 0},
		{"GET", "/healthz", host, "", "", "", "", 0},
	}
	if g := got(); len(g) != len(want) {
		t.Fatalf("server saw %+v, want %+v", g, want)
	} else {
		for i := range want {
			if g[i] != want[i] {
				t.Errorf("request %d: server saw %+v, want %+v", i, g[i], want[i])
			}
		}
	}
	if svc.key != "svc-key" || svc.auth[0] != "Bearer svc-key" {
		t.Errorf("the admin copy changed the service's key: %q %q", svc.key, svc.auth)
	}
}

// Every answer is classified as before: the wanted status (with its body
// decoded when asked), an allowed 402, a problem's code and detail, a body
// that is no problem, a server that is gone, a call cancelled or timed out.
func TestServiceClassifiesEveryAnswer(t *testing.T) {
	t.Parallel()
	base, _ := recordingServer(t, func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/ok":
			_, _ = io.WriteString(w, `{"accepted":3}`)
		case "/chunked":
			w.WriteHeader(http.StatusAccepted)
			for range 3 {
				_, _ = io.WriteString(w, strings.Repeat("x", 5000))
				w.(http.Flusher).Flush()
			}
		case "/402":
			w.WriteHeader(http.StatusPaymentRequired)
			_, _ = io.WriteString(w, `{"code":"insufficient_credits","detail":"balance 0"}`)
		case "/503":
			w.WriteHeader(http.StatusServiceUnavailable)
			_, _ = io.WriteString(w, `{"code":"unavailable","detail":"try later"}`)
		case "/500":
			w.WriteHeader(http.StatusInternalServerError)
			_, _ = io.WriteString(w, "  <html>oops</html>\n")
		case "/slow":
			time.Sleep(300 * time.Millisecond)
		}
	})
	svc := newService(base, "k", 2)
	ctx := t.Context()
	var decoded []byte
	decode := func(b []byte) outcome { decoded = b; return outcome{ok: true, tags: []string{"decoded"}} }
	if o := svc.do(ctx, request{method: "GET", path: "/ok", want: 200, decode: decode}); !o.ok || string(decoded) != `{"accepted":3}` {
		t.Errorf("decoded answer: %+v %q", o, decoded)
	}
	if o := svc.do(ctx, request{method: "GET", path: "/chunked", want: 202, decode: decode}); !o.ok || len(decoded) != 15000 {
		t.Errorf("chunked answer: %+v, %d bytes decoded", o, len(decoded))
	}
	if o := svc.do(ctx, request{method: "GET", path: "/ok", want: 201}); o.ok || o.errLabel != "HTTP 200 unexpected" || o.errDetail != `{"accepted":3}` {
		t.Errorf("unwanted 200: %+v", o)
	}
	if o := svc.do(ctx, request{method: "POST", path: "/402", want: 200, allow402: true}); !o.expected || o.ok || o.errLabel != "" {
		t.Errorf("allowed 402: %+v", o)
	}
	if o := svc.do(ctx, request{method: "POST", path: "/402", want: 200}); o.errLabel != "HTTP 402 insufficient_credits" || o.errDetail != "balance 0" {
		t.Errorf("402 not allowed: %+v", o)
	}
	if o := svc.do(ctx, request{method: "GET", path: "/503", want: 200}); o.errLabel != "HTTP 503 unavailable" || o.errDetail != "try later" {
		t.Errorf("503: %+v", o)
	}
	if o := svc.do(ctx, request{method: "GET", path: "/500", want: 200}); o.errLabel != "HTTP 500 unexpected" || o.errDetail != "<html>oops</html>" {
		t.Errorf("500 without a problem: %+v", o)
	}
	if o := svc.do(ctx, request{method: "GET", path: "/slow", want: 200, timeout: 50 * time.Millisecond}); o.errLabel != "transport" {
		t.Errorf("timed out: %+v", o)
	}
	cancelled, cancel := context.WithCancel(ctx)
	time.AfterFunc(50*time.Millisecond, cancel)
	if o := svc.do(cancelled, request{method: "GET", path: "/slow", want: 200}); o.errLabel != "canceled" {
		t.Errorf("cancelled: %+v", o)
	}
	gone := httptest.NewServer(http.NotFoundHandler())
	gone.Close()
	if o := newService(gone.URL, "k", 1).do(ctx, request{method: "GET", path: "/ok", want: 200}); o.errLabel != "transport" || o.errDetail == "" {
		t.Errorf("no server: %+v", o)
	}
}

// -cpuprofile writes the tool's own profile of the run.
func TestCPUProfileIsWritten(t *testing.T) {
	t.Parallel()
	f, base := startFake(t)
	path := filepath.Join(t.TempDir(), "bench.prof")
	err := run(t.Context(), []string{"-url", base, "-key", "svc", "-scenarios", "http-floor", "-concurrency", "2",
		"-duration", "200ms", "-warmup", "0s", "-db", "", "-verify", "off", "-cpuprofile", path}, env(nil), io.Discard, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range f.problems {
		t.Error("fake server saw:", p)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	// A profile is gzipped protobuf, complete once the run has returned.
	zr, err := gzip.NewReader(bytes.NewReader(data))
	if err != nil {
		t.Fatalf("profile of %d bytes is not gzip: %v", len(data), err)
	}
	if n, err := io.Copy(io.Discard, zr); err != nil || n == 0 {
		t.Errorf("profile: %d bytes, %v", n, err)
	}

	err = run(t.Context(), []string{"-url", base, "-key", "svc", "-scenarios", "http-floor", "-db", "",
		"-cpuprofile", filepath.Join(t.TempDir(), "no", "such", "dir", "p")}, env(nil), io.Discard, io.Discard)
	if err == nil || !strings.Contains(err.Error(), "-cpuprofile") || errors.Is(err, errNotClean) {
		t.Errorf("profile to a missing directory: %v, want a -cpuprofile error", err)
	}
}
