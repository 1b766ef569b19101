package sandbox

import (
	"bytes"
	_ "embed"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"regexp"
	"strings"
	"time"

	"github.com/golang-jwt/jwt/v5"
)

//go:embed templates/demo.js
var demoScript []byte

//go:embed templates/demo.page
var demoPage []byte

// DemoOptions configure NewDemo.
type DemoOptions struct {
	// JWTSecret is tally's TALLY_JWT_HS256_SECRET: the demo's sign-in mints
	// end-user tokens with it, as the product's own sign-in would. Without
	// it the demo cannot sign in, and says so.
	JWTSecret        []byte
	Issuer, Audience string
	// ServiceKey is a service API key of tally, used by the demo's backend
	// (POST /sandbox/demo/api/spend) to spend credits, which only a service
	// may do. Without it the demo cannot spend, and says so.
	ServiceKey string
	// TallyURL is the base URL of tally's public API, for the demo backend.
	TallyURL   string
	HTTPClient *http.Client
	Now        func() time.Time
}

// Demo is a small single-page app that uses tally as a product's frontend
// does, plus the two things a product's backend would do for it: sign the
// user in (mint an end-user JWT) and spend credits (with a service key).
//
//	GET  /sandbox/demo               the app (plain HTML and JavaScript, no build step)
//	GET  /sandbox/demo/config        what the app may do here
//	POST /sandbox/demo/token         {customer_id} → {token, customer_id, expires_at}: ids starting with "demo" only
//	POST /sandbox/demo/api/spend     {amount, reason?} with the user's token and an Idempotency-Key:
//	                                 tally's consume for the token's customer, answered as tally answered
type Demo struct {
	opts DemoOptions
}

// DemoTokenLifetime is how long a minted demo token is valid.
const DemoTokenLifetime = 12 * time.Hour

// NewDemo builds the demo app.
func NewDemo(opts DemoOptions) *Demo {
	if opts.HTTPClient == nil {
		opts.HTTPClient = &http.Client{Timeout: 15 * time.Second}
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	return &Demo{opts: opts}
}

// demoCustomer is what the demo may sign in as: its own customers only, so
// that a sandbox reachable by others cannot mint a token for anyone else.
var demoCustomer = regexp.MustCompile(`^demo[A-Za-z0-9_.:@-]{0,60}$`)

func (d *Demo) register(m *http.ServeMux) {
	m.HandleFunc("GET /sandbox/demo", d.page)
	m.HandleFunc("GET /sandbox/demo/{$}", d.page)
	m.HandleFunc("GET /sandbox/demo/app.js", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/javascript; charset=utf-8")
		_, _ = w.Write(demoScript)
	})
	m.HandleFunc("GET /sandbox/demo/config", func(w http.ResponseWriter, r *http.Request) {
		jsonAnswer(w, http.StatusOK, map[string]any{"sign_in": len(d.opts.JWTSecret) > 0, "spend": d.opts.ServiceKey != "" && d.opts.TallyURL != ""})
	})
	m.HandleFunc("POST /sandbox/demo/token", d.token)
	m.HandleFunc("POST /sandbox/demo/api/spend", d.spend)
}

func (d *Demo) page(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.Header().Set("Content-Security-Policy", "default-src 'self'; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'")
	_, _ = w.Write(demoPage)
}

func demoError(w http.ResponseWriter, status int, format string, args ...any) {
	jsonAnswer(w, status, map[string]any{"error": fmt.Sprintf(format, args...)})
}

