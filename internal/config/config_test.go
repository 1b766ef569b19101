package config

import (
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/tallybilling/tally/internal/catalog"
)

// testCatalog is a small valid catalog file; internal/catalog tests the
// format itself.
const testCatalog = `
redirect_url_prefixes: ["https://app.example.com/"]
credit_packs:
  - {id: starter, name: Starter pack, amount: 1000, currency: usd, credits: 1000}
plans:
  - {id: api, name: API usage, stripe_price: price_123, meter: api_calls, stripe_meter_id: mtr_123}
`

func envOf(m map[string]string) func(string) string {
	return func(k string) string { return m[k] }
}

func TestLoadDefaults(t *testing.T) {
	t.Parallel()
	c, err := Load(envOf(nil))
	if err != nil {
		t.Fatalf("Load of an empty environment: %v", err)
	}
	want := Config{
		DatabaseURL:     "postgres://postgres@127.0.0.1:5432/tally?sslmode=disable",
		DBMaxOpenConns:  20,
		HTTPAddr:        ":8080",
		MaxBodyBytes:    1048576,
		ShutdownTimeout: 30 * time.Second,
		RequestTimeout:  50 * time.Second,
		LogLevel:        slog.LevelInfo,
		Stripe: StripeConfig{
			WebhookMaxBodyBytes: 524288,
			EventMaxAttempts:    8,
			EventRetryInterval:  10 * time.Second,
			PendingCheckAfter:   15 * time.Minute,
			SyncInterval:        5 * time.Minute,
			VerifyInterval:      15 * time.Minute,
			EventLease:          time.Minute,
		},
		Credits:  CreditsConfig{ExpiringNotice: 168 * time.Hour, SweepInterval: time.Minute, RevokeFrom: "balance", ForecastWarnDays: 7, ForecastInterval: 10 * time.Minute},
		Checkout: CheckoutConfig{ExpiresAfter: time.Hour, ConfirmOn: "payment_intent", RateLimit: 10},
		Metering: MeteringConfig{Transport: "v1", RateLimit: 20, BackoffMax: 10 * time.Minute, BatchSize: 100, PollInterval: time.Second, ReconcileInterval: time.Hour,
			BackoffBase: 2 * time.Second, SendTimeout: 20 * time.Second},
		Retention: RetentionConfig{StripeEvents: 2160 * time.Hour, UsageEvents: 2160 * time.Hour, Events: 2160 * time.Hour,
			IdempotencyKeys: 48 * time.Hour, Interval: time.Hour, BatchSize: 1000},
	}
	if !reflect.DeepEqual(c, want) {
		t.Fatalf("defaults:\n got %+v\nwant %+v", c, want)
	}
	if c.AutoMigrate || c.MetricsAddr != "" || c.Stripe.Livemode() || len(c.APIKeys) != 0 || c.JWT.RS256PublicKey != nil {
		t.Fatalf("unexpected non-zero default: %+v", c)
	}
}

func writeRSAPublicKey(t *testing.T, dir string) (*rsa.PrivateKey, string) {
	t.Helper()
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.MarshalPKIXPublicKey(&key.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "jwt.pub.pem")
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	return key, path
}

