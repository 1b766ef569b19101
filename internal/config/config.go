// Package config turns the process environment (and the catalog file it
// names, read by internal/catalog) into one typed Config. Every setting has
// one name (see README), one default and one validation rule, and Load
// reports every problem at once so an operator fixes a broken deployment in
// one round trip.
package config

import (
	"cmp"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net"
	"net/netip"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/tallybilling/tally/internal/catalog"
)

// Scope is what an API key may do.
type Scope string

// The API key scopes (docs/guarantees.md, "Access").
const (
	// ScopeService is for the product's backend services.
	ScopeService Scope = "service"
	// ScopeAdmin is for operators.
	ScopeAdmin Scope = "admin"
)

// APIKey is one accepted API key, known only by the SHA-256 of the bearer
// token a caller sends, so the environment never holds a usable key.
type APIKey struct {
	Scope Scope
	Hash  [32]byte
}

// JWTConfig holds what verifies end-user tokens. Either key may be unset.
type JWTConfig struct {
	HS256Secret    []byte
	RS256PublicKey *rsa.PublicKey
	// Issuer and Audience, when non-empty, must match the token's iss / aud.
	Issuer   string
	Audience string
}

// StripeConfig holds how tally talks to Stripe and accepts its webhooks.
type StripeConfig struct {
	SecretKey string
	// APIURL and MeterEventsURL override Stripe's base URLs (stripe-mock, fakes).
	APIURL         string
	MeterEventsURL string
	// WebhookSecrets are all accepted, so a secret can be rolled without downtime.
	WebhookSecrets      []string
	WebhookMaxBodyBytes int64
	EventMaxAttempts    int
	EventRetryInterval  time.Duration
	// PendingCheckAfter is how long a payment stays pending before a sync
	// looks it up at Stripe; SyncInterval how often the background sync
	// runs (0: never); VerifyInterval how often the invariant check runs
	// in the background (0: never).
	PendingCheckAfter time.Duration
	SyncInterval      time.Duration
	VerifyInterval    time.Duration
	// EventLease is how long a stored event being processed belongs to the
	// instance processing it; when it runs out (that instance died), the
	// retry worker of any instance takes the event over.
	EventLease time.Duration
	// Sandbox runs the offline Stripe sandbox inside tally instead of
	// talking to Stripe (development only).
	Sandbox SandboxConfig
}

// Livemode reports whether SecretKey is a live key (sk_live_, rk_live_);
// events whose livemode differs are parked. No key is test mode.
func (s StripeConfig) Livemode() bool {
	return hasAnyPrefix(s.SecretKey, "sk_live_", "rk_live_")
}

// SandboxConfig is the offline Stripe sandbox (TALLY_STRIPE_SANDBOX): an
// emulated test-mode Stripe served by tally itself under /sandbox, which
// tally's Stripe client talks to over HTTP and which delivers signed
// webhooks to tally's /webhooks/stripe. Never in live mode.
type SandboxConfig struct {
	Enabled bool
	// URL is the base URL at which browsers, and the sandbox itself, reach
	// this tally (the hosted checkout page, the webhook endpoint). Default:
	// http://localhost:<port of TALLY_HTTP_ADDR>, or its host when it names one.
	URL string
	// DemoKey is a service API key the demo app's backend spends with; its
	// SHA-256 must be one of TALLY_API_KEYS' service entries.
	DemoKey string
}

// Sandbox defaults: the keys the sandbox uses when none is configured.
const (
	SandboxSecretKey     = "sk_test_sandbox"
	SandboxWebhookSecret = "whsec_sandbox"
)

// Where refunds and disputes take credits back from (TALLY_REVOKE_FROM).
const (
	// RevokeFromBalance: the payment's purchase grant first, then the
	// customer's other grants in draw order; what they cannot cover is
	// recorded as a shortfall.
	RevokeFromBalance = "balance"
	// RevokeFromPurchaseGrant: only what is left of the purchase grant; the
	// rest is neither taken nor recorded.
	RevokeFromPurchaseGrant = "purchase_grant"
)

// CreditsConfig holds wallet defaults and the sweeper period (expiries,
// and holds past their expires_at).
type CreditsConfig struct {
	// DefaultLowBalanceThreshold of 0 means no low-balance notice.
	DefaultLowBalanceThreshold int64
	// ExpiringNotice is the longest expiry notice (0: none);
	// ExpiringNotices every horizon, longest first, when
	// TALLY_CREDITS_EXPIRING_NOTICE lists several (nil: ExpiringNotice only).
	ExpiringNotice  time.Duration
	ExpiringNotices []time.Duration
	SweepInterval   time.Duration
	// RevokeFrom is RevokeFromBalance or RevokeFromPurchaseGrant.
	RevokeFrom string
	// ForecastWarnDays: credits.depletion_forecast fires when the
	// pessimistic runway drops under this many days (1 to 90).
	ForecastWarnDays int
	// ForecastInterval is how often the forecast watcher looks at the
	// customers whose balance changed.
	ForecastInterval time.Duration
}

// Checkout confirmation strategies (TALLY_CONFIRM_ON).
const (
	ConfirmOnPaymentIntent   = "payment_intent"
	ConfirmOnCheckoutSession = "checkout_session"
)

// CheckoutConfig holds how Checkout Sessions are created and confirmed.
type CheckoutConfig struct {
	ExpiresAfter    time.Duration
	InvoiceCreation bool
	// ConfirmOn is ConfirmOnPaymentIntent or ConfirmOnCheckoutSession.
	ConfirmOn string
	// RateLimit is how many checkouts one customer may start per minute,
	// counted across every replica; 0 means no limit.
	RateLimit int
}

