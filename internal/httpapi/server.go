// Package httpapi is tally's HTTP surface on echo: the routes of openapi.yaml
// served through the generated strict server, authentication, request
// validation against the spec, problem+json errors, access logs and metrics.
// It converts between the generated api types and domain types (convert.go)
// and holds no business rules of its own.
package httpapi

import (
	"context"
	"log/slog"
	"net/http"
	"time"

	"github.com/labstack/echo/v4"
	"github.com/labstack/echo/v4/middleware"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/tallybilling/tally/api"
	"github.com/tallybilling/tally/internal/config"
	"github.com/tallybilling/tally/internal/credits"
	"github.com/tallybilling/tally/internal/customers"
	"github.com/tallybilling/tally/internal/errs"
	"github.com/tallybilling/tally/internal/events"
	"github.com/tallybilling/tally/internal/metering"
	"github.com/tallybilling/tally/internal/payments"
	"github.com/tallybilling/tally/internal/stripehook"
)

// Options are what New needs: everything the HTTP layer calls. app builds
// them.
type Options struct {
	Config config.Config
	Logger *slog.Logger
	Now    func() time.Time
	// Registry receives the HTTP metrics; Gatherer serves /metrics (nil: not served here).
	Registry prometheus.Registerer
	Gatherer prometheus.Gatherer
	// Ready reports whether the service can take traffic (database reachable,
	// migrations current); it names what is wrong.
	Ready func(ctx context.Context) map[string]error

	Customers *customers.Service
	Events    *events.Feed

	// Capability services are added below, one block each.

	// Payments serves checkouts and payment reads; StripeHook receives
	// Stripe's webhooks and serves the stored-event admin operations.
	Payments   *payments.Service
	StripeHook *stripehook.Intake
	// StripeSync catches up with Stripe on demand; nil without a Stripe key.
	StripeSync *stripehook.Syncer

	// Credits is the wallet; Verify is the invariant report of
	// GET /v1/admin/verify (app.Verify: credits plus other packages' checks).
	Credits  *credits.Service
	Verify   func(ctx context.Context) (credits.VerifyReport, error)
	Metering *metering.Service

	// Sandbox, when set, serves /sandbox and everything under it: the
	// offline Stripe sandbox (TALLY_STRIPE_SANDBOX), never on /v1.
	Sandbox http.Handler
}

// Server implements api.StrictServerInterface.
type Server struct {
	// d is what New was given: the handlers' dependencies.
	d Options
}

var _ api.StrictServerInterface = (*Server)(nil)

// New builds the echo instance with every route, middleware and the error
// handler. It fails only when the embedded spec cannot be loaded.
func New(d Options) (*echo.Echo, error) {
	spec, err := loadSpec(api.SpecYAML)
	if err != nil {
		return nil, err
	}
	auth := newAuthenticator(d.Config, d.Now)
	g, err := newGate(spec, auth)
	if err != nil {
		return nil, err
	}
	docs, err := renderDocs(spec)
	if err != nil {
		return nil, err
	}
	s := &Server{d: d}

	e := echo.New()
	e.HideBanner = true
	e.HidePort = true
	e.HTTPErrorHandler = errorHandler(d.Logger)
	e.IPExtractor = clientIP(d.Config.TrustedProxies)
	e.Use(withRequestID, observe(d.Logger, newHTTPMetrics(d.Registry)), recoverPanics(d.Logger), answerWithin(d.Config.RequestTimeout))
	if len(d.Config.CORSOrigins) > 0 {
		e.Use(middleware.CORSWithConfig(middleware.CORSConfig{
			AllowOrigins:  d.Config.CORSOrigins,
			AllowMethods:  []string{http.MethodGet, http.MethodPost, http.MethodPut, http.MethodOptions},
			AllowHeaders:  []string{echo.HeaderAuthorization, echo.HeaderContentType, "Idempotency-Key", echo.HeaderXRequestID},
			ExposeHeaders: []string{"Idempotent-Replayed", echo.HeaderXRequestID},
			MaxAge:        600,
		}))
	}

	ops := e.Group("")
	// Load balancers probe with HEAD as often as with GET.
	probe := []string{http.MethodGet, http.MethodHead}
	ops.Match(probe, "/healthz", s.healthz)
	ops.Match(probe, "/readyz", s.readyz)
	ops.GET("/openapi.yaml", func(c echo.Context) error {
		return c.Blob(http.StatusOK, "application/yaml", api.SpecYAML)
	})
	ops.GET("/docs", func(c echo.Context) error { return c.HTMLBlob(http.StatusOK, docs) })
	if d.Gatherer != nil {
		// The API's listener may face the internet; the metrics say how much
		// money moves. A separate TALLY_METRICS_ADDR listener (app) is the
		// open one, for scrapes from inside the cluster.
		ops.GET("/metrics", echo.WrapHandler(promhttp.HandlerFor(d.Gatherer, promhttp.HandlerOpts{})), adminOnly(auth))
	}
	registerProfiling(ops, auth)

	serveContract(e, g, s, d.Config.MaxBodyBytes)
	s.registerRaw(e, auth)
	return e, nil
}