func (d *Demo) token(w http.ResponseWriter, r *http.Request) {
	if len(d.opts.JWTSecret) == 0 {
		demoError(w, http.StatusServiceUnavailable, "the demo signs in with TALLY_JWT_HS256_SECRET, which is not set")
		return
	}
	var in struct {
		CustomerID string `json:"customer_id"`
	}
	if err := json.NewDecoder(io.LimitReader(r.Body, 4096)).Decode(&in); err != nil {
		demoError(w, http.StatusBadRequest, "send {\"customer_id\": \"demo-...\"}")
		return
	}
	if !demoCustomer.MatchString(in.CustomerID) {
		demoError(w, http.StatusBadRequest, "the demo signs in only as customers whose id starts with \"demo\" (letters, digits and _.:@- after it)")
		return
	}
	now := d.opts.Now()
	claims := jwt.RegisteredClaims{Subject: in.CustomerID, IssuedAt: jwt.NewNumericDate(now), ExpiresAt: jwt.NewNumericDate(now.Add(DemoTokenLifetime))}
	if d.opts.Issuer != "" {
		claims.Issuer = d.opts.Issuer
	}
	if d.opts.Audience != "" {
		claims.Audience = jwt.ClaimStrings{d.opts.Audience}
	}
	tok, err := jwt.NewWithClaims(jwt.SigningMethodHS256, claims).SignedString(d.opts.JWTSecret)
	if err != nil {
		demoError(w, http.StatusInternalServerError, "sign the token: %v", err)
		return
	}
	jsonAnswer(w, http.StatusOK, map[string]any{"token": tok, "customer_id": in.CustomerID, "expires_at": now.Add(DemoTokenLifetime).UTC().Format(time.RFC3339)})
}

// userOf is the customer of the end-user token in r, as the product's
// backend would learn it from its own session.
func (d *Demo) userOf(r *http.Request) (string, error) {
	raw, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	if !ok || len(d.opts.JWTSecret) == 0 {
		return "", fmt.Errorf("send the user's token as Authorization: Bearer <token>")
	}
	opts := []jwt.ParserOption{jwt.WithValidMethods([]string{jwt.SigningMethodHS256.Alg()}), jwt.WithExpirationRequired(), jwt.WithTimeFunc(d.opts.Now)}
	var claims jwt.RegisteredClaims
	if _, err := jwt.ParseWithClaims(strings.TrimSpace(raw), &claims, func(*jwt.Token) (any, error) { return d.opts.JWTSecret, nil }, opts...); err != nil {
		return "", fmt.Errorf("the token is not valid: %v", err)
	}
	if !demoCustomer.MatchString(claims.Subject) {
		return "", fmt.Errorf("the token is not a demo user's")
	}
	return claims.Subject, nil
}

// spend is the demo's backend: the end user asks to spend, the backend
// (holding the service key, which a browser never sees) asks tally.
func (d *Demo) spend(w http.ResponseWriter, r *http.Request) {
	if d.opts.ServiceKey == "" || d.opts.TallyURL == "" {
		demoError(w, http.StatusServiceUnavailable, "the demo backend spends with TALLY_STRIPE_SANDBOX_DEMO_KEY, which is not set")
		return
	}
	customer, err := d.userOf(r)
	if err != nil {
		demoError(w, http.StatusUnauthorized, "%v", err)
		return
	}
	key := r.Header.Get("Idempotency-Key")
	if key == "" {
		demoError(w, http.StatusBadRequest, "send an Idempotency-Key, so a retried click spends once")
		return
	}
	var in struct {
		Amount int64  `json:"amount"`
		Reason string `json:"reason"`
	}
	if err := json.NewDecoder(io.LimitReader(r.Body, 4096)).Decode(&in); err != nil {
		demoError(w, http.StatusBadRequest, "send {\"amount\": N}")
		return
	}
	if in.Reason == "" {
		in.Reason = "demo: spent in the demo app"
	}
	body, _ := json.Marshal(map[string]any{"amount": in.Amount, "reason": in.Reason})
	req, err := http.NewRequestWithContext(r.Context(), http.MethodPost,
		strings.TrimSuffix(d.opts.TallyURL, "/")+"/v1/customers/"+customer+"/credits/consume", bytes.NewReader(body))
	if err != nil {
		demoError(w, http.StatusInternalServerError, "%v", err)
		return
	}
	req.Header.Set("Authorization", "Bearer "+d.opts.ServiceKey)
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Idempotency-Key", "demo-"+key)
	resp, err := d.opts.HTTPClient.Do(req)
	if err != nil {
		demoError(w, http.StatusBadGateway, "tally did not answer: %v", err)
		return
	}
	defer resp.Body.Close()
	for _, h := range []string{"Content-Type", "Idempotent-Replayed"} {
		if v := resp.Header.Get(h); v != "" {
			w.Header().Set(h, v)
		}
	}
	w.WriteHeader(resp.StatusCode)
	_, _ = io.Copy(w, io.LimitReader(resp.Body, 1<<20))
}