// Meter event transports (TALLY_METER_TRANSPORT).
const (
	MeterTransportV1 = "v1"
	MeterTransportV2 = "v2"
)

// MeteringConfig holds the usage delivery worker's settings.
type MeteringConfig struct {
	// Transport is MeterTransportV1 (meter_events API) or MeterTransportV2 (event stream).
	Transport string
	// RateLimit is the most meter-event requests per second, shared by every
	// running delivery worker (each takes an even share).
	RateLimit float64
	// BackoffMax caps the wait between two attempts at an event that failed
	// retryably (5xx, timeout, network). There is no attempt limit: an event
	// is retried while Stripe still accepts its timestamp.
	BackoffMax time.Duration
	// BackoffBase is the first of those waits; each retry may wait up to
	// twice as long as the one before (jittered), up to BackoffMax.
	BackoffBase  time.Duration
	BatchSize    int
	PollInterval time.Duration
	// ReconcileInterval is how often every meter is reconciled with
	// Stripe's summaries over the last settled window of that length
	// (TALLY_RECONCILE_INTERVAL); 0 disables it.
	ReconcileInterval time.Duration
	// SendTimeout bounds one request to Stripe. It also sizes the lease on
	// a claimed batch (the batch's time at the rate limit, plus two and a
	// half SendTimeouts), after which a claim of a worker that died is
	// taken over by another.
	SendTimeout time.Duration
}

// The shortest retentions accepted (Validate refuses less, rather than
// quietly keeping more than asked).
const (
	// MinStripeEventRetention: Stripe redelivers an event for up to three
	// days and lists events for 30 days; an id kept 35 days is never
	// processed twice, whatever Stripe sends or an operator replays.
	MinStripeEventRetention = 35 * 24 * time.Hour
	// MinUsageEventRetention: intake accepts timestamps up to 35 days old,
	// so an identifier is kept at least as long as the same event could
	// be sent again and must be answered duplicate, not stored twice.
	MinUsageEventRetention = 35 * 24 * time.Hour
	// MinEventRetention: the feed keeps a week at least for its consumers.
	MinEventRetention = 7 * 24 * time.Hour
	// MinIdempotencyKeyRetention: a key's first answer is replayed for 24
	// hours.
	MinIdempotencyKeyRetention = 24 * time.Hour
)

// RetentionConfig says how long what grows without bound is kept; the
// janitor on every instance deletes older rows in small batches.
type RetentionConfig struct {
	// StripeEvents: processed and ignored Stripe events, by receipt
	// (failed, parked and unprocessed ones are kept whatever their age).
	StripeEvents time.Duration
	// UsageEvents: delivered usage events, by timestamp; their values are
	// kept as daily totals per customer and meter.
	UsageEvents time.Duration
	// Events: the outbound event feed, by creation (events the webhook
	// push has not delivered yet are kept).
	Events time.Duration
	// IdempotencyKeys: stored answers of keyed requests, by creation.
	IdempotencyKeys time.Duration
	// Interval is how often the janitor runs; BatchSize bounds the rows
	// one statement deletes.
	Interval  time.Duration
	BatchSize int
}

// EventsWebhook is the optional push of outbound events to the host app.
type EventsWebhook struct {
	URL    string
	Secret string
}

// Config is every setting of tally, typed and defaulted.
type Config struct {
	DatabaseURL     string
	DBMaxOpenConns  int
	HTTPAddr        string
	MetricsAddr     string // empty: /metrics on the main listener
	AutoMigrate     bool
	CatalogFile     string
	CORSOrigins     []string
	MaxBodyBytes    int64
	ShutdownTimeout time.Duration
	// RequestTimeout bounds how long a request may run before it is
	// answered 503: a database or a Stripe that stops answering (accepts
	// the connection, then says nothing) would otherwise hold the request,
	// and its caller, until the operating system gives up on the
	// connection. The server's write timeout is at least this plus ten
	// seconds, so the 503 is always written. The usage import, which
	// streams, is not bounded by it; work that runs on once its caller is
	// gone (a webhook's processing, a consume's batch) keeps its own
	// bounds.
	RequestTimeout time.Duration
	LogLevel       slog.Level
	TrustedProxies []netip.Prefix // whose X-Forwarded-For names the client; empty: none

	APIKeys       []APIKey
	JWT           JWTConfig
	Stripe        StripeConfig
	Credits       CreditsConfig
	Checkout      CheckoutConfig
	Metering      MeteringConfig
	EventsWebhook EventsWebhook
	Retention     RetentionConfig
	Catalog       catalog.Catalog

	// Obsolete names settings that are set but no longer have an effect,
	// each with what replaced it; they are logged as warnings at start.
	Obsolete []string
}

// MinDBOpenConns is the smallest pool tally runs with. Three background
// jobs (the invariant check, the usage reconciliation and the Stripe sync)
// each keep one pooled connection for their session advisory lock (one
// replica at a time runs each) while they work through another; with two
// connections two of them held both and waited for a third, and the
// server hung on its first request (TestRevfTinyPoolDeferralStorm). Four
// leave one to share only while nothing else holds a connection while it
// asks for another: every other job and request holds at most one at a
// time (the forecast watcher and the automatic top-up charge did not:
// TestForecastWatcherBesideTheLockKeepers,
// TestAutoTopUpChargeBesideTheLockKeepers).
const MinDBOpenConns = 4

