package app_test

import (
	"context"
	"net/http"
	"net/http/httptest"
	"testing"

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
