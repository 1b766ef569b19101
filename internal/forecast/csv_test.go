package forecast

import (
	"math"
	"reflect"
	"strings"
	"testing"
)

// Rows in any order, with or without a header, become one history per
// customer in the order of first appearance, missing days at 0.
func TestReadCSV(t *testing.T) {
	t.Parallel()
	for _, header := range []string{"customer_id,date,consumed\n", " Customer_ID , Date , Consumed \n", ""} {
		in := header + "bob,2026-03-04,7\nada,2026-03-02,10\n\nada,2026-03-05,12.5\nbob,2026-03-02, 3\n"
		got, err := ReadCSV(strings.NewReader(in))
		if err != nil {
			t.Fatalf("header %q: %v", header, err)
		}
		if len(got) != 2 || got[0].CustomerID != "bob" || got[1].CustomerID != "ada" {
			t.Fatalf("header %q: customers %+v", header, got)
		}
		if h := got[1].History; !h.Start.Equal(date("2026-03-02")) || !reflect.DeepEqual(h.Daily, []float64{10, 0, 0, 12.5}) {
			t.Errorf("ada: %s %v", h.Start, h.Daily)
		}
		if h := got[0].History; !reflect.DeepEqual(h.Daily, []float64{3, 0, 7}) {
			t.Errorf("bob: %v", h.Daily)
		}
	}
}

// Every bad row is reported with its line number, together, so one run
// shows what to fix.
func TestReadCSVReportsBadRowsByLine(t *testing.T) {
	t.Parallel()
	in := strings.Join([]string{
		"customer_id,date,consumed",
		"ada,2026-03-02,10",
		"ada,2026-03-02",                                  // 3: two fields
		"ada,2026-13-01,1",                                // 4: no such month
		"ada,03/02/2026,1",                                // 5: not YYYY-MM-DD
		",2026-03-03,1",                                   // 6: no customer
		"ada,2026-03-03,-4",                               // 7: negative
		"ada,2026-03-03,1e3",                              // 8: not a plain number
		"ada,2026-03-03,NaN",                              // 9
		"ada,2026-03-02,3",                                // 10: duplicate of line 2
		"ada,2026-03-03,1,extra",                          // 11: four fields
		"bob,2026-03-03,1.2.3",                            // 12
		"b\u202eob,2026-03-03,1",                          // 13: a bidirectional override
		"bob,2026-03-03,99999" + strings.Repeat("9", 400), // 14: out of range
	}, "\n")
	_, err := ReadCSV(strings.NewReader(in))
	if err == nil {
		t.Fatal("bad rows accepted")
	}
	msg := err.Error()
	for _, want := range []string{
		"line 3: want 3 fields",
		"line 4: date \"2026-13-01\" is not a date as YYYY-MM-DD",
		"line 5: date \"03/02/2026\"",
		"line 6: customer_id is empty",
		"line 7: consumed \"-4\" is negative",
		"line 8: consumed \"1e3\" is not a number",
		"line 9: consumed \"NaN\" is not a number",
		"line 10: customer \"ada\" has a row for 2026-03-02 already, on line 2",
		"line 11: want 3 fields (customer_id,date,consumed), got 4",
		"line 12: consumed \"1.2.3\" is not a number",
	} {
		if !strings.Contains(msg, want) {
			t.Errorf("the error does not say %q:\n%s", want, msg)
		}
	}
	// Ten bad rows are enough: the rest is not read.
	if !strings.Contains(msg, "stopped after 10 bad rows") || strings.Contains(msg, "line 13") {
		t.Errorf("want a stop after 10 bad rows:\n%s", msg)
	}
	for _, c := range []struct{ in, want string }{
		{"b\u202eob,2026-03-03,1", "line 1: customer_id contains U+202E"},
		{"bob,2026-03-03,99999" + strings.Repeat("9", 400), "line 1: consumed"},
		{"ada,2026-03-02,1\n\"ada,2026-03-03,1\n", "line 2"},
		{"ada,0205-03-02,1\nada,2026-03-02,1\n", "customer \"ada\" (first row on line 1): history from 0205-03-02 to 2026-03-02 spans"},
	} {
		if _, err := ReadCSV(strings.NewReader(c.in)); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%q: %v, want %q", c.in, err, c.want)
		}
	}
}

// FuzzReadCSV: whatever the file, ReadCSV returns an error or histories
// the model can take: finite, not negative, within MaxHistoryDays.
func FuzzReadCSV(f *testing.F) {
	for _, seed := range []string{
		"customer_id,date,consumed\nada,2026-03-02,10\nada,2026-03-05,2.5\n",
		"ada,2026-03-02,1\nbob,2026-03-02,0\n",
		"ada,2026-03-02,1\nada,2026-03-02,1\n",
		"\"a,b\",2026-03-02,1\n",
		"ada,2026-02-30,1\n",
		"ada,2026-03-02,.5\n",
		"ada,2026-03-02,\n",
		"\"unterminated,2026-03-02,1\n",
	} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, in string) {
		got, err := ReadCSV(strings.NewReader(in))
		if err != nil {
			return
		}
		for _, c := range got {
			if c.CustomerID == "" || c.History.Len() > MaxHistoryDays {
				t.Fatalf("customer %q with %d days", c.CustomerID, c.History.Len())
			}
			for _, v := range c.History.Daily {
				if v < 0 || math.IsNaN(v) || math.IsInf(v, 0) {
					t.Fatalf("customer %q: day value %v", c.CustomerID, v)
				}
			}
			if _, err := Predict(c.History, 3); err != nil {
				t.Fatal(err)
			}
		}
	})
}