// Default returns the configuration of an empty environment.
func Default() Config {
	return Config{
		DatabaseURL:     "postgres://postgres@127.0.0.1:5432/tally?sslmode=disable",
		DBMaxOpenConns:  20,
		HTTPAddr:        ":8080",
		MaxBodyBytes:    1 << 20,
		ShutdownTimeout: 30 * time.Second,
		RequestTimeout:  50 * time.Second,
		LogLevel:        slog.LevelInfo,
		Stripe: StripeConfig{
			WebhookMaxBodyBytes: 512 << 10,
			EventMaxAttempts:    8,
			EventRetryInterval:  10 * time.Second,
			PendingCheckAfter:   15 * time.Minute,
			SyncInterval:        5 * time.Minute,
			VerifyInterval:      15 * time.Minute,
			EventLease:          time.Minute,
		},
		Credits: CreditsConfig{
			ExpiringNotice:   168 * time.Hour,
			SweepInterval:    time.Minute,
			RevokeFrom:       RevokeFromBalance,
			ForecastWarnDays: 7,
			ForecastInterval: 10 * time.Minute,
		},
		Checkout: CheckoutConfig{
			ExpiresAfter: time.Hour,
			ConfirmOn:    ConfirmOnPaymentIntent,
			RateLimit:    10,
		},
		Metering: MeteringConfig{
			Transport:    MeterTransportV1,
			RateLimit:    20,
			BackoffMax:   10 * time.Minute,
			BackoffBase:  2 * time.Second,
			BatchSize:    100,
			PollInterval: time.Second,

			ReconcileInterval: time.Hour,
			SendTimeout:       20 * time.Second,
		},
		Retention: RetentionConfig{
			StripeEvents:    90 * 24 * time.Hour,
			UsageEvents:     90 * 24 * time.Hour,
			Events:          90 * 24 * time.Hour,
			IdempotencyKeys: 48 * time.Hour,
			Interval:        time.Hour,
			BatchSize:       1000,
		},
	}
}

// envParser reads variables and collects one error per bad variable; a bad
// value leaves the default in place so Validate does not report it twice.
type envParser struct {
	getenv func(string) string
	errs   problems
}

func (p *envParser) fail(name, format string, args ...any) { p.errs.add(name, format, args...) }

func (p *envParser) str(name string, dst *string) {
	if v := strings.TrimSpace(p.getenv(name)); v != "" {
		*dst = v
	}
}

func (p *envParser) list(name string, dst *[]string) {
	v := p.getenv(name)
	if strings.TrimSpace(v) == "" {
		return
	}
	var out []string
	for _, item := range strings.Split(v, ",") {
		if item = strings.TrimSpace(item); item != "" {
			out = append(out, item)
		}
	}
	*dst = out
}

func (p *envParser) boolean(name string, dst *bool) {
	v := strings.TrimSpace(p.getenv(name))
	if v == "" {
		return
	}
	b, err := strconv.ParseBool(v)
	if err != nil {
		p.fail(name, "%q is not a boolean (use true or false)", v)
		return
	}
	*dst = b
}

func (p *envParser) integer(name string, dst *int) {
	var n int64
	if p.int64(name, &n) {
		if n < math.MinInt32 || n > math.MaxInt32 {
			p.fail(name, "%d is out of range", n)
			return
		}
		*dst = int(n)
	}
}

func (p *envParser) int64(name string, dst *int64) bool {
	v := strings.TrimSpace(p.getenv(name))
	if v == "" {
		return false
	}
	n, err := strconv.ParseInt(v, 10, 64)
	if err != nil {
		p.fail(name, "%q is not an integer", v)
		return false
	}
	*dst = n
	return true
}

func (p *envParser) float(name string, dst *float64) {
	v := strings.TrimSpace(p.getenv(name))
	if v == "" {
		return
	}
	f, err := strconv.ParseFloat(v, 64)
	if err != nil || math.IsNaN(f) || math.IsInf(f, 0) {
		p.fail(name, "%q is not a number", v)
		return
	}
	*dst = f
}

func (p *envParser) duration(name string, dst *time.Duration) {
	v := strings.TrimSpace(p.getenv(name))
	if v == "" {
		return
	}
	d, err := time.ParseDuration(v)
	if err != nil {
		p.fail(name, "%q is not a duration (examples: 500ms, 30s, 1h)", v)
		return
	}
	*dst = d
}

// durations reads one duration or a comma-separated list: longest gets
// the longest, all every one (longest first) when there are several.
func (p *envParser) durations(name string, longest *time.Duration, all *[]time.Duration) {
	v := strings.TrimSpace(p.getenv(name))
	if v == "" {
		return
	}
	var ds []time.Duration
	for _, part := range strings.Split(v, ",") {
		d, err := time.ParseDuration(strings.TrimSpace(part))
		if err != nil {
			p.fail(name, "%q is not a duration or a comma-separated list of them (examples: 168h, 720h,168h,24h)", v)
			return
		}
		ds = append(ds, d)
	}
	slices.SortFunc(ds, func(a, b time.Duration) int { return cmp.Compare(b, a) })
	ds = slices.Compact(ds)
	*longest = ds[0]
	*all = nil
	if len(ds) > 1 {
		*all = ds
	}
}

