package customers

import (
	"regexp"
	"strings"
	"testing"
)

// idPattern is the rule ValidateID checks byte by byte.
var idPattern = regexp.MustCompile(`^[A-Za-z0-9_.:@-]{1,255}$`)

func checkID(t *testing.T, id string) {
	t.Helper()
	if got, want := ValidateID(id) == nil, idPattern.MatchString(id); got != want {
		t.Errorf("ValidateID(%q) valid: %v, the pattern says %v", id, got, want)
	}
}

// Every byte alone, in and around an id, and every length around the
// limits: ValidateID agrees with the pattern.
func TestValidateIDIsThePattern(t *testing.T) {
	t.Parallel()
	for c := range 256 {
		b := string([]byte{byte(c)})
		checkID(t, b)
		checkID(t, "cus"+b+"x")
		checkID(t, "cus_1"+b)
	}
	for _, id := range []string{"", "a", "é", "cus_\u00e9", "a\n", "\na", "a b", "ab\x00", "Zz09_.:@-", "a\u212a", "a\u0130"} {
		checkID(t, id)
	}
	for _, n := range []int{1, 254, 255, 256, 1000} {
		checkID(t, strings.Repeat("a", n))
		checkID(t, strings.Repeat("a", n-1)+"!")
	}
}

func FuzzValidateID(f *testing.F) {
	f.Add("cus_123")
	f.Add("a\u00e9")
	f.Fuzz(func(t *testing.T, id string) { checkID(t, id) })
}