func TestLoadEveryVariable(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	rsaKey, rsaPath := writeRSAPublicKey(t, dir)
	catPath := filepath.Join(dir, "catalog.yaml")
	if err := os.WriteFile(catPath, []byte(testCatalog), 0o600); err != nil {
		t.Fatal(err)
	}
	serviceHash := sha256.Sum256([]byte("svc-key"))
	adminHash := sha256.Sum256([]byte("admin-key"))
	hsSecret := strings.Repeat("s", 40)

	env := map[string]string{
		"TALLY_DATABASE_URL":                "postgres://u:p@db.internal:5433/billing?sslmode=require",
		"TALLY_HTTP_ADDR":                   "127.0.0.1:9000",
		"TALLY_METRICS_ADDR":                ":9100",
		"TALLY_AUTO_MIGRATE":                "true",
		"TALLY_CATALOG_FILE":                catPath,
		"TALLY_API_KEYS":                    "service:" + hex.EncodeToString(serviceHash[:]) + " , admin:" + strings.ToUpper(hex.EncodeToString(adminHash[:])),
		"TALLY_JWT_HS256_SECRET":            hsSecret,
		"TALLY_JWT_RS256_PUBLIC_KEY_FILE":   rsaPath,
		"TALLY_JWT_ISSUER":                  "https://auth.example.com/",
		"TALLY_JWT_AUDIENCE":                "tally",
		"TALLY_CORS_ORIGINS":                "https://app.example.com, http://localhost:3000",
		"TALLY_TRUSTED_PROXIES":             "10.0.0.0/8, 192.168.1.7, fd00::/8",
		"TALLY_STRIPE_SECRET_KEY":           "sk_live_abc",
		"TALLY_STRIPE_API_URL":              "http://127.0.0.1:12111",
		"TALLY_STRIPE_METER_EVENTS_URL":     "http://127.0.0.1:12112",
		"TALLY_STRIPE_WEBHOOK_SECRETS":      "whsec_one,whsec_two",
		"TALLY_CONFIRM_ON":                  "checkout_session",
		"TALLY_LOG_LEVEL":                   "debug",
		"TALLY_MAX_BODY_BYTES":              "2048",
		"TALLY_WEBHOOK_MAX_BODY_BYTES":      "1024",
		"TALLY_SHUTDOWN_TIMEOUT":            "45s",
		"TALLY_REQUEST_TIMEOUT":             "20s",
		"TALLY_DB_MAX_OPEN_CONNS":           "7",
		"TALLY_LOW_BALANCE_THRESHOLD":       "50",
		"TALLY_CREDITS_EXPIRING_NOTICE":     "72h",
		"TALLY_CREDITS_SWEEP_INTERVAL":      "30s",
		"TALLY_REVOKE_FROM":                 "purchase_grant",
		"TALLY_CHECKOUT_EXPIRES_AFTER":      "2h",
		"TALLY_CHECKOUT_INVOICE_CREATION":   "true",
		"TALLY_CHECKOUT_RATE_LIMIT":         "3",
		"TALLY_STRIPE_EVENT_MAX_ATTEMPTS":   "3",
		"TALLY_STRIPE_EVENT_RETRY_INTERVAL": "5s",
		"TALLY_PENDING_CHECK_AFTER":         "30m",
		"TALLY_STRIPE_SYNC_INTERVAL":        "0",
		"TALLY_VERIFY_INTERVAL":             "1h",
		"TALLY_STRIPE_EVENT_LEASE":          "2s",
		"TALLY_METER_BACKOFF_BASE":          "50ms",
		"TALLY_METER_SEND_TIMEOUT":          "3s",
		"TALLY_METER_TRANSPORT":             "v2",
		"TALLY_METER_RATE_LIMIT":            "12.5",
		"TALLY_METER_BACKOFF_MAX":           "90s",
		"TALLY_RETENTION_STRIPE_EVENTS":     "900h",
		"TALLY_RETENTION_USAGE_EVENTS":      "9000h",
		"TALLY_RETENTION_EVENTS":            "168h",
		"TALLY_RETENTION_IDEMPOTENCY_KEYS":  "24h",
		"TALLY_RETENTION_INTERVAL":          "5m",
		"TALLY_RETENTION_BATCH_SIZE":        "250",
		"TALLY_METER_BATCH_SIZE":            "1000",
		"TALLY_METER_POLL_INTERVAL":         "250ms",
		"TALLY_EVENTS_WEBHOOK_URL":          "https://app.example.com/hooks/tally",
		"TALLY_EVENTS_WEBHOOK_SECRET":       "hook-secret",
	}
	c, err := Load(envOf(env))
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	wantCatalog, err := catalog.Parse([]byte(testCatalog))
	if err != nil {
		t.Fatal(err)
	}
	checks := []struct {
		name      string
		got, want any
	}{
		{"DatabaseURL", c.DatabaseURL, env["TALLY_DATABASE_URL"]},
		{"HTTPAddr", c.HTTPAddr, "127.0.0.1:9000"},
		{"MetricsAddr", c.MetricsAddr, ":9100"},
		{"AutoMigrate", c.AutoMigrate, true},
		{"CatalogFile", c.CatalogFile, catPath},
		{"Catalog", c.Catalog, wantCatalog},
		{"APIKeys", c.APIKeys, []APIKey{{ScopeService, serviceHash}, {ScopeAdmin, adminHash}}},
		{"JWT.HS256Secret", c.JWT.HS256Secret, []byte(hsSecret)},
		{"JWT.RS256PublicKey", c.JWT.RS256PublicKey.Equal(&rsaKey.PublicKey), true},
		{"JWT.Issuer", c.JWT.Issuer, "https://auth.example.com/"},
		{"JWT.Audience", c.JWT.Audience, "tally"},
		{"CORSOrigins", c.CORSOrigins, []string{"https://app.example.com", "http://localhost:3000"}},
		{"TrustedProxies", c.TrustedProxies, []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8"), netip.MustParsePrefix("192.168.1.7/32"), netip.MustParsePrefix("fd00::/8")}},
		{"Stripe.SecretKey", c.Stripe.SecretKey, "sk_live_abc"},
		{"Stripe.Livemode", c.Stripe.Livemode(), true},
		{"Stripe.APIURL", c.Stripe.APIURL, "http://127.0.0.1:12111"},
		{"Stripe.MeterEventsURL", c.Stripe.MeterEventsURL, "http://127.0.0.1:12112"},
		{"Stripe.WebhookSecrets", c.Stripe.WebhookSecrets, []string{"whsec_one", "whsec_two"}},
		{"Checkout.ConfirmOn", c.Checkout.ConfirmOn, "checkout_session"},
		{"LogLevel", c.LogLevel, slog.LevelDebug},
		{"MaxBodyBytes", c.MaxBodyBytes, int64(2048)},
		{"Stripe.WebhookMaxBodyBytes", c.Stripe.WebhookMaxBodyBytes, int64(1024)},
		{"ShutdownTimeout", c.ShutdownTimeout, 45 * time.Second},
		{"RequestTimeout", c.RequestTimeout, 20 * time.Second},
		{"DBMaxOpenConns", c.DBMaxOpenConns, 7},
		{"Credits.DefaultLowBalanceThreshold", c.Credits.DefaultLowBalanceThreshold, int64(50)},
		{"Credits.ExpiringNotice", c.Credits.ExpiringNotice, 72 * time.Hour},
		{"Credits.SweepInterval", c.Credits.SweepInterval, 30 * time.Second},
		{"Credits.RevokeFrom", c.Credits.RevokeFrom, "purchase_grant"},
		{"Checkout.ExpiresAfter", c.Checkout.ExpiresAfter, 2 * time.Hour},
		{"Checkout.InvoiceCreation", c.Checkout.InvoiceCreation, true},
		{"Checkout.RateLimit", c.Checkout.RateLimit, 3},
		{"Stripe.EventMaxAttempts", c.Stripe.EventMaxAttempts, 3},
		{"Stripe.EventRetryInterval", c.Stripe.EventRetryInterval, 5 * time.Second},
		{"Stripe.PendingCheckAfter", c.Stripe.PendingCheckAfter, 30 * time.Minute},
		{"Stripe.SyncInterval", c.Stripe.SyncInterval, time.Duration(0)},
		{"Stripe.VerifyInterval", c.Stripe.VerifyInterval, time.Hour},
		{"Stripe.EventLease", c.Stripe.EventLease, 2 * time.Second},
		{"Metering.BackoffBase", c.Metering.BackoffBase, 50 * time.Millisecond},
		{"Metering.SendTimeout", c.Metering.SendTimeout, 3 * time.Second},
		{"Metering.Transport", c.Metering.Transport, "v2"},
		{"Metering.RateLimit", c.Metering.RateLimit, 12.5},
		{"Metering.BackoffMax", c.Metering.BackoffMax, 90 * time.Second},
		{"Retention", c.Retention, RetentionConfig{StripeEvents: 900 * time.Hour, UsageEvents: 9000 * time.Hour, Events: 168 * time.Hour,
			IdempotencyKeys: 24 * time.Hour, Interval: 5 * time.Minute, BatchSize: 250}},
		{"Metering.BatchSize", c.Metering.BatchSize, 1000},
		{"Metering.PollInterval", c.Metering.PollInterval, 250 * time.Millisecond},
		{"EventsWebhook.URL", c.EventsWebhook.URL, "https://app.example.com/hooks/tally"},
		{"EventsWebhook.Secret", c.EventsWebhook.Secret, "hook-secret"},
	}
	for _, ch := range checks {
		if !reflect.DeepEqual(ch.got, ch.want) {
			t.Errorf("%s = %#v, want %#v", ch.name, ch.got, ch.want)
		}
	}
}

func TestLoadLivemodeFollowsKeyPrefix(t *testing.T) {
	t.Parallel()
	for key, live := range map[string]bool{
		"sk_test_123": false, "rk_test_123": false, "sk_live_123": true, "rk_live_123": true, "": false,
	} {
		c, err := Load(envOf(map[string]string{"TALLY_STRIPE_SECRET_KEY": key}))
		if err != nil {
			t.Fatalf("key %q: %v", key, err)
		}
		if c.Stripe.Livemode() != live {
			t.Errorf("key %q: Livemode() = %v, want %v", key, c.Stripe.Livemode(), live)
		}
		// The mode follows the key however the configuration was built.
		if (StripeConfig{SecretKey: key}).Livemode() != live {
			t.Errorf("hand-built with key %q: Livemode() = %v, want %v", key, !live, live)
		}
	}
}

// Each case sets one bad variable; the error must name it.
func TestLoadRejectsEachBadValue(t *testing.T) {
	t.Parallel()
	okHash := strings.Repeat("ab", 32)
	cases := []struct {
		name, value string
	}{
		{"TALLY_DATABASE_URL", "postgres://host:notaport/db"},
		{"TALLY_AUTO_MIGRATE", "yes please"},
		{"TALLY_CATALOG_FILE", "/does/not/exist.yaml"},
		{"TALLY_API_KEYS", "service"},
		{"TALLY_API_KEYS", "owner:" + okHash},
		{"TALLY_API_KEYS", "service:abc"},
		{"TALLY_API_KEYS", "service:" + strings.Repeat("zz", 32)},
		{"TALLY_API_KEYS", "service:" + okHash + ",admin:" + okHash},
		{"TALLY_JWT_HS256_SECRET", "short"},
		{"TALLY_JWT_RS256_PUBLIC_KEY_FILE", "/does/not/exist.pem"},
		{"TALLY_CORS_ORIGINS", "app.example.com"},
		{"TALLY_TRUSTED_PROXIES", "10.0.0.0/33"},
		{"TALLY_TRUSTED_PROXIES", "10.0.0.0/8,proxy.internal"},
		{"TALLY_CORS_ORIGINS", "https://app.example.com/path"},
		{"TALLY_STRIPE_SECRET_KEY", "pk_test_123"},
		{"TALLY_STRIPE_API_URL", "localhost:12111"},
		{"TALLY_STRIPE_WEBHOOK_SECRETS", "whsec_ok,notasecret"},
		{"TALLY_CONFIRM_ON", "checkout"},
		{"TALLY_REVOKE_FROM", "everything"},
		{"TALLY_LOG_LEVEL", "loud"},
		{"TALLY_MAX_BODY_BYTES", "0"},
		{"TALLY_MAX_BODY_BYTES", "1MB"},
		{"TALLY_WEBHOOK_MAX_BODY_BYTES", "-1"},
		{"TALLY_SHUTDOWN_TIMEOUT", "30"},
		{"TALLY_REQUEST_TIMEOUT", "0s"},
		{"TALLY_REQUEST_TIMEOUT", "500ms"},
		{"TALLY_DB_MAX_OPEN_CONNS", "0"},
		{"TALLY_DB_MAX_OPEN_CONNS", "3"},
		{"TALLY_LOW_BALANCE_THRESHOLD", "-5"},
		{"TALLY_CREDITS_SWEEP_INTERVAL", "0s"},
		{"TALLY_CHECKOUT_EXPIRES_AFTER", "29m"},
		{"TALLY_CHECKOUT_EXPIRES_AFTER", "25h"},
		{"TALLY_CHECKOUT_RATE_LIMIT", "-1"},
		{"TALLY_CHECKOUT_RATE_LIMIT", "ten"},
		{"TALLY_STRIPE_EVENT_MAX_ATTEMPTS", "0"},
		{"TALLY_METER_TRANSPORT", "v3"},
		{"TALLY_METER_RATE_LIMIT", "0"},
		{"TALLY_METER_RATE_LIMIT", "NaN"},
		{"TALLY_METER_BACKOFF_MAX", "0s"},
		{"TALLY_METER_BACKOFF_MAX", "25h"},
		{"TALLY_METER_BACKOFF_MAX", "10"},
		{"TALLY_RETENTION_STRIPE_EVENTS", "839h"}, // Stripe redelivers and lists events for 35 days
		{"TALLY_RETENTION_USAGE_EVENTS", "720h"},
		{"TALLY_RETENTION_EVENTS", "24h"},
		{"TALLY_RETENTION_IDEMPOTENCY_KEYS", "23h"},
		{"TALLY_RETENTION_STRIPE_EVENTS", "90d"},
		{"TALLY_RETENTION_INTERVAL", "0s"},
		{"TALLY_RETENTION_BATCH_SIZE", "0"},
		{"TALLY_RETENTION_BATCH_SIZE", "100000"},
		{"TALLY_METER_BATCH_SIZE", "1001"},
		{"TALLY_METER_BATCH_SIZE", "0"},
		{"TALLY_METER_POLL_INTERVAL", "-1s"},
		{"TALLY_HTTP_ADDR", "8080"},
		{"TALLY_METRICS_ADDR", ":8080"},
		{"TALLY_EVENTS_WEBHOOK_URL", "https://app.example.com/hook"}, // without a secret
	}
	for _, tc := range cases {
		t.Run(tc.name+"="+tc.value, func(t *testing.T) {
			_, err := Load(envOf(map[string]string{tc.name: tc.value}))
			if err == nil {
				t.Fatalf("Load accepted %s=%q", tc.name, tc.value)
			}
			want := tc.name
			if tc.name == "TALLY_EVENTS_WEBHOOK_URL" {
				want = "TALLY_EVENTS_WEBHOOK_SECRET"
			}
			if !strings.Contains(err.Error(), want) {
				t.Fatalf("error does not name %s: %v", want, err)
			}
		})
	}
}

func TestLoadReportsEveryProblemAtOnce(t *testing.T) {
	t.Parallel()
	env := map[string]string{
		"TALLY_METER_BATCH_SIZE":       "5000",      // validation
		"TALLY_METER_RATE_LIMIT":       "fast",      // parse
		"TALLY_CONFIRM_ON":             "whenever",  // validation
		"TALLY_CHECKOUT_EXPIRES_AFTER": "10m",       // validation
		"TALLY_SHUTDOWN_TIMEOUT":       "a while",   // parse
		"TALLY_API_KEYS":               "root:abcd", // parse
		"TALLY_HTTP_ADDR":              ":9999",     // fine
	}
	_, err := Load(envOf(env))
	if err == nil {
		t.Fatal("Load accepted a broken environment")
	}
	msg := err.Error()
	for name := range env {
		if name == "TALLY_HTTP_ADDR" {
			if strings.Contains(msg, name) {
				t.Errorf("good variable %s reported: %v", name, err)
			}
			continue
		}
		if !strings.Contains(msg, name) {
			t.Errorf("problem with %s not reported in: %v", name, err)
		}
	}
	// One line per problem, each reported once (a bad value that failed to
	// parse must not be validated again as its default).
	if n := len(strings.Split(msg, "\n")); n != 6 {
		t.Errorf("got %d problems, want 6:\n%v", n, msg)
	}
}

func TestLoadRejectsBadCatalogFileWithItsProblems(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "catalog.yaml")
	bad := "credit_packs:\n  - id: Starter\n    name: x\n    amount: 0\n    currency: usd\n    credits: 1\n"
	if err := os.WriteFile(path, []byte(bad), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := Load(envOf(map[string]string{"TALLY_CATALOG_FILE": path}))
	if err == nil {
		t.Fatal("Load accepted a bad catalog")
	}
	for _, want := range []string{"TALLY_CATALOG_FILE", "credit_packs[0].id", "credit_packs[0].amount"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error does not mention %s: %v", want, err)
		}
	}
}

