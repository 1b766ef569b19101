package httpapi

import (
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"strconv"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"

	"github.com/tallybilling/tally/internal/config"
	"github.com/tallybilling/tally/internal/errs"
)

var authNow = time.Date(2026, 11, 23, 12, 0, 0, 0, time.UTC)

func testAuthenticator(t testing.TB, hs []byte, rs *rsa.PublicKey, iss, aud string) *authenticator {
	t.Helper()
	return &authenticator{
		keys: []config.APIKey{
			{Scope: config.ScopeService, Hash: sha256.Sum256([]byte("svc-key"))},
			{Scope: config.ScopeAdmin, Hash: sha256.Sum256([]byte("adm-key"))},
		},
		hs256: hs, rs256: rs, issuer: iss, audience: aud,
		now: func() time.Time { return authNow },
	}
}

func sign(t testing.TB, method jwt.SigningMethod, key any, claims jwt.RegisteredClaims) string {
	t.Helper()
	tok, err := jwt.NewWithClaims(method, claims).SignedString(key)
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

func TestAuthenticate(t *testing.T) {
	t.Parallel()
	priv, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	other, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	secret := []byte("0123456789abcdef0123456789abcdef")
	valid := jwt.RegisteredClaims{Subject: "cust-1", Issuer: "https://auth.example.com", Audience: jwt.ClaimStrings{"tally"},
		ExpiresAt: jwt.NewNumericDate(authNow.Add(time.Hour))}
	with := func(f func(c *jwt.RegisteredClaims)) jwt.RegisteredClaims { c := valid; f(&c); return c }

	both := testAuthenticator(t, secret, &priv.PublicKey, "https://auth.example.com", "tally")
	rsOnly := testAuthenticator(t, nil, &priv.PublicKey, "", "")
	cases := []struct {
		name     string
		a        *authenticator
		header   string
		customer string
		scope    config.Scope
	}{
		{"service key", both, "Bearer svc-key", "", config.ScopeService},
		{"admin key", both, "Bearer adm-key", "", config.ScopeAdmin},
		{"scheme is case-insensitive", both, "bearer svc-key", "", config.ScopeService},
		{"unknown key", both, "Bearer nope", "", ""},
		{"no scheme", both, "svc-key", "", ""},
		{"basic auth", both, "Basic c3ZjLWtleQ==", "", ""},
		{"empty", both, "", "", ""},
		{"HS256 token", both, "Bearer " + sign(t, jwt.SigningMethodHS256, secret, valid), "cust-1", ""},
		{"RS256 token", both, "Bearer " + sign(t, jwt.SigningMethodRS256, priv, valid), "cust-1", ""},
		{"RS256 signed by another key", both, "Bearer " + sign(t, jwt.SigningMethodRS256, other, valid), "", ""},
		{"HS256 when only RS256 is configured", rsOnly, "Bearer " + sign(t, jwt.SigningMethodHS256, secret, valid), "", ""},
		{"alg none", both, "Bearer " + sign(t, jwt.SigningMethodNone, jwt.UnsafeAllowNoneSignatureType, valid), "", ""},
		{"expired", both, "Bearer " + sign(t, jwt.SigningMethodHS256, secret, with(func(c *jwt.RegisteredClaims) {
			c.ExpiresAt = jwt.NewNumericDate(authNow.Add(-time.Minute))
		})), "", ""},
		{"no exp", both, "Bearer " + sign(t, jwt.SigningMethodHS256, secret, with(func(c *jwt.RegisteredClaims) { c.ExpiresAt = nil })), "", ""},
		{"not valid yet", both, "Bearer " + sign(t, jwt.SigningMethodHS256, secret, with(func(c *jwt.RegisteredClaims) {
			c.NotBefore = jwt.NewNumericDate(authNow.Add(time.Minute))
		})), "", ""},
		{"wrong issuer", both, "Bearer " + sign(t, jwt.SigningMethodHS256, secret, with(func(c *jwt.RegisteredClaims) { c.Issuer = "https://evil" })), "", ""},
		{"wrong audience", both, "Bearer " + sign(t, jwt.SigningMethodHS256, secret, with(func(c *jwt.RegisteredClaims) { c.Audience = jwt.ClaimStrings{"other"} })), "", ""},
		{"sub not a customer id", both, "Bearer " + sign(t, jwt.SigningMethodHS256, secret, with(func(c *jwt.RegisteredClaims) { c.Subject = "a b/c" })), "", ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			p, err := tc.a.authenticate(tc.header)
			if tc.customer == "" && tc.scope == "" {
				if !errs.Is(err, errs.Unauthorized) {
					t.Fatalf("authenticate = %+v, %v; want unauthorized", p, err)
				}
				return
			}
			if err != nil || p.customerID != tc.customer || p.scope != tc.scope {
				t.Fatalf("authenticate = %+v, %v; want customer %q scope %q", p, err, tc.customer, tc.scope)
			}
		})
	}
}