// serveContract routes the strict server's operations through the body
// limit and the gate; their bodies bind through decodedBinder. mw are the
// strict handler's middlewares (tests record requests with one).
func serveContract(e *echo.Echo, g *gate, s api.StrictServerInterface, maxBody int64, mw ...api.StrictMiddlewareFunc) {
	e.Binder = &decodedBinder{}
	v1 := e.Group("", limitBody(maxBody), g.middleware)
	api.RegisterHandlers(v1, api.NewStrictHandler(s, mw))
}

// registerRaw adds the routes that live outside the strict server (Stripe's
// webhook needs its raw body). Capabilities that own such routes add them here.
func (s *Server) registerRaw(e *echo.Echo, auth *authenticator) {
	e.POST("/webhooks/stripe", s.stripeWebhook)
	e.POST(usageImportPath, s.importUsage, adminOnly(auth))
	if s.d.Sandbox != nil {
		h := echo.WrapHandler(s.d.Sandbox)
		e.Any("/sandbox", h)
		e.Any("/sandbox/*", h)
	}
}

// health is the body of /healthz and /readyz (schema Health in openapi.yaml).
type health struct {
	Status string            `json:"status"`
	Checks map[string]string `json:"checks,omitempty"`
}

func (s *Server) healthz(c echo.Context) error {
	return c.JSON(http.StatusOK, health{Status: "ok"})
}

// readyz answers which checks fail, never why: anyone may ask, and the
// reason of a failed database check names its user, database and address.
// The reason is logged instead.
func (s *Server) readyz(c echo.Context) error {
	ctx, cancel := context.WithTimeout(c.Request().Context(), 2*time.Second)
	defer cancel()
	checks := map[string]string{}
	status := http.StatusOK
	for name, err := range s.d.Ready(ctx) {
		if err == nil {
			checks[name] = "ok"
			continue
		}
		checks[name] = "failing"
		status = http.StatusServiceUnavailable
		s.d.Logger.WarnContext(ctx, "readiness check failed", "check", name, "error", err,
			"request_id", requestID(ctx))
	}
	if status != http.StatusOK {
		return c.JSON(status, health{Status: "unavailable", Checks: checks})
	}
	return c.JSON(status, health{Status: "ok", Checks: checks})
}

// adminOnly lets through only a request with an admin key: errs.Unauthorized
// without a valid token, errs.Forbidden for any other one.
func adminOnly(auth *authenticator) echo.MiddlewareFunc {
	return func(next echo.HandlerFunc) echo.HandlerFunc {
		return func(c echo.Context) error {
			p, err := auth.authenticate(c.Request().Header.Get(echo.HeaderAuthorization))
			if err != nil {
				return err
			}
			if !p.isAdmin() {
				return errs.E(errs.Forbidden, "this operation needs an admin key")
			}
			return next(c)
		}
	}
}
