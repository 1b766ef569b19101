package db

import "testing"

func TestMaskLiterals(t *testing.T) {
	t.Parallel()
	for _, c := range []struct{ in, quotes, want string }{
		{`SELECT * FROM "people" WHERE email = $1 AND id = $2`, `'`, `SELECT * FROM "people" WHERE email = $1 AND id = $2`},
		{`WHERE email = 'it''s secret' AND note = 'x'`, `'`, `WHERE email = '?' AND note = '?'`},
		{`WHERE path = 'C:\' AND id = 7`, `'`, `WHERE path = '?'`}, // a backslash may end nothing: mask the rest
		{`WHERE email = 'never closed`, `'`, `WHERE email = '?'`},
		{`VALUES (42, -3.5, 1e10, 2.5E-3, 0.1)`, `'`, `VALUES (?, -?, ?, ?, ?)`},
		{`SELECT int4 FROM t2 WHERE col_9 = $10 LIMIT 50`, `'`, `SELECT int4 FROM t2 WHERE col_9 = $10 LIMIT ?`},
		{`constraint "people_email_key"`, `'`, `constraint "people_email_key"`},
		{`unable to encode "se\"cret" into int4 (OID 23)`, `'"`, `unable to encode "?" into int4 (OID ?)`},
		{`naïve1 = 'é'`, `'`, `naïve1 = '?'`},
	} {
		if got := maskLiterals(c.in, c.quotes); got != c.want {
			t.Errorf("maskLiterals(%q, %q) = %q, want %q", c.in, c.quotes, got, c.want)
		}
	}
}