// RFC 7519 makes exp, nbf and iat NumericDates: JSON numbers. A date sent
// as a string is a malformed token, refused like any other, whatever
// value it spells.
func TestAuthenticateRefusesDatesAsStrings(t *testing.T) {
	t.Parallel()
	secret := []byte("0123456789abcdef0123456789abcdef")
	a := testAuthenticator(t, secret, nil, "", "")
	later := authNow.Add(time.Hour).Unix()
	for name, claims := range map[string]jwt.MapClaims{
		"exp as a number":          {"sub": "cust-1", "exp": later},
		"exp as a string":          {"sub": "cust-1", "exp": strconv.FormatInt(later, 10)},
		"exp as a date string":     {"sub": "cust-1", "exp": authNow.Add(time.Hour).Format(time.RFC3339)},
		"nbf as a string":          {"sub": "cust-1", "exp": later, "nbf": strconv.FormatInt(authNow.Unix(), 10)},
		"iat as a string":          {"sub": "cust-1", "exp": later, "iat": strconv.FormatInt(authNow.Unix(), 10)},
		"sub as a number":          {"sub": 42, "exp": later},
		"exp as a fractional date": {"sub": "cust-1", "exp": float64(later) + 0.5},
	} {
		t.Run(name, func(t *testing.T) {
			tok, err := jwt.NewWithClaims(jwt.SigningMethodHS256, claims).SignedString(secret)
			if err != nil {
				t.Fatal(err)
			}
			p, err := a.authenticate("Bearer " + tok)
			ok := name == "exp as a number" || name == "exp as a fractional date"
			if ok && (err != nil || p.customerID != "cust-1") {
				t.Fatalf("authenticate = %+v, %v; want customer cust-1", p, err)
			}
			if !ok && !errs.Is(err, errs.Unauthorized) {
				t.Fatalf("authenticate = %+v, %v; want unauthorized", p, err)
			}
		})
	}
}

// Whatever arrives in the Authorization header, authentication answers a
// principal only for a configured key or a valid token, and never panics.
func FuzzAuthenticate(f *testing.F) {
	secret := []byte("0123456789abcdef0123456789abcdef")
	a := testAuthenticator(f, secret, nil, "", "")
	good := sign(f, jwt.SigningMethodHS256, secret, jwt.RegisteredClaims{Subject: "c", ExpiresAt: jwt.NewNumericDate(authNow.Add(time.Hour))})
	for _, s := range []string{"", "Bearer ", "Bearer svc-key", "Bearer " + good, "Bearer a.b.c", "Bearer ..", "bearer  x", "Bearer " + good + "x"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, header string) {
		p, err := a.authenticate(header)
		if err != nil {
			if !errs.Is(err, errs.Unauthorized) {
				t.Fatalf("error %v is not unauthorized", err)
			}
			return
		}
		if p.scope == "" && p.customerID == "" {
			t.Fatalf("accepted %q without a scope or a customer", header)
		}
	})
}
