// Package text holds the rules for text that tally stores: what text a
// caller may send to be stored, and how text tally writes itself (error
// messages from Stripe, PostgreSQL or the network) is cut to size.
//
// It imports nothing of tally's, so every package may use it without
// bending the arrows between capabilities: the rules are one function each,
// called from each place that stores text.
package text

import (
	"errors"
	"fmt"
	"strings"
	"unicode/utf8"
)

// Check reports whether s may be stored as text a caller sent: a reason,
// metadata, a name, an identifier, an idempotency key. It refuses
//
//   - bytes that are not UTF-8, and the NUL character, which PostgreSQL's
//     text type cannot hold;
//   - the embedding, override and isolate controls of Unicode's
//     bidirectional algorithm (U+202A-U+202E, U+2066-U+2069). They make
//     text display in another order than it is stored ("Trojan Source"),
//     so an operator would read a reason or an identifier as something
//     else than what it is.
//
// The marks U+200E, U+200F and U+061C (left-to-right, right-to-left and
// Arabic letter mark) are allowed: they are invisible letters without a
// scope, they cannot reorder the text around them, and right-to-left
// writing needs them.
//
// The error reads after a field name: "reason " + err.Error().
func Check(s string) error {
	if !utf8.ValidString(s) {
		return errors.New("is not valid UTF-8 text")
	}
	// Every refused character but NUL is encoded with a leading 0xE2 byte;
	// most text has neither, and this runs on every consume.
	if strings.IndexByte(s, 0) < 0 && strings.IndexByte(s, 0xE2) < 0 {
		return nil
	}
	n := 0
	for _, r := range s {
		n++
		switch {
		case r == 0:
			return fmt.Errorf("contains a NUL character (at character %d)", n)
		case isBidiControl(r):
			return fmt.Errorf("contains U+%04X, a bidirectional control character, at character %d; such characters make text display in another order than it is stored", r, n)
		}
	}
	return nil
}

// isBidiControl: the embeddings and overrides (LRE, RLE, PDF, LRO, RLO) and
// the isolates (LRI, RLI, FSI, PDI).
func isBidiControl(r rune) bool {
	return (r >= 0x202A && r <= 0x202E) || (r >= 0x2066 && r <= 0x2069)
}

// ellipsis marks text that Truncate cut.
const ellipsis = "…"

// Truncate returns s cut to at most max bytes, on a character boundary,
// ending in "…" when it was cut. It is meant for text tally stores that it
// did not write itself (errors quoting a remote answer): the result is
// always valid UTF-8 without NUL characters, which PostgreSQL's text type
// refuses, so the write that records an outcome cannot fail on its text.
// Bytes that are not UTF-8 and NUL become U+FFFD. A max below the length of
// the ellipsis cuts without one.
func Truncate(s string, max int) string {
	if max <= 0 {
		return ""
	}
	if !utf8.ValidString(s) {
		s = strings.ToValidUTF8(s, "\uFFFD")
	}
	if strings.IndexByte(s, 0) >= 0 {
		s = strings.ReplaceAll(s, "\x00", "\uFFFD")
	}
	if len(s) <= max {
		return s
	}
	mark := ellipsis
	if max < len(mark) {
		mark = ""
	}
	cut := max - len(mark)
	// Back up to the first byte of the character that straddles the cut.
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return s[:cut] + mark
}
