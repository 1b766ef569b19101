package text_test

import (
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/tallybilling/tally/internal/text"
)

func TestTruncate(t *testing.T) {
	for _, c := range []struct {
		in   string
		max  int
		want string
	}{
		{"short", 10, "short"},
		{"exactly10!", 10, "exactly10!"},
		{"eleven byte", 11, "eleven byte"},
		{"twelve bytes", 11, "twelve b…"},
		{"ab€€€", 8, "ab€…"},           // 8 bytes: "ab€" (5) + "…" (3)
		{"ab€€€", 7, "ab…"},            // the second € would straddle the cut
		{"€€€€", 9, "€€…"},             //
		{"ab\xffcd", 10, "ab\uFFFDcd"}, // not UTF-8: replaced, not cut blindly
		{"a\x00b", 10, "a\uFFFDb"},     // NUL, which PostgreSQL text refuses
		{"abcdef", 2, "ab"},            // no room for the ellipsis
		{"€€", 2, ""},                  // no whole character fits
		{"abc", 0, ""},
	} {
		got := text.Truncate(c.in, c.max)
		if got != c.want {
			t.Errorf("Truncate(%q, %d) = %q, want %q", c.in, c.max, got, c.want)
		}
	}
}

// Whatever the input and limit, the result is storable and fits.
func FuzzTruncate(f *testing.F) {
	f.Add("ab€€€", 7)
	f.Add("\xe2\x82", 1)
	f.Add("a\x00b€", 4)
	f.Add(strings.Repeat("😀", 100), 301)
	f.Fuzz(func(t *testing.T, s string, max int) {
		if max > 1<<16 {
			max = 1 << 16
		}
		got := text.Truncate(s, max)
		if !utf8.ValidString(got) || strings.ContainsRune(got, 0) {
			t.Fatalf("Truncate(%q, %d) = %q: not storable", s, max, got)
		}
		if len(got) > max && max >= 0 {
			t.Fatalf("Truncate(%q, %d) = %q: %d bytes", s, max, got, len(got))
		}
		if utf8.ValidString(s) && !strings.ContainsRune(s, 0) && len(s) <= max && got != s {
			t.Fatalf("Truncate(%q, %d) = %q: changed text that fit", s, max, got)
		}
	})
}