func TestParseRSAPublicKeyFormats(t *testing.T) {
	t.Parallel()
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	pkix, _ := x509.MarshalPKIXPublicKey(&key.PublicKey)
	for name, block := range map[string]*pem.Block{
		"PKIX":  {Type: "PUBLIC KEY", Bytes: pkix},
		"PKCS1": {Type: "RSA PUBLIC KEY", Bytes: x509.MarshalPKCS1PublicKey(&key.PublicKey)},
	} {
		got, err := ParseRSAPublicKey(pem.EncodeToMemory(block))
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if !got.Equal(&key.PublicKey) {
			t.Fatalf("%s: wrong key", name)
		}
	}
	priv := pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(key)})
	if _, err := ParseRSAPublicKey(priv); err == nil {
		t.Fatal("a private key file was accepted as the public key")
	}
	if _, err := ParseRSAPublicKey([]byte("not pem")); err == nil {
		t.Fatal("garbage accepted")
	}
}

func TestValidateOnHandBuiltConfig(t *testing.T) {
	t.Parallel()
	c := Default()
	if err := c.Validate(); err != nil {
		t.Fatalf("Default() does not validate: %v", err)
	}
	c.APIKeys = []APIKey{{Scope: "root"}}
	c.Metering.BatchSize = 0
	err := c.Validate()
	if err == nil || !strings.Contains(err.Error(), "TALLY_API_KEYS") || !strings.Contains(err.Error(), "TALLY_METER_BATCH_SIZE") {
		t.Fatalf("Validate = %v, want both problems", err)
	}
}

