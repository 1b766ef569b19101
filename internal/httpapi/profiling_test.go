package httpapi

import (
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/labstack/echo/v4"
)

// The runtime profiles say what the process does: only an admin key gets
// them, and every named profile is served.
func TestProfilesAnswerOnlyAdminKeys(t *testing.T) {
	t.Parallel()
	e := echo.New()
	e.HTTPErrorHandler = errorHandler(slog.New(slog.DiscardHandler))
	registerProfiling(e.Group(""), testAuthenticator(t, gateSecret, nil, "", ""))
	for _, c := range []struct {
		path, token string
		status      int
		contains    string
	}{
		{"/debug/pprof/", "", 401, ""},
		{"/debug/pprof/heap", "svc-key", 403, ""},
		{"/debug/pprof/cmdline", userJWT(t, "alice"), 403, ""},
		{"/debug/pprof/", "adm-key", 200, "goroutine"},
		{"/debug/pprof/goroutine?debug=1", "adm-key", 200, "goroutine profile"},
		{"/debug/pprof/cmdline", "adm-key", 200, ""},
	} {
		req := httptest.NewRequest(http.MethodGet, c.path, nil)
		if c.token != "" {
			req.Header.Set("Authorization", "Bearer "+c.token)
		}
		rec := httptest.NewRecorder()
		e.ServeHTTP(rec, req)
		if rec.Code != c.status || !strings.Contains(rec.Body.String(), c.contains) {
			t.Errorf("GET %s with %q: %d %.200s, want %d containing %q", c.path, c.token, rec.Code, rec.Body, c.status, c.contains)
		}
	}
}
