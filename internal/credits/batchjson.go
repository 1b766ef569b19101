package credits

import (
	"encoding/json"
	"strconv"
	"unicode/utf8"
)

// marshalBatch is json.Marshal(items), byte for byte, without reflection:
// in a profile of consume-many (issue 11) the batch's json.Marshal was
// about a twentieth of the server's CPU, every consume paying a share.
// An item with metadata other than {} (json.RawMessage, which
// encoding/json validates and compacts) takes json.Marshal as before; batchjson_internal_test.go
// compares the two on many items and a fuzz target.
func marshalBatch(items []batchItem) ([]byte, error) {
	if len(items) == 0 {
		return json.Marshal(items)
	}
	for i := range items {
		if m := items[i].Metadata; len(m) > 0 && string(m) != "{}" {
			return json.Marshal(items)
		}
	}
	b := make([]byte, 0, 256*len(items))
	b = append(b, '[')
	for i := range items {
		it := &items[i]
		if i > 0 {
			b = append(b, ',')
		}
		// The members in the order of batchItem's fields, as encoding/json
		// writes them; omitempty ones only when set.
		b = append(b, `{"kind":`...)
		b = appendJSONString(b, it.Kind)
		b = append(b, `,"customer":`...)
		b = appendJSONString(b, it.Customer)
		b = append(b, `,"scope":`...)
		b = appendJSONString(b, it.Scope)
		b = append(b, `,"key":`...)
		b = appendJSONString(b, it.Key)
		b = append(b, `,"hash":`...)
		b = appendJSONString(b, it.Hash)
		b = append(b, `,"amount":`...)
		if it.Amount == nil {
			b = append(b, "null"...)
		} else {
			b = strconv.AppendInt(b, *it.Amount, 10)
		}
		if it.Reason != "" {
			b = append(b, `,"reason":`...)
			b = appendJSONString(b, it.Reason)
		}
		if len(it.Metadata) > 0 {
			// "{}" (a consume without metadata), as encoding/json copies it.
			b = append(b, `,"metadata":{}`...)
		}
		if it.Hold != "" {
			b = append(b, `,"hold":`...)
			b = appendJSONString(b, it.Hold)
		}
		if it.ExpiresIn != 0 {
			b = append(b, `,"expires_in":`...)
			b = strconv.AppendInt(b, it.ExpiresIn, 10)
		}
		b = append(b, `,"id":`...)
		b = appendJSONString(b, it.ID)
		b = append(b, '}')
	}
	return append(b, ']'), nil
}

const hexDigits = "0123456789abcdef"

// appendJSONString appends s as encoding/json writes a string (HTML
// escaping on): <, > and & as \u003c, \u003e, \u0026, control characters
// escaped, invalid UTF-8 as \ufffd, U+2028 and U+2029 escaped.
func appendJSONString(dst []byte, s string) []byte {
	dst = append(dst, '"')
	start := 0
	for i := 0; i < len(s); {
		if c := s[i]; c < utf8.RuneSelf {
			if c >= 0x20 && c != '"' && c != '\\' && c != '<' && c != '>' && c != '&' {
				i++
				continue
			}
			dst = append(dst, s[start:i]...)
			switch c {
			case '\\', '"':
				dst = append(dst, '\\', c)
			case '\b':
				dst = append(dst, '\\', 'b')
			case '\f':
				dst = append(dst, '\\', 'f')
			case '\n':
				dst = append(dst, '\\', 'n')
			case '\r':
				dst = append(dst, '\\', 'r')
			case '\t':
				dst = append(dst, '\\', 't')
			default:
				dst = append(dst, '\\', 'u', '0', '0', hexDigits[c>>4], hexDigits[c&0xF])
			}
			i++
			start = i
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && size == 1 {
			dst = append(dst, s[start:i]...)
			dst = append(dst, `\ufffd`...)
			i += size
			start = i
			continue
		}
		if r == '\u2028' || r == '\u2029' {
			dst = append(dst, s[start:i]...)
			dst = append(dst, '\\', 'u', '2', '0', '2', hexDigits[r&0xF])
			i += size
			start = i
			continue
		}
		i += size
	}
	dst = append(dst, s[start:]...)
	return append(dst, '"')
}