func TestHashAPIKey(t *testing.T) {
	t.Parallel()
	if HashAPIKey("k") != sha256.Sum256([]byte("k")) {
		t.Fatal("HashAPIKey is not SHA-256 of the key")
	}
}

// Usage delivery retries by time now; a deployment still setting the old
// attempt limit starts, and is told the setting is ignored.
func TestLoadNamesObsoleteSettings(t *testing.T) {
	t.Parallel()
	c, err := Load(envOf(map[string]string{"TALLY_METER_MAX_ATTEMPTS": "10"}))
	if err != nil {
		t.Fatalf("Load with TALLY_METER_MAX_ATTEMPTS: %v", err)
	}
	if len(c.Obsolete) != 1 || !strings.Contains(c.Obsolete[0], "TALLY_METER_MAX_ATTEMPTS") || !strings.Contains(c.Obsolete[0], "TALLY_METER_BACKOFF_MAX") {
		t.Errorf("Obsolete = %q, want TALLY_METER_MAX_ATTEMPTS named with what replaced it", c.Obsolete)
	}
	if c, _ := Load(envOf(nil)); len(c.Obsolete) != 0 {
		t.Errorf("Obsolete of an empty environment = %q", c.Obsolete)
	}
}

// The sections constructors take are checked by the same rules as Load
// checks them: the defaults pass, and a zero section names every setting
// it leaves unset.
func TestSectionsValidateByTheRulesOfLoad(t *testing.T) {
	t.Parallel()
	d := Default()
	for name, err := range map[string]error{
		"Credits": d.Credits.Validate(), "Checkout": d.Checkout.Validate(), "Metering": d.Metering.Validate(),
	} {
		if err != nil {
			t.Errorf("Default().%s does not validate: %v", name, err)
		}
	}
	for name, tc := range map[string]struct {
		err  error
		want []string
	}{
		"Credits":  {CreditsConfig{}.Validate(), []string{"TALLY_CREDITS_SWEEP_INTERVAL", "TALLY_REVOKE_FROM", "TALLY_FORECAST_WARN_DAYS", "TALLY_FORECAST_CHECK_INTERVAL"}},
		"Checkout": {CheckoutConfig{}.Validate(), []string{"TALLY_CHECKOUT_EXPIRES_AFTER", "TALLY_CONFIRM_ON"}},
		"Metering": {MeteringConfig{}.Validate(), []string{"TALLY_METER_TRANSPORT", "TALLY_METER_RATE_LIMIT",
			"TALLY_METER_BACKOFF_MAX", "TALLY_METER_BATCH_SIZE", "TALLY_METER_POLL_INTERVAL", "TALLY_METER_BACKOFF_BASE", "TALLY_METER_SEND_TIMEOUT"}},
	} {
		if tc.err == nil {
			t.Errorf("a zero %sConfig validates", name)
			continue
		}
		msg := tc.err.Error()
		for _, want := range tc.want {
			if !strings.Contains(msg, want) {
				t.Errorf("a zero %sConfig: %q does not name %s", name, msg, want)
			}
		}
		if n := len(strings.Split(msg, "\n")); n != len(tc.want) {
			t.Errorf("a zero %sConfig: %d problems, want %d:\n%s", name, n, len(tc.want), msg)
		}
	}
}

