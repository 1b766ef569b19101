package customers

import (
	"database/sql/driver"
	"fmt"
	"slices"
	"strconv"
	"strings"

	"github.com/tallybilling/tally/internal/errs"
)

// MaxLowBalanceThresholds is how many low-balance thresholds one customer
// may have.
const MaxLowBalanceThresholds = 10

// maxThreshold is the largest threshold (catalog.MaxCreditsPerMove).
const maxThreshold = 1_000_000_000_000

// Thresholds is a bigint[] column read and written as PostgreSQL's text
// form ({1,2,3}); NULL is nil.
type Thresholds []int64

// Scan implements sql.Scanner.
func (t *Thresholds) Scan(src any) error {
	var s string
	switch v := src.(type) {
	case nil:
		*t = nil
		return nil
	case string:
		s = v
	case []byte:
		s = string(v)
	default:
		return fmt.Errorf("customers: thresholds: cannot scan %T", src)
	}
	out, err := ParseThresholds(s)
	*t = out
	return err
}

// Value implements driver.Valuer.
func (t Thresholds) Value() (driver.Value, error) {
	if t == nil {
		return nil, nil
	}
	return t.String(), nil
}

// String is the PostgreSQL array literal.
func (t Thresholds) String() string {
	parts := make([]string, len(t))
	for i, v := range t {
		parts[i] = strconv.FormatInt(v, 10)
	}
	return "{" + strings.Join(parts, ",") + "}"
}

// ParseThresholds reads PostgreSQL's text form of a bigint[].
func ParseThresholds(s string) (Thresholds, error) {
	s = strings.TrimSpace(s)
	if !strings.HasPrefix(s, "{") || !strings.HasSuffix(s, "}") {
		return nil, fmt.Errorf("customers: thresholds %q are not an array", s)
	}
	s = s[1 : len(s)-1]
	out := Thresholds{}
	if s == "" {
		return out, nil
	}
	for _, p := range strings.Split(s, ",") {
		v, err := strconv.ParseInt(strings.TrimSpace(p), 10, 64)
		if err != nil {
			return nil, fmt.Errorf("customers: threshold %q: %w", p, err)
		}
		out = append(out, v)
	}
	return out, nil
}

// normalizeThresholds checks a list from the API and returns it sorted
// from the highest, without duplicates. Errors: errs.Invalid.
func normalizeThresholds(in []int64) (Thresholds, error) {
	if len(in) > MaxLowBalanceThresholds {
		return nil, errs.InvalidField("/low_balance_thresholds", fmt.Sprintf("at most %d thresholds", MaxLowBalanceThresholds))
	}
	out := make(Thresholds, 0, len(in))
	for _, v := range in {
		if v < 1 || v > maxThreshold {
			return nil, errs.InvalidField("/low_balance_thresholds", fmt.Sprintf("each threshold is a whole number from 1 to %d", int64(maxThreshold)))
		}
		out = append(out, v)
	}
	slices.Sort(out)
	slices.Reverse(out)
	return slices.Compact(out), nil
}

// GormDataType tells gorm the column type.
func (Thresholds) GormDataType() string { return "bigint[]" }