// Load reads every TALLY_* variable through getenv, loads the catalog file and
// the RS256 public key file when they are named, and validates the result.
// The error joins one error per problem, each naming its variable.
func Load(getenv func(string) string) (Config, error) {
	c := Default()
	p := &envParser{getenv: getenv}

	p.str("TALLY_DATABASE_URL", &c.DatabaseURL)
	p.integer("TALLY_DB_MAX_OPEN_CONNS", &c.DBMaxOpenConns)
	p.str("TALLY_HTTP_ADDR", &c.HTTPAddr)
	p.str("TALLY_METRICS_ADDR", &c.MetricsAddr)
	p.boolean("TALLY_AUTO_MIGRATE", &c.AutoMigrate)
	p.str("TALLY_CATALOG_FILE", &c.CatalogFile)
	p.list("TALLY_CORS_ORIGINS", &c.CORSOrigins)
	var proxies []string
	p.list("TALLY_TRUSTED_PROXIES", &proxies)
	for _, entry := range proxies {
		prefix, err := parseProxy(entry)
		if err != nil {
			p.fail("TALLY_TRUSTED_PROXIES", "%v", err)
			continue
		}
		c.TrustedProxies = append(c.TrustedProxies, prefix)
	}
	p.int64("TALLY_MAX_BODY_BYTES", &c.MaxBodyBytes)
	p.duration("TALLY_SHUTDOWN_TIMEOUT", &c.ShutdownTimeout)
	p.duration("TALLY_REQUEST_TIMEOUT", &c.RequestTimeout)
	if v := strings.TrimSpace(getenv("TALLY_LOG_LEVEL")); v != "" {
		lvl, err := parseLogLevel(v)
		if err != nil {
			p.fail("TALLY_LOG_LEVEL", "%v", err)
		} else {
			c.LogLevel = lvl
		}
	}

	var apiKeys []string
	p.list("TALLY_API_KEYS", &apiKeys)
	for i, entry := range apiKeys {
		k, err := parseAPIKey(entry)
		if err != nil {
			p.fail("TALLY_API_KEYS", "entry %d: %v", i+1, err)
			continue
		}
		c.APIKeys = append(c.APIKeys, k)
	}

	var hs256 string
	p.str("TALLY_JWT_HS256_SECRET", &hs256)
	if hs256 != "" {
		c.JWT.HS256Secret = []byte(hs256)
	}
	var rsaFile string
	p.str("TALLY_JWT_RS256_PUBLIC_KEY_FILE", &rsaFile)
	if rsaFile != "" {
		key, err := loadRSAPublicKey(rsaFile)
		if err != nil {
			p.fail("TALLY_JWT_RS256_PUBLIC_KEY_FILE", "%v", err)
		} else {
			c.JWT.RS256PublicKey = key
		}
	}
	p.str("TALLY_JWT_ISSUER", &c.JWT.Issuer)
	p.str("TALLY_JWT_AUDIENCE", &c.JWT.Audience)

	p.str("TALLY_STRIPE_SECRET_KEY", &c.Stripe.SecretKey)
	p.str("TALLY_STRIPE_API_URL", &c.Stripe.APIURL)
	p.str("TALLY_STRIPE_METER_EVENTS_URL", &c.Stripe.MeterEventsURL)
	p.list("TALLY_STRIPE_WEBHOOK_SECRETS", &c.Stripe.WebhookSecrets)
	p.int64("TALLY_WEBHOOK_MAX_BODY_BYTES", &c.Stripe.WebhookMaxBodyBytes)
	p.integer("TALLY_STRIPE_EVENT_MAX_ATTEMPTS", &c.Stripe.EventMaxAttempts)
	p.duration("TALLY_STRIPE_EVENT_RETRY_INTERVAL", &c.Stripe.EventRetryInterval)
	p.duration("TALLY_PENDING_CHECK_AFTER", &c.Stripe.PendingCheckAfter)
	p.duration("TALLY_STRIPE_SYNC_INTERVAL", &c.Stripe.SyncInterval)
	p.duration("TALLY_VERIFY_INTERVAL", &c.Stripe.VerifyInterval)
	p.duration("TALLY_STRIPE_EVENT_LEASE", &c.Stripe.EventLease)
	p.boolean("TALLY_STRIPE_SANDBOX", &c.Stripe.Sandbox.Enabled)
	p.str("TALLY_STRIPE_SANDBOX_URL", &c.Stripe.Sandbox.URL)
	p.str("TALLY_STRIPE_SANDBOX_DEMO_KEY", &c.Stripe.Sandbox.DemoKey)
	if c.Stripe.Sandbox.Enabled {
		// The sandbox needs no Stripe account: its own test key and signing
		// secret unless others are set.
		if c.Stripe.SecretKey == "" {
			c.Stripe.SecretKey = SandboxSecretKey
		}
		if len(c.Stripe.WebhookSecrets) == 0 {
			c.Stripe.WebhookSecrets = []string{SandboxWebhookSecret}
		}
		if c.Stripe.Sandbox.URL == "" {
			c.Stripe.Sandbox.URL = SandboxURL(c.HTTPAddr)
		}
	}

	p.int64("TALLY_LOW_BALANCE_THRESHOLD", &c.Credits.DefaultLowBalanceThreshold)
	p.durations("TALLY_CREDITS_EXPIRING_NOTICE", &c.Credits.ExpiringNotice, &c.Credits.ExpiringNotices)
	p.duration("TALLY_CREDITS_SWEEP_INTERVAL", &c.Credits.SweepInterval)
	p.str("TALLY_REVOKE_FROM", &c.Credits.RevokeFrom)
	p.integer("TALLY_FORECAST_WARN_DAYS", &c.Credits.ForecastWarnDays)
	p.duration("TALLY_FORECAST_CHECK_INTERVAL", &c.Credits.ForecastInterval)

	p.duration("TALLY_CHECKOUT_EXPIRES_AFTER", &c.Checkout.ExpiresAfter)
	p.boolean("TALLY_CHECKOUT_INVOICE_CREATION", &c.Checkout.InvoiceCreation)
	p.str("TALLY_CONFIRM_ON", &c.Checkout.ConfirmOn)
	p.integer("TALLY_CHECKOUT_RATE_LIMIT", &c.Checkout.RateLimit)

	p.str("TALLY_METER_TRANSPORT", &c.Metering.Transport)
	p.float("TALLY_METER_RATE_LIMIT", &c.Metering.RateLimit)
	p.duration("TALLY_METER_BACKOFF_MAX", &c.Metering.BackoffMax)
	if strings.TrimSpace(getenv("TALLY_METER_MAX_ATTEMPTS")) != "" {
		c.Obsolete = append(c.Obsolete, "TALLY_METER_MAX_ATTEMPTS is no longer used and is ignored: usage delivery "+
			"retries for as long as Stripe accepts the event's timestamp, waiting at most TALLY_METER_BACKOFF_MAX between attempts")
	}
	p.duration("TALLY_METER_BACKOFF_BASE", &c.Metering.BackoffBase)
	p.integer("TALLY_METER_BATCH_SIZE", &c.Metering.BatchSize)
	p.duration("TALLY_METER_POLL_INTERVAL", &c.Metering.PollInterval)
	p.duration("TALLY_RECONCILE_INTERVAL", &c.Metering.ReconcileInterval)
	p.duration("TALLY_METER_SEND_TIMEOUT", &c.Metering.SendTimeout)

	p.duration("TALLY_RETENTION_STRIPE_EVENTS", &c.Retention.StripeEvents)
	p.duration("TALLY_RETENTION_USAGE_EVENTS", &c.Retention.UsageEvents)
	p.duration("TALLY_RETENTION_EVENTS", &c.Retention.Events)
	p.duration("TALLY_RETENTION_IDEMPOTENCY_KEYS", &c.Retention.IdempotencyKeys)
	p.duration("TALLY_RETENTION_INTERVAL", &c.Retention.Interval)
	p.integer("TALLY_RETENTION_BATCH_SIZE", &c.Retention.BatchSize)

	p.str("TALLY_EVENTS_WEBHOOK_URL", &c.EventsWebhook.URL)
	p.str("TALLY_EVENTS_WEBHOOK_SECRET", &c.EventsWebhook.Secret)

	if c.CatalogFile != "" {
		cat, err := catalog.Load(c.CatalogFile)
		if err != nil {
			p.fail("TALLY_CATALOG_FILE", "%v", err)
		} else {
			c.Catalog = cat
		}
	}

	err := errors.Join(append(p.errs, c.Validate())...)
	if err != nil {
		return Config{}, err
	}
	return c, nil
}

