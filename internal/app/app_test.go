package app_test

import (
	"context"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/tallybilling/tally/internal/app"
	"github.com/tallybilling/tally/internal/config"
	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/db/dbtest"
)

// An embedder that passes no logger gets a working App that logs nowhere,
// not a panic at the first line it would log.
func TestNewWithoutALogger(t *testing.T) {
	t.Parallel()
	cfg := config.Default()
	cfg.DatabaseURL = dbtest.NewURL(t)
	cfg.DBMaxOpenConns = 2
	// No Stripe key: New logs that usage will not be delivered.
	a, err := app.New(context.Background(), app.Options{Config: cfg})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = db.Close(a.DB()) })
	for _, path := range []string{"/healthz", "/readyz", "/no-such-route"} {
		rec := httptest.NewRecorder()
		a.Handler().ServeHTTP(rec, httptest.NewRequest(http.MethodGet, path, nil))
		if path != "/no-such-route" && rec.Code != http.StatusOK {
			t.Errorf("GET %s: %d %s", path, rec.Code, rec.Body)
		}
	}
}

// A caller that binds port 0 itself learns the address from Addr, Run
// serves there, and the sandbox without a URL of its own takes it.
func TestRunServesOnTheListenerItWasGiven(t *testing.T) {
	t.Parallel()
	cfg := config.Default()
	cfg.DatabaseURL = dbtest.NewURL(t)
	cfg.DBMaxOpenConns = 2
	cfg.HTTPAddr = "127.0.0.1:0"
	cfg.ShutdownTimeout = 5 * time.Second
	cfg.Stripe.Sandbox.Enabled = true
	cfg.Stripe.SecretKey = config.SandboxSecretKey
	cfg.Stripe.WebhookSecrets = []string{config.SandboxWebhookSecret}
	if _, err := app.New(context.Background(), app.Options{Config: cfg}); err == nil {
		t.Fatal("New built a sandbox with no URL and no listener to take it from")
	}

	ln, err := net.Listen("tcp", cfg.HTTPAddr)
	if err != nil {
		t.Fatal(err)
	}
	a, err := app.New(context.Background(), app.Options{Config: cfg, Listener: ln})
	if err != nil {
		t.Fatal(err)
	}
	if a.Addr() != ln.Addr().String() || strings.HasSuffix(a.Addr(), ":0") {
		t.Fatalf("Addr() = %q, want the bound %q", a.Addr(), ln.Addr())
	}
	ctx, stop := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	resp, err := http.Get("http://" + a.Addr() + "/sandbox")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || !strings.Contains(string(body), "http://"+a.Addr()+"/webhooks/stripe") {
		t.Errorf("GET /sandbox on Addr: %d, want 200 with the webhooks going to the bound address:\n%.500s", resp.StatusCode, body)
	}
	stop()
	if err := <-done; err != nil {
		t.Fatalf("Run = %v", err)
	}
}
