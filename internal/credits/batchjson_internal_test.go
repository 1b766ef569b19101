package credits

import (
	"encoding/json"
	"strings"
	"testing"
)

// batchStrings are strings of every kind encoding/json escapes or keeps.
var batchStrings = []string{"", "c1", "customer:bench-1", "a\"b\\c", "<a href='x'>&amp;</a>", "tab\tnew\nret\rbs\bff\f",
	"\x00\x01\x1f\x7f", "kü 😀 ê", "\u2028\u2029", "bad \xff utf8 \xe2\x82", "\xed\xa0\x80 surrogate", "\uFFFD", strings.Repeat("r", 300)}

func sameAsMarshal(t *testing.T, items []batchItem) {
	t.Helper()
	want, werr := json.Marshal(items)
	got, gerr := marshalBatch(items)
	if string(got) != string(want) || (werr == nil) != (gerr == nil) {
		t.Errorf("marshalBatch %s (%v)\njson.Marshal %s (%v)", got, gerr, want, werr)
	}
}

// marshalBatch writes what json.Marshal writes for every item.
func TestMarshalBatchIsJSONMarshal(t *testing.T) {
	t.Parallel()
	one, zero, neg := int64(1), int64(0), int64(-1<<63)
	sameAsMarshal(t, nil)
	sameAsMarshal(t, []batchItem{})
	for _, s := range batchStrings {
		sameAsMarshal(t, []batchItem{{Kind: KindConsume, Customer: s, Scope: s, Key: s, Hash: s, Amount: &one, Reason: s, ID: s}})
		sameAsMarshal(t, []batchItem{{Kind: KindConsume, Customer: s, Amount: &one, Reason: s, Metadata: json.RawMessage("{}"), ID: s}})
		sameAsMarshal(t, []batchItem{{Kind: s, Hold: s, ExpiresIn: 3600, Amount: nil, ID: "ctx_1"}})
	}
	sameAsMarshal(t, []batchItem{
		{Kind: KindConsume, Customer: "c1", Scope: "customer:c1", Key: "k", Hash: "ab", Amount: &one, Reason: "r", ID: "ctx_1"},
		{Kind: kindCapture, Customer: "c2", Hold: "hold_1", Amount: &zero, ID: "ctx_2"},
		{Kind: kindHold, Customer: "c3", Amount: &neg, ExpiresIn: -5, ID: "ctx_3"},
		{Kind: KindConsume, Customer: "c4", Amount: &one, Metadata: json.RawMessage(` {"a" : "<b>"} `), ID: "ctx_4"},
	})
	sameAsMarshal(t, []batchItem{
		{Kind: KindConsume, Customer: "c1", Amount: &one, Reason: "r", Metadata: json.RawMessage("{}"), ID: "ctx_1"},
		{Kind: KindConsume, Customer: "c2", Amount: &one, Reason: "r", ID: "ctx_2"},
		{Kind: kindHold, Customer: "c3", Amount: &one, Reason: "r", Metadata: json.RawMessage("{}"), Hold: "hold_1", ExpiresIn: 60, ID: "ctx_3"},
	})
}

// Arbitrary items: marshalBatch writes what json.Marshal writes.
func FuzzMarshalBatch(f *testing.F) {
	for _, s := range batchStrings {
		f.Add(s, s, int64(1), false, "", int64(0))
	}
	f.Add("c", "r", int64(-5), true, "hold_1", int64(60))
	f.Fuzz(func(t *testing.T, customer, reason string, amount int64, nilAmount bool, hold string, expires int64) {
		item := batchItem{Kind: KindConsume, Customer: customer, Scope: "customer:" + customer, Key: reason + customer,
			Hash: "00ff", Amount: &amount, Reason: reason, Hold: hold, ExpiresIn: expires, ID: "ctx_" + hold}
		if expires%2 == 0 {
			item.Metadata = json.RawMessage("{}")
		}
		if nilAmount {
			item.Amount = nil
		}
		sameAsMarshal(t, []batchItem{item, item})
	})
}
