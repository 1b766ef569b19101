package main

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"strconv"
	"time"
)

// stripeSignature is the Stripe-Signature header Stripe sends with payload:
// `t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<payload>">`, keyed with the
// whole whsec_ secret as bytes, as Stripe and stripe-go do.
func stripeSignature(payload []byte, secret string, at time.Time) string {
	ts := strconv.FormatInt(at.Unix(), 10)
	mac := hmac.New(sha256.New, []byte(secret))
	mac.Write([]byte(ts))
	mac.Write([]byte("."))
	mac.Write(payload)
	return "t=" + ts + ",v1=" + hex.EncodeToString(mac.Sum(nil))
}