// parseProxy reads a CIDR (10.0.0.0/8, fd00::/8) or a single address.
func parseProxy(entry string) (netip.Prefix, error) {
	if prefix, err := netip.ParsePrefix(entry); err == nil {
		return prefix.Masked(), nil
	}
	addr, err := netip.ParseAddr(entry)
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("%q is not a CIDR (10.0.0.0/8) or an IP address", entry)
	}
	return netip.PrefixFrom(addr, addr.BitLen()), nil
}

func parseLogLevel(v string) (slog.Level, error) {
	switch strings.ToLower(v) {
	case "debug":
		return slog.LevelDebug, nil
	case "info":
		return slog.LevelInfo, nil
	case "warn", "warning":
		return slog.LevelWarn, nil
	case "error":
		return slog.LevelError, nil
	}
	return 0, fmt.Errorf("%q is not a log level (debug, info, warn, error)", v)
}

func parseAPIKey(entry string) (APIKey, error) {
	scope, hexHash, ok := strings.Cut(entry, ":")
	if !ok {
		return APIKey{}, errors.New("want scope:sha256hex")
	}
	var k APIKey
	k.Scope = Scope(strings.TrimSpace(scope))
	hexHash = strings.TrimSpace(hexHash)
	if len(hexHash) != 64 {
		return APIKey{}, fmt.Errorf("scope %q: the hash must be 64 hex characters (the SHA-256 of the key), got %d characters", k.Scope, len(hexHash))
	}
	if _, err := hex.Decode(k.Hash[:], []byte(hexHash)); err != nil {
		return APIKey{}, fmt.Errorf("scope %q: the hash is not hex", k.Scope)
	}
	return k, nil
}

// HashAPIKey is the SHA-256 under which a bearer key is configured.
func HashAPIKey(key string) [32]byte { return sha256.Sum256([]byte(key)) }

func loadRSAPublicKey(path string) (*rsa.PublicKey, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	return ParseRSAPublicKey(data)
}

// ParseRSAPublicKey reads an RSA public key from PEM: PKIX "PUBLIC KEY",
// PKCS#1 "RSA PUBLIC KEY" or an X.509 "CERTIFICATE".
func ParseRSAPublicKey(data []byte) (*rsa.PublicKey, error) {
	block, _ := pem.Decode(data)
	if block == nil {
		return nil, errors.New("no PEM block found")
	}
	var pub any
	var err error
	switch block.Type {
	case "PUBLIC KEY":
		pub, err = x509.ParsePKIXPublicKey(block.Bytes)
	case "RSA PUBLIC KEY":
		pub, err = x509.ParsePKCS1PublicKey(block.Bytes)
	case "CERTIFICATE":
		var cert *x509.Certificate
		if cert, err = x509.ParseCertificate(block.Bytes); err == nil {
			pub = cert.PublicKey
		}
	default:
		return nil, fmt.Errorf("PEM block %q is not a public key", block.Type)
	}
	if err != nil {
		return nil, err
	}
	key, ok := pub.(*rsa.PublicKey)
	if !ok {
		return nil, fmt.Errorf("the key is %T, not RSA", pub)
	}
	if key.N.BitLen() < 2048 {
		return nil, fmt.Errorf("the RSA key has %d bits; at least 2048 are required", key.N.BitLen())
	}
	return key, nil
}

