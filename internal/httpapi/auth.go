package httpapi

import (
	"context"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"errors"
	"strings"
	"time"

	"github.com/golang-jwt/jwt/v5"

	"github.com/tallybilling/tally/internal/config"
	"github.com/tallybilling/tally/internal/customers"
	"github.com/tallybilling/tally/internal/errs"
)

// principal is who is calling: an API key with a scope, or an end user whose
// token names its own customer id.
type principal struct {
	// scope is service or admin for API keys, empty for end users.
	scope config.Scope
	// customerID is the end user's own customer (the token's sub).
	customerID string
	// keyHash is the first hex characters of an API key's SHA-256: how
	// operator decisions name who made them (keys have no names).
	keyHash string
}

// name says who the caller is, for records of operator decisions.
func (p principal) name() string {
	switch {
	case p.isUser():
		return "user:" + p.customerID
	case p.keyHash != "":
		return string(p.scope) + " key " + p.keyHash
	}
	return "unknown"
}

func (p principal) isUser() bool  { return p.customerID != "" }
func (p principal) isAdmin() bool { return p.scope == config.ScopeAdmin }

func principalFrom(ctx context.Context) (principal, bool) {
	p, ok := ctx.Value(principalKey).(principal)
	return p, ok
}

// authorizeCustomer is the ownership rule: an end user may only touch its own
// customer (errs.Forbidden otherwise); API keys may touch any.
func authorizeCustomer(ctx context.Context, customerID string) error {
	p, ok := principalFrom(ctx)
	if !ok {
		return errs.E(errs.Unauthorized, "authentication required")
	}
	if p.isUser() && p.customerID != customerID {
		return errs.E(errs.Forbidden, "this token may only access its own customer")
	}
	return nil
}

// authenticator checks bearer tokens: three dot-separated parts make an
// end-user JWT, anything else an API key compared by SHA-256 hash.
type authenticator struct {
	keys     []config.APIKey
	hs256    []byte
	rs256    *rsa.PublicKey
	issuer   string
	audience string
	now      func() time.Time
}

func newAuthenticator(cfg config.Config, now func() time.Time) *authenticator {
	return &authenticator{
		keys:     cfg.APIKeys,
		hs256:    cfg.JWT.HS256Secret,
		rs256:    cfg.JWT.RS256PublicKey,
		issuer:   cfg.JWT.Issuer,
		audience: cfg.JWT.Audience,
		now:      now,
	}
}

var errUnauthenticated = errs.E(errs.Unauthorized, "missing or invalid bearer token")

// authenticate returns the principal for an Authorization header value.
func (a *authenticator) authenticate(header string) (principal, error) {
	scheme, token, ok := strings.Cut(header, " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") || token == "" {
		return principal{}, errs.E(errs.Unauthorized, "send Authorization: Bearer <token>")
	}
	token = strings.TrimSpace(token)
	if strings.Count(token, ".") == 2 {
		return a.user(token)
	}
	return a.apiKey(token)
}

func (a *authenticator) apiKey(token string) (principal, error) {
	sum := sha256.Sum256([]byte(token))
	var found *config.APIKey
	// Compare against every key so the time taken does not tell which matched.
	for i := range a.keys {
		if subtle.ConstantTimeCompare(sum[:], a.keys[i].Hash[:]) == 1 {
			found = &a.keys[i]
		}
	}
	if found == nil {
		return principal{}, errUnauthenticated
	}
	return principal{scope: found.Scope, keyHash: hex.EncodeToString(found.Hash[:6])}, nil
}

func (a *authenticator) user(token string) (principal, error) {
	var methods []string
	if len(a.hs256) > 0 {
		methods = append(methods, jwt.SigningMethodHS256.Alg())
	}
	if a.rs256 != nil {
		methods = append(methods, jwt.SigningMethodRS256.Alg())
	}
	if len(methods) == 0 {
		return principal{}, errs.E(errs.Unauthorized, "end-user tokens are not enabled")
	}
	opts := []jwt.ParserOption{
		jwt.WithValidMethods(methods),
		jwt.WithExpirationRequired(),
		jwt.WithTimeFunc(a.now),
		jwt.WithLeeway(5 * time.Second),
	}
	if a.issuer != "" {
		opts = append(opts, jwt.WithIssuer(a.issuer))
	}
	if a.audience != "" {
		opts = append(opts, jwt.WithAudience(a.audience))
	}
	// MapClaims, not RegisteredClaims: RegisteredClaims reads a NumericDate
	// from a JSON string too ("exp":"1900000000"), which RFC 7519 does not
	// allow; MapClaims refuses a date that is not a JSON number.
	claims := jwt.MapClaims{}
	_, err := jwt.ParseWithClaims(token, claims, func(t *jwt.Token) (any, error) {
		switch t.Method.Alg() {
		case jwt.SigningMethodHS256.Alg():
			return a.hs256, nil
		case jwt.SigningMethodRS256.Alg():
			return a.rs256, nil
		}
		return nil, jwt.ErrTokenUnverifiable
	}, opts...)
	if err == nil {
		// The validator reads iat only when asked to check it; a malformed
		// iat still makes a malformed token.
		_, err = claims.GetIssuedAt()
	}
	if err != nil {
		return principal{}, errs.Wrap(err, errs.Unauthorized, "invalid end-user token: %s", jwtReason(err))
	}
	sub, err := claims.GetSubject()
	if err != nil || customers.ValidateID(sub) != nil {
		return principal{}, errs.E(errs.Unauthorized, "the token's sub is not a valid customer id")
	}
	return principal{customerID: sub}, nil
}

func jwtReason(err error) string {
	switch {
	case errors.Is(err, jwt.ErrTokenExpired):
		return "expired"
	case errors.Is(err, jwt.ErrTokenNotValidYet):
		return "not valid yet"
	case errors.Is(err, jwt.ErrTokenInvalidIssuer):
		return "wrong issuer"
	case errors.Is(err, jwt.ErrTokenInvalidAudience):
		return "wrong audience"
	case errors.Is(err, jwt.ErrTokenRequiredClaimMissing):
		return "a required claim is missing"
	case errors.Is(err, jwt.ErrTokenSignatureInvalid), errors.Is(err, jwt.ErrTokenUnverifiable):
		return "bad signature"
	case errors.Is(err, jwt.ErrInvalidType):
		return "a claim has the wrong type (exp, nbf and iat must be numbers of seconds)"
	}
	return "malformed"
}
