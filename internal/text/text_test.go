package text_test

import (
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/tallybilling/tally/internal/text"
)

func TestTruncate(t *testing.T) {
	t.Parallel()
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

func TestCheck(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		in   string
		want string // "" when accepted
	}{
		{"refund for order 42", ""},
		{"", ""},
		{"naïve – 日本語 – emoji 😀", ""},
		{"שלום 2\u200F", ""}, // right-to-left mark
		{"abc\u200Edef", ""}, // left-to-right mark
		{"\u061Cعربي", ""},   // Arabic letter mark
		{"tab\tand\nnewline", ""},
		{"bad\xffutf8", "UTF-8"},
		{"nul\x00", "NUL character (at character 4)"},
		{"invoice\u202Efdp.exe", "U+202E, a bidirectional control character, at character 8"},
	} {
		err := text.Check(c.in)
		if c.want == "" && err != nil {
			t.Errorf("Check(%q) = %v, want accepted", c.in, err)
		}
		if c.want != "" && (err == nil || !strings.Contains(err.Error(), c.want)) {
			t.Errorf("Check(%q) = %v, want an error mentioning %q", c.in, err, c.want)
		}
	}
	for r := rune(0x2000); r <= 0x206F; r++ {
		bidi := (r >= 0x202A && r <= 0x202E) || (r >= 0x2066 && r <= 0x2069)
		if err := text.Check("x" + string(r)); (err != nil) != bidi {
			t.Errorf("Check(U+%04X) = %v, want refused = %v", r, err, bidi)
		}
	}
}

// Whatever Check accepts is storable and holds no bidirectional control.
func FuzzCheck(f *testing.F) {
	for _, s := range []string{"plain", "a\u202Eb", "\xe2\x80", "nul\x00", "שלום\u200F", "\u2069"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		if text.Check(s) != nil {
			return
		}
		if !utf8.ValidString(s) || strings.ContainsRune(s, 0) {
			t.Fatalf("accepted %q, which PostgreSQL cannot store", s)
		}
		if strings.ContainsFunc(s, func(r rune) bool { return (r >= 0x202A && r <= 0x202E) || (r >= 0x2066 && r <= 0x2069) }) {
			t.Fatalf("accepted %q with a bidirectional control", s)
		}
	})
}
