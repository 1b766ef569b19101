package httpapi

import "testing"

func TestLoneSurrogate(t *testing.T) {
	for _, c := range []struct {
		body string
		at   int
		lone bool
	}{
		{`{"a":"x"}`, 0, false},
		{`{"a":"\ud83d\ude00"}`, 0, false},
		{`{"a":"\uD83D\uDE00"}`, 0, false},
		{`{"a":"\\ud800"}`, 0, false},
		{`{"a":"\n\u00e9\"\/"}`, 0, false},
		{`{"a":"\ud800"}`, 6, true},
		{`{"a":"\ud800x"}`, 6, true},
		{`{"a":"\ud800\n"}`, 6, true},
		{`{"a":"\ud800\u0041"}`, 6, true},
		{`{"a":"\udc00"}`, 6, true},
		{`{"a":"ok\udfff\ud800"}`, 8, true},
		{`{"a":"\\\ud800"}`, 8, true},
		{`{"a":"\ud8`, 0, false}, // cut short: kin-openapi's to refuse
		{`\`, 0, false},
		{`{"a":"x\`, 0, false},
	} {
		at, lone := loneSurrogate([]byte(c.body))
		if lone != c.lone || at != c.at {
			t.Errorf("loneSurrogate(%s) = %d, %t; want %d, %t", c.body, at, lone, c.at, c.lone)
		}
	}
}