// problems collects one error per bad setting, each naming its variable.
type problems []error

func (p *problems) add(name, format string, args ...any) {
	*p = append(*p, fmt.Errorf("%s: %s", name, fmt.Sprintf(format, args...)))
}

// Validate checks every setting and returns one error per problem, joined.
func (c Config) Validate() error {
	var p problems
	if c.DatabaseURL == "" {
		p.add("TALLY_DATABASE_URL", "must be set")
	} else if _, err := pgconn.ParseConfig(c.DatabaseURL); err != nil {
		p.add("TALLY_DATABASE_URL", "does not parse as a PostgreSQL URL: %v", err)
	}
	if c.DBMaxOpenConns < MinDBOpenConns {
		p.add("TALLY_DB_MAX_OPEN_CONNS", "must be at least %d (three background jobs each keep a connection for their lock while they work through another), got %d",
			MinDBOpenConns, c.DBMaxOpenConns)
	}
	if err := checkListenAddr(c.HTTPAddr); err != nil {
		p.add("TALLY_HTTP_ADDR", "%v", err)
	}
	if c.MetricsAddr != "" {
		if err := checkListenAddr(c.MetricsAddr); err != nil {
			p.add("TALLY_METRICS_ADDR", "%v", err)
		} else if c.MetricsAddr == c.HTTPAddr && !anyPort(c.HTTPAddr) {
			p.add("TALLY_METRICS_ADDR", "must differ from TALLY_HTTP_ADDR (leave it empty to serve /metrics on the main listener)")
		}
	}
	for _, prefix := range c.TrustedProxies {
		if !prefix.IsValid() {
			p.add("TALLY_TRUSTED_PROXIES", "%v is not a valid CIDR", prefix)
		}
	}
	for _, o := range c.CORSOrigins {
		if err := checkOrigin(o); err != nil {
			p.add("TALLY_CORS_ORIGINS", "%q: %v", o, err)
		}
	}
	if c.MaxBodyBytes <= 0 {
		p.add("TALLY_MAX_BODY_BYTES", "must be positive, got %d", c.MaxBodyBytes)
	}
	if c.ShutdownTimeout <= 0 {
		p.add("TALLY_SHUTDOWN_TIMEOUT", "must be positive, got %s", c.ShutdownTimeout)
	}
	if c.RequestTimeout < time.Second {
		p.add("TALLY_REQUEST_TIMEOUT", "must be at least 1s, got %s", c.RequestTimeout)
	}

	seen := make(map[[32]byte]bool, len(c.APIKeys))
	for i, k := range c.APIKeys {
		if k.Scope != ScopeService && k.Scope != ScopeAdmin {
			p.add("TALLY_API_KEYS", "entry %d: scope %q is not service or admin", i+1, k.Scope)
		}
		if seen[k.Hash] {
			p.add("TALLY_API_KEYS", "entry %d: the same key hash is listed twice", i+1)
		}
		seen[k.Hash] = true
	}

	if s := c.JWT.HS256Secret; s != nil && len(s) < 32 {
		p.add("TALLY_JWT_HS256_SECRET", "must be at least 32 bytes (RFC 7518 §3.2), got %d", len(s))
	}

	c.Stripe.check(&p)
	c.Credits.check(&p)
	c.Checkout.check(&p)
	c.Metering.check(&p)
	if sb := c.Stripe.Sandbox; sb.Enabled {
		if c.Stripe.Livemode() {
			p.add("TALLY_STRIPE_SANDBOX", "refused with a live Stripe key (TALLY_STRIPE_SECRET_KEY is sk_live_/rk_live_): the sandbox is test mode only")
		}
		if c.Stripe.APIURL != "" || c.Stripe.MeterEventsURL != "" {
			p.add("TALLY_STRIPE_SANDBOX", "refused together with TALLY_STRIPE_API_URL or TALLY_STRIPE_METER_EVENTS_URL: the sandbox is tally's Stripe; unset one or the other")
		}
		// Empty only when TALLY_HTTP_ADDR has no fixed port: the sandbox
		// then takes the address tally bound (internal/app).
		if sb.URL != "" {
			if err := checkHTTPURL(sb.URL); err != nil {
				p.add("TALLY_STRIPE_SANDBOX_URL", "%v", err)
			}
		}
		if sb.DemoKey != "" {
			sum := HashAPIKey(sb.DemoKey)
			found := false
			for _, k := range c.APIKeys {
				found = found || (k.Scope == ScopeService && k.Hash == sum)
			}
			if !found {
				p.add("TALLY_STRIPE_SANDBOX_DEMO_KEY", "its SHA-256 is not a service key of TALLY_API_KEYS, so the demo backend could not spend with it")
			}
		}
	} else {
		if sb.URL != "" {
			p.add("TALLY_STRIPE_SANDBOX_URL", "is set but TALLY_STRIPE_SANDBOX is not true")
		}
		if sb.DemoKey != "" {
			p.add("TALLY_STRIPE_SANDBOX_DEMO_KEY", "is set but TALLY_STRIPE_SANDBOX is not true")
		}
	}

	if u := c.EventsWebhook.URL; u != "" {
		if err := checkHTTPURL(u); err != nil {
			p.add("TALLY_EVENTS_WEBHOOK_URL", "%v", err)
		}
		if c.EventsWebhook.Secret == "" {
			p.add("TALLY_EVENTS_WEBHOOK_SECRET", "must be set when TALLY_EVENTS_WEBHOOK_URL is set, so the host app can verify pushes")
		}
	}

	c.Retention.check(&p)

	if err := c.Catalog.Validate(); err != nil {
		p.add("TALLY_CATALOG_FILE", "%v", err)
	}
	return errors.Join(p...)
}

