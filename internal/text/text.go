// Package text holds the rules for text that tally stores: what text a
// caller may send to be stored, and how text tally writes itself (error
// messages from Stripe, PostgreSQL or the network) is cut to size.
//
// It imports nothing of tally's, so every package may use it without
// bending the arrows between capabilities: the rules are one function each,
// called from each place that stores text.
package text

import (
	"strings"
	"unicode/utf8"
)

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