func TestLoadSandbox(t *testing.T) {
	t.Parallel()
	serviceKey := "tally_dev_service_key"
	sum := sha256.Sum256([]byte(serviceKey))
	keys := "service:" + hex.EncodeToString(sum[:])

	// On its own it needs nothing else: its own test key and secret, and
	// the URL of the listener.
	c, err := Load(envOf(map[string]string{"TALLY_STRIPE_SANDBOX": "true", "TALLY_HTTP_ADDR": ":8080"}))
	if err != nil {
		t.Fatal(err)
	}
	if !c.Stripe.Sandbox.Enabled || c.Stripe.SecretKey != SandboxSecretKey || c.Stripe.Livemode() ||
		!reflect.DeepEqual(c.Stripe.WebhookSecrets, []string{SandboxWebhookSecret}) || c.Stripe.Sandbox.URL != "http://localhost:8080" {
		t.Fatalf("sandbox defaults: %+v", c.Stripe)
	}
	c, err = Load(envOf(map[string]string{"TALLY_STRIPE_SANDBOX": "true", "TALLY_HTTP_ADDR": "127.0.0.1:9000",
		"TALLY_STRIPE_SECRET_KEY": "sk_test_mine", "TALLY_STRIPE_WEBHOOK_SECRETS": "whsec_mine",
		"TALLY_API_KEYS": keys, "TALLY_STRIPE_SANDBOX_DEMO_KEY": serviceKey}))
	if err != nil {
		t.Fatal(err)
	}
	if c.Stripe.SecretKey != "sk_test_mine" || c.Stripe.WebhookSecrets[0] != "whsec_mine" || c.Stripe.Sandbox.URL != "http://127.0.0.1:9000" ||
		c.Stripe.Sandbox.DemoKey != serviceKey {
		t.Fatalf("sandbox with settings: %+v", c.Stripe)
	}

	// Without a fixed port the URL is left to the address tally binds.
	c, err = Load(envOf(map[string]string{"TALLY_STRIPE_SANDBOX": "true", "TALLY_HTTP_ADDR": "127.0.0.1:0"}))
	if err != nil || c.Stripe.Sandbox.URL != "" {
		t.Fatalf("sandbox on port 0: URL %q, %v; want it empty and no error", c.Stripe.Sandbox.URL, err)
	}

	for _, tc := range []struct {
		name string
		env  map[string]string
		want string
	}{
		{"a live secret key", map[string]string{"TALLY_STRIPE_SANDBOX": "true", "TALLY_STRIPE_SECRET_KEY": "sk_live_123"}, "TALLY_STRIPE_SANDBOX: refused with a live"},
		{"a live restricted key", map[string]string{"TALLY_STRIPE_SANDBOX": "true", "TALLY_STRIPE_SECRET_KEY": "rk_live_123"}, "TALLY_STRIPE_SANDBOX: refused with a live"},
		{"an API URL", map[string]string{"TALLY_STRIPE_SANDBOX": "true", "TALLY_STRIPE_API_URL": "http://127.0.0.1:12111"}, "refused together with TALLY_STRIPE_API_URL"},
		{"a bad URL", map[string]string{"TALLY_STRIPE_SANDBOX": "true", "TALLY_STRIPE_SANDBOX_URL": "localhost:8080"}, "TALLY_STRIPE_SANDBOX_URL"},
		{"a demo key not configured", map[string]string{"TALLY_STRIPE_SANDBOX": "true", "TALLY_STRIPE_SANDBOX_DEMO_KEY": "unknown"}, "TALLY_STRIPE_SANDBOX_DEMO_KEY: its SHA-256 is not a service key"},
		{"a URL without the sandbox", map[string]string{"TALLY_STRIPE_SANDBOX_URL": "http://localhost:8080"}, "TALLY_STRIPE_SANDBOX_URL: is set but"},
		{"not a boolean", map[string]string{"TALLY_STRIPE_SANDBOX": "maybe"}, "TALLY_STRIPE_SANDBOX"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Load(envOf(tc.env))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Load = %v, want an error naming %q", err, tc.want)
			}
		})
	}
}