func (s StripeConfig) check(p *problems) {
	if k := s.SecretKey; k != "" && !hasAnyPrefix(k, "sk_test_", "sk_live_", "rk_test_", "rk_live_") {
		p.add("TALLY_STRIPE_SECRET_KEY", "must start with sk_test_, sk_live_, rk_test_ or rk_live_")
	}
	if u := s.APIURL; u != "" {
		if err := checkHTTPURL(u); err != nil {
			p.add("TALLY_STRIPE_API_URL", "%v", err)
		}
	}
	if u := s.MeterEventsURL; u != "" {
		if err := checkHTTPURL(u); err != nil {
			p.add("TALLY_STRIPE_METER_EVENTS_URL", "%v", err)
		}
	}
	for i, secret := range s.WebhookSecrets {
		if !strings.HasPrefix(secret, "whsec_") || len(secret) == len("whsec_") {
			p.add("TALLY_STRIPE_WEBHOOK_SECRETS", "entry %d does not look like a Stripe signing secret (whsec_...)", i+1)
		}
	}
	if s.WebhookMaxBodyBytes <= 0 {
		p.add("TALLY_WEBHOOK_MAX_BODY_BYTES", "must be positive, got %d", s.WebhookMaxBodyBytes)
	}
	if s.EventMaxAttempts < 1 {
		p.add("TALLY_STRIPE_EVENT_MAX_ATTEMPTS", "must be at least 1, got %d", s.EventMaxAttempts)
	}
	if s.EventRetryInterval <= 0 {
		p.add("TALLY_STRIPE_EVENT_RETRY_INTERVAL", "must be positive, got %s", s.EventRetryInterval)
	}
	if s.PendingCheckAfter < 0 {
		p.add("TALLY_PENDING_CHECK_AFTER", "must not be negative, got %s", s.PendingCheckAfter)
	}
	if s.SyncInterval < 0 {
		p.add("TALLY_STRIPE_SYNC_INTERVAL", "must not be negative (0 disables the background sync), got %s", s.SyncInterval)
	}
	if s.VerifyInterval < 0 {
		p.add("TALLY_VERIFY_INTERVAL", "must not be negative (0 disables the background verify), got %s", s.VerifyInterval)
	}
	if d := s.EventLease; d <= 0 || d > time.Hour {
		p.add("TALLY_STRIPE_EVENT_LEASE", "must be positive and at most 1h, got %s", d)
	}
}

// Validate checks the credits settings as Config.Validate does. The
// services built from them call it: a zero setting in a hand-built
// CreditsConfig is a programming error, not a second default.
func (c CreditsConfig) Validate() error { return validated(c.check) }

func (c CreditsConfig) check(p *problems) {
	if c.DefaultLowBalanceThreshold < 0 {
		p.add("TALLY_LOW_BALANCE_THRESHOLD", "must not be negative, got %d", c.DefaultLowBalanceThreshold)
	}
	if c.ExpiringNotice < 0 {
		p.add("TALLY_CREDITS_EXPIRING_NOTICE", "must not be negative, got %s", c.ExpiringNotice)
	}
	for _, d := range c.ExpiringNotices {
		if d <= 0 {
			p.add("TALLY_CREDITS_EXPIRING_NOTICE", "every horizon of a list must be positive, got %s", d)
		}
	}
	if c.SweepInterval <= 0 {
		p.add("TALLY_CREDITS_SWEEP_INTERVAL", "must be positive, got %s", c.SweepInterval)
	}
	if v := c.RevokeFrom; v != RevokeFromBalance && v != RevokeFromPurchaseGrant {
		p.add("TALLY_REVOKE_FROM", "%q is not balance or purchase_grant", v)
	}
	if c.ForecastWarnDays < 1 || c.ForecastWarnDays > 90 {
		p.add("TALLY_FORECAST_WARN_DAYS", "must be from 1 to 90, got %d", c.ForecastWarnDays)
	}
	if c.ForecastInterval <= 0 {
		p.add("TALLY_FORECAST_CHECK_INTERVAL", "must be positive, got %s", c.ForecastInterval)
	}
}

// Validate checks the checkout settings as Config.Validate does. The
// services built from them call it: a zero setting in a hand-built
// CheckoutConfig is a programming error, not a second default.
func (c CheckoutConfig) Validate() error { return validated(c.check) }

func (c CheckoutConfig) check(p *problems) {
	// Stripe refuses a Checkout Session expiring sooner than 30 minutes or
	// later than 24 hours after creation.
	if d := c.ExpiresAfter; d < 30*time.Minute || d > 24*time.Hour {
		p.add("TALLY_CHECKOUT_EXPIRES_AFTER", "must be between 30m and 24h (Stripe's limits), got %s", d)
	}
	if c.RateLimit < 0 {
		p.add("TALLY_CHECKOUT_RATE_LIMIT", "must not be negative (0 means no limit), got %d", c.RateLimit)
	}
	if v := c.ConfirmOn; v != ConfirmOnPaymentIntent && v != ConfirmOnCheckoutSession {
		p.add("TALLY_CONFIRM_ON", "%q is not payment_intent or checkout_session", v)
	}
}

// Validate checks the usage delivery settings as Config.Validate does. The
// worker built from them calls it: a zero setting in a hand-built
// MeteringConfig is a programming error, not a second default.
func (m MeteringConfig) Validate() error { return validated(m.check) }

func (m MeteringConfig) check(p *problems) {
	if v := m.Transport; v != MeterTransportV1 && v != MeterTransportV2 {
		p.add("TALLY_METER_TRANSPORT", "%q is not v1 or v2", v)
	}
	if r := m.RateLimit; !(r > 0) || math.IsInf(r, 0) {
		p.add("TALLY_METER_RATE_LIMIT", "must be a positive number, got %v", r)
	}
	if d := m.BackoffMax; d <= 0 || d > 24*time.Hour {
		p.add("TALLY_METER_BACKOFF_MAX", "must be positive and at most 24h, got %s", d)
	}
	if b := m.BatchSize; b < 1 || b > 1000 {
		p.add("TALLY_METER_BATCH_SIZE", "must be between 1 and 1000, got %d", b)
	}
	if m.PollInterval <= 0 {
		p.add("TALLY_METER_POLL_INTERVAL", "must be positive, got %s", m.PollInterval)
	}
	if d := m.ReconcileInterval; d != 0 && (d < time.Minute || d > 7*24*time.Hour || d%time.Minute != 0) {
		p.add("TALLY_RECONCILE_INTERVAL", "must be 0 (off) or whole minutes from 1m to 168h, got %s", d)
	}
	// A base above the cap only means every wait is capped.
	if d := m.BackoffBase; d <= 0 || d > 24*time.Hour {
		p.add("TALLY_METER_BACKOFF_BASE", "must be positive and at most 24h, got %s", d)
	}
	if d := m.SendTimeout; d <= 0 || d > 5*time.Minute {
		p.add("TALLY_METER_SEND_TIMEOUT", "must be positive and at most 5m, got %s", d)
	}
}

func (r RetentionConfig) check(p *problems) {
	for _, k := range []struct {
		name     string
		got, min time.Duration
		why      string
	}{
		{"TALLY_RETENTION_STRIPE_EVENTS", r.StripeEvents, MinStripeEventRetention, "Stripe redelivers and lists events that long"},
		{"TALLY_RETENTION_USAGE_EVENTS", r.UsageEvents, MinUsageEventRetention, "Stripe accepts usage timestamps that old, so an identifier must be kept that long"},
		{"TALLY_RETENTION_EVENTS", r.Events, MinEventRetention, "the event feed keeps a week at least for its consumers"},
		{"TALLY_RETENTION_IDEMPOTENCY_KEYS", r.IdempotencyKeys, MinIdempotencyKeyRetention, "a key's first answer is replayed for 24 hours"},
	} {
		if k.got < k.min {
			p.add(k.name, "must be at least %s (%s), got %s", k.min, k.why, k.got)
		}
	}
	if r.Interval <= 0 {
		p.add("TALLY_RETENTION_INTERVAL", "must be positive, got %s", r.Interval)
	}
	if r.BatchSize < 1 || r.BatchSize > 10000 {
		p.add("TALLY_RETENTION_BATCH_SIZE", "must be between 1 and 10000, got %d", r.BatchSize)
	}
}

// validated runs one section's checks and joins what they found.
func validated(check func(*problems)) error {
	var p problems
	check(&p)
	return errors.Join(p...)
}

// SandboxURL is the base URL of a tally listening on addr, as a browser on
// the same machine reaches it; "" when addr has no fixed port.
func SandboxURL(addr string) string {
	host, port, err := net.SplitHostPort(addr)
	if err != nil || port == "" || port == "0" {
		return ""
	}
	switch host {
	case "", "0.0.0.0", "::":
		host = "localhost"
	}
	return "http://" + net.JoinHostPort(host, port)
}

func hasAnyPrefix(s string, prefixes ...string) bool {
	for _, p := range prefixes {
		if strings.HasPrefix(s, p) {
			return true
		}
	}
	return false
}

// anyPort reports whether addr asks for a port the system picks (port 0):
// two such listeners never collide.
func anyPort(addr string) bool {
	_, port, err := net.SplitHostPort(addr)
	return err == nil && port == "0"
}

func checkListenAddr(addr string) error {
	if addr == "" {
		return errors.New("must be set")
	}
	_, port, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("%q is not host:port: %v", addr, err)
	}
	if n, err := strconv.Atoi(port); err != nil || n < 0 || n > 65535 {
		return fmt.Errorf("%q has a bad port", addr)
	}
	return nil
}

// checkOrigin accepts what a browser sends as Origin: scheme://host[:port].
func checkOrigin(o string) error {
	u, err := url.Parse(o)
	if err != nil {
		return err
	}
	if u.Scheme != "http" && u.Scheme != "https" {
		return errors.New("want http://host or https://host")
	}
	if u.Host == "" || u.Hostname() == "" || u.User != nil || u.Opaque != "" {
		return errors.New("want scheme://host[:port]")
	}
	if (u.Path != "" && u.Path != "/") || u.RawQuery != "" || u.Fragment != "" || u.ForceQuery {
		return errors.New("an origin has no path, query or fragment")
	}
	return nil
}

func checkHTTPURL(raw string) error {
	u, err := url.Parse(raw)
	if err != nil {
		return err
	}
	if u.Scheme != "http" && u.Scheme != "https" {
		return fmt.Errorf("%q is not an absolute http(s) URL", raw)
	}
	if u.Hostname() == "" {
		return fmt.Errorf("%q has no host", raw)
	}
	return nil
}