// TALLY_CREDITS_EXPIRING_NOTICE takes one duration or a list: the longest
// is ExpiringNotice, every horizon (longest first, duplicates once) is
// ExpiringNotices; a bad entry names the variable.
func TestExpiringNoticeList(t *testing.T) {
	t.Parallel()
	env := map[string]string{"TALLY_DATABASE_URL": "postgres://x/y", "TALLY_CREDITS_EXPIRING_NOTICE": "24h, 720h,168h,24h"}
	c, err := Load(func(k string) string { return env[k] })
	if err != nil {
		t.Fatal(err)
	}
	if c.Credits.ExpiringNotice != 720*time.Hour || !reflect.DeepEqual(c.Credits.ExpiringNotices, []time.Duration{720 * time.Hour, 168 * time.Hour, 24 * time.Hour}) {
		t.Fatalf("notices %v, %v", c.Credits.ExpiringNotice, c.Credits.ExpiringNotices)
	}
	env["TALLY_CREDITS_EXPIRING_NOTICE"] = "72h"
	if c, err = Load(func(k string) string { return env[k] }); err != nil || c.Credits.ExpiringNotice != 72*time.Hour || c.Credits.ExpiringNotices != nil {
		t.Fatalf("one notice: %v %v %v", c.Credits.ExpiringNotice, c.Credits.ExpiringNotices, err)
	}
	env["TALLY_CREDITS_EXPIRING_NOTICE"] = "168h,soon"
	if _, err = Load(func(k string) string { return env[k] }); err == nil || !strings.Contains(err.Error(), "TALLY_CREDITS_EXPIRING_NOTICE") {
		t.Fatalf("a bad entry: %v", err)
	}
}
