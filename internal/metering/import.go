package metering

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/errs"
	"github.com/tallybilling/tally/internal/text"
)

// Importing usage history from a legacy system. An import is a stream of
// rows (CSV with the header customer_id,meter,value,timestamp,identifier,
// or one JSON object a line), each checked as a live event is, except that
// its timestamp is required and may be old: a row older than Stripe accepts
// (DeliveryWindow) is stored as historical, counted in tally's totals and
// never sent; a newer one is stored as a live event would be and delivered.
//
// Rows are stored in batches of ImportBatch, each in one transaction and
// one multi-row statement, through the same code as live intake, so an
// identifier means the same in both: the same event again is a duplicate
// and changes nothing, another event under a taken identifier is a
// conflict and is not stored. That makes an import safe to run again: an
// interrupted one resumes by running it again (the rows stored before the
// interruption come back as duplicates), and a whole file imported twice
// changes nothing the second time. Reading the next batch overlaps with
// storing the last, and memory stays flat whatever the size of the file.

// ImportFormat is the format of an import's rows.
type ImportFormat string

// Import formats.
const (
	ImportCSV    ImportFormat = "csv"
	ImportNDJSON ImportFormat = "ndjson"
)

// Limits of an import.
const (
	// ImportBatch is how many rows one transaction stores.
	ImportBatch = 5000
	// MaxImportLine is the longest line read, in bytes; a longer one is
	// rejected (line_too_long) and skipped to its end.
	MaxImportLine = 16 << 10
	// MaxImportErrors is how many row errors a summary lists.
	MaxImportErrors = 100
	// ImportWriters is how many batches are stored at once.
	ImportWriters = 2
)

// ImportCSVHeader is the header a CSV import starts with (columns in any
// order).
const ImportCSVHeader = "customer_id,meter,value,timestamp,identifier"

// ImportOptions say how to read an import and what to do with it.
type ImportOptions struct {
	Format ImportFormat
	// DryRun checks and classifies every row against what is stored and
	// stores nothing (each batch's transaction is rolled back).
	DryRun bool
	// Progress, when set, is called after every batch with the bytes and
	// rows read so far.
	Progress func(bytesRead, rowsRead int64)
}

// ImportError is one row that was not stored, by line number (the CSV
// header is line 1).
type ImportError struct {
	Line   int64
	Code   errs.Code
	Detail string
}

// ImportSummary is what an import did. Read counts the rows read (not the
// CSV header or blank lines); each is then accepted, a duplicate, a
// conflict or rejected. Of the accepted, Historical were stored as
// historical and Queued to be sent to Stripe (pending or waiting for the
// customer's Stripe link); the others went to a shadow meter or a legacy
// period. Errors lists the first MaxImportErrors rejected and conflicting
// rows.
type ImportSummary struct {
	Read, Accepted, Duplicates, Conflicts, Rejected, Historical, Queued int64
	Errors                                                              []ImportError
}

// merge adds part's counts to s, keeping the MaxImportErrors errors of the
// lowest lines.
func (s *ImportSummary) merge(part ImportSummary) {
	s.Read += part.Read
	s.Accepted += part.Accepted
	s.Duplicates += part.Duplicates
	s.Conflicts += part.Conflicts
	s.Rejected += part.Rejected
	s.Historical += part.Historical
	s.Queued += part.Queued
	s.Errors = append(s.Errors, part.Errors...)
	if len(s.Errors) > MaxImportErrors {
		slices.SortFunc(s.Errors, func(a, b ImportError) int { return cmp.Compare(a.Line, b.Line) })
		s.Errors = s.Errors[:MaxImportErrors]
	}
}

func (s *ImportSummary) addError(line int64, code errs.Code, detail string) {
	if len(s.Errors) < MaxImportErrors {
		s.Errors = append(s.Errors, ImportError{Line: line, Code: code, Detail: text.Truncate(detail, 500)})
	}
}

// importRow is one row read: the input and its line, or why it could not
// be read.
type importRow struct {
	line int64
	in   EventInput
	err  error
}

// errDryRun rolls a dry run's batch back.
var errDryRun = errors.New("metering: dry run")

// Import reads rows from r and stores them as the package comment says.
// A row that is bad is never an error: it is counted (rejected, conflicts)
// and listed in Errors. The import stops with an error only when the
// stream itself fails (a read error, such as a body over its limit), the
// header of a CSV is wrong, or the database fails; the batches stored
// before stay stored, and running the import again resumes it.
//
// Errors: errs.Invalid (unknown format, bad CSV header), errs.Unavailable,
// or the reader's own error.
func (s *Service) Import(ctx context.Context, r io.Reader, opts ImportOptions) (ImportSummary, error) {
	var parse func([]byte, *csvColumns) (EventInput, error)
	switch opts.Format {
	case ImportCSV:
		parse = parseCSVRow
	case ImportNDJSON:
		parse = func(line []byte, _ *csvColumns) (EventInput, error) { return parseNDJSONRow(line) }
	default:
		return ImportSummary{}, errs.InvalidField("format", fmt.Sprintf("unknown import format %q: csv or ndjson", opts.Format))
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()

	batches := make(chan []importRow, ImportWriters)
	var readErr error
	var bytesRead, rowsRead atomic.Int64
	go func() {
		defer close(batches)
		readErr = readImport(ctx, r, opts.Format, parse, batches, &bytesRead, &rowsRead)
	}()

	// ImportWriters batches are stored at once, so that the database's
	// work on one overlaps with the next (PostgreSQL's index maintenance is
	// most of an import's cost). Within a batch, rows are written in
	// identifier order, so concurrent batches take their locks in one order.
	var sum ImportSummary
	var mu sync.Mutex
	var storeErr error
	var wg sync.WaitGroup
	for range ImportWriters {
		wg.Go(func() {
			for batch := range batches {
				mu.Lock()
				failed := storeErr != nil
				mu.Unlock()
				if failed {
					continue // drain, so the reader can stop
				}
				var part ImportSummary
				err := s.importBatch(ctx, batch, opts.DryRun, &part)
				mu.Lock()
				if err != nil {
					if storeErr == nil {
						storeErr = err
					}
					cancel()
				} else {
					sum.merge(part)
					if opts.Progress != nil {
						opts.Progress(bytesRead.Load(), sum.Read)
					}
				}
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	slices.SortFunc(sum.Errors, func(a, b ImportError) int { return cmp.Compare(a.Line, b.Line) })
	if storeErr != nil {
		return sum, storeErr
	}
	if readErr != nil {
		return sum, readErr
	}
	return sum, nil
}

// importBatch validates and stores one batch, adding its outcome to sum.
func (s *Service) importBatch(ctx context.Context, batch []importRow, dryRun bool, sum *ImportSummary) error {
	now := s.now()
	var valid []event
	var lines []int64
	var bad []ImportError
	for _, row := range batch {
		if row.err != nil {
			bad = append(bad, importError(row.line, row.err))
			continue
		}
		ev, err := row.in.normalize(s.catalog, now, true)
		if err != nil {
			bad = append(bad, importError(row.line, err))
			continue
		}
		valid = append(valid, ev)
		lines = append(lines, row.line)
	}
	var statuses []ResultStatus
	var counts map[Status]int64
	if len(valid) > 0 {
		err := db.InTx(ctx, s.db, func(tx *gorm.DB) error {
			var err error
			statuses, counts, err = s.store(ctx, tx, valid, now)
			if err == nil && dryRun {
				return errDryRun
			}
			return err
		})
		if err != nil && !errors.Is(err, errDryRun) {
			return err
		}
	}
	// Counted only once the batch is stored, so a failed batch leaves the
	// summary as it was before it.
	sum.Read += int64(len(batch))
	sum.Rejected += int64(len(bad))
	sum.Historical += counts[StatusHistorical]
	sum.Queued += counts[StatusPending] + counts[StatusWaitingCustomer]
	bi := 0
	addBad := func(upTo int64) {
		for ; bi < len(bad) && bad[bi].Line < upTo; bi++ {
			sum.addError(bad[bi].Line, bad[bi].Code, bad[bi].Detail)
		}
	}
	for i, ev := range valid {
		addBad(lines[i])
		switch statuses[i] {
		case ResultAccepted:
			sum.Accepted++
		case ResultDuplicate:
			sum.Duplicates++
		case ResultConflict:
			sum.Conflicts++
			sum.addError(lines[i], errs.IdentifierConflict, fmt.Sprintf(
				"identifier %q is already used by another usage event (a different customer, meter, value or timestamp); not stored", ev.Identifier))
		}
	}
	addBad(1<<63 - 1)
	return nil
}

func importError(line int64, err error) ImportError {
	e, ok := errs.As(err)
	if !ok {
		return ImportError{Line: line, Code: errs.Invalid, Detail: err.Error()}
	}
	return ImportError{Line: line, Code: e.Code, Detail: e.Message}
}

// readImport reads r line by line into batches of ImportBatch rows. Lines
// are split on \n (a trailing \r is dropped); blank lines are skipped; a
// line longer than MaxImportLine is a rejected row, skipped to its end.
func readImport(ctx context.Context, r io.Reader, format ImportFormat, parse func([]byte, *csvColumns) (EventInput, error),
	out chan<- []importRow, bytesRead, rowsRead *atomic.Int64) error {
	br := bufio.NewReaderSize(r, 64<<10)
	var cols *csvColumns
	var lineNo int64
	batch := make([]importRow, 0, ImportBatch)
	send := func() bool {
		if len(batch) == 0 {
			return true
		}
		select {
		case out <- batch:
			batch = make([]importRow, 0, ImportBatch)
			return true
		case <-ctx.Done():
			return false
		}
	}
	for {
		line, tooLong, n, err := readLine(br)
		bytesRead.Add(int64(n))
		if err != nil && err != io.EOF {
			// The stream broke: the line read last may be cut short (a
			// value or identifier missing its end), so it is dropped; the
			// whole rows before it are stored, and running the import
			// again picks up from there.
			send()
			return err
		}
		if n > 0 {
			lineNo++
		}
		if len(bytes.TrimSpace(line)) > 0 || tooLong {
			switch {
			case tooLong:
				rowsRead.Add(1)
				batch = append(batch, importRow{line: lineNo, err: errs.E(errs.Invalid, "line_too_long: the line is longer than %d bytes", MaxImportLine)})
			case format == ImportCSV && cols == nil:
				c, herr := parseCSVHeader(line)
				if herr != nil {
					return herr
				}
				cols = &c
			default:
				rowsRead.Add(1)
				in, perr := parse(line, cols)
				batch = append(batch, importRow{line: lineNo, in: in, err: perr})
			}
			if len(batch) == ImportBatch && !send() {
				return ctx.Err()
			}
		}
		if err == io.EOF {
			if format == ImportCSV && cols == nil {
				return errs.E(errs.Invalid, "the CSV is empty: it must start with the header %s", ImportCSVHeader)
			}
			if !send() {
				return ctx.Err()
			}
			return nil
		}
	}
}

// readLine reads one line without its end. A line longer than
// MaxImportLine comes back empty with tooLong set, read to its end. n is
// how many bytes were consumed.
func readLine(br *bufio.Reader) (line []byte, tooLong bool, n int, err error) {
	for {
		chunk, err := br.ReadSlice('\n')
		n += len(chunk)
		if !tooLong && len(line)+len(chunk) <= MaxImportLine+2 {
			line = append(line, chunk...)
		} else {
			tooLong, line = true, nil
		}
		if errors.Is(err, bufio.ErrBufferFull) {
			continue
		}
		if !tooLong {
			line = bytes.TrimSuffix(line, []byte("\n"))
			line = bytes.TrimSuffix(line, []byte("\r"))
			if len(line) > MaxImportLine {
				tooLong, line = true, nil
			}
		}
		return line, tooLong, n, err
	}
}

// csvColumns is where each field is in a CSV import's rows.
type csvColumns struct {
	customerID, meter, value, timestamp, identifier int
	n                                               int
}

// parseCSVHeader reads the header: the five columns, each once, in any
// order. Errors: errs.Invalid.
func parseCSVHeader(line []byte) (csvColumns, error) {
	fields, err := splitCSV(bytes.TrimPrefix(line, []byte("\xef\xbb\xbf")))
	if err != nil {
		return csvColumns{}, errs.E(errs.Invalid, "the CSV header: %v", err)
	}
	c := csvColumns{customerID: -1, meter: -1, value: -1, timestamp: -1, identifier: -1, n: len(fields)}
	for i, f := range fields {
		var at *int
		switch strings.TrimSpace(f) {
		case "customer_id":
			at = &c.customerID
		case "meter":
			at = &c.meter
		case "value":
			at = &c.value
		case "timestamp":
			at = &c.timestamp
		case "identifier":
			at = &c.identifier
		default:
			return csvColumns{}, errs.E(errs.Invalid, "the CSV header names the unknown column %q; it must be %s", text.Truncate(f, 100), ImportCSVHeader)
		}
		if *at >= 0 {
			return csvColumns{}, errs.E(errs.Invalid, "the CSV header names %q twice", f)
		}
		*at = i
	}
	if c.customerID < 0 || c.meter < 0 || c.value < 0 || c.timestamp < 0 || c.identifier < 0 {
		return csvColumns{}, errs.E(errs.Invalid, "the CSV header must name the columns %s", ImportCSVHeader)
	}
	return c, nil
}

func parseCSVRow(line []byte, c *csvColumns) (EventInput, error) {
	fields, err := splitCSV(line)
	if err != nil {
		return EventInput{}, errs.E(errs.Invalid, "%v", err)
	}
	if len(fields) != c.n {
		return EventInput{}, errs.E(errs.Invalid, "the row has %d fields, the header %d", len(fields), c.n)
	}
	in := EventInput{CustomerID: fields[c.customerID], Meter: fields[c.meter], Identifier: fields[c.identifier]}
	v, err := strconv.ParseFloat(strings.TrimSpace(fields[c.value]), 64)
	if err != nil {
		return EventInput{}, errs.InvalidField("/value", fmt.Sprintf("value %q is not a number", text.Truncate(fields[c.value], 40)))
	}
	in.Value = v
	ts, err := parseImportTime(fields[c.timestamp])
	if err != nil {
		return EventInput{}, err
	}
	in.Timestamp = &ts
	return in, nil
}

func parseImportTime(s string) (time.Time, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return time.Time{}, errs.InvalidField("/timestamp", "timestamp is required in an import (RFC 3339)")
	}
	t, err := time.Parse(time.RFC3339Nano, s)
	if err != nil {
		return time.Time{}, errs.InvalidField("/timestamp", fmt.Sprintf("timestamp %q is not an RFC 3339 time", text.Truncate(s, 40)))
	}
	return t, nil
}

// splitCSV splits one CSV line (RFC 4180 quoting, no line breaks inside a
// field: nothing an import carries may hold one).
func splitCSV(line []byte) ([]string, error) {
	var fields []string
	for i := 0; ; {
		if i < len(line) && line[i] == '"' {
			var b strings.Builder
			i++
			for {
				j := bytes.IndexByte(line[i:], '"')
				if j < 0 {
					return nil, errors.New("a quoted field is not closed")
				}
				b.Write(line[i : i+j])
				i += j + 1
				if i < len(line) && line[i] == '"' {
					b.WriteByte('"')
					i++
					continue
				}
				break
			}
			fields = append(fields, b.String())
			if i == len(line) {
				return fields, nil
			}
			if line[i] != ',' {
				return nil, errors.New("a quoted field is followed by text before the comma")
			}
			i++
			continue
		}
		j := bytes.IndexByte(line[i:], ',')
		if j < 0 {
			f := line[i:]
			if bytes.IndexByte(f, '"') >= 0 {
				return nil, errors.New("a quote inside an unquoted field")
			}
			return append(fields, string(f)), nil
		}
		f := line[i : i+j]
		if bytes.IndexByte(f, '"') >= 0 {
			return nil, errors.New("a quote inside an unquoted field")
		}
		fields = append(fields, string(f))
		i += j + 1
	}
}

// ndjsonRow is one NDJSON import row.
type ndjsonRow struct {
	CustomerID *string          `json:"customer_id"`
	Meter      *string          `json:"meter"`
	Value      *json.RawMessage `json:"value"`
	Timestamp  *string          `json:"timestamp"`
	Identifier *string          `json:"identifier"`
}

func parseNDJSONRow(line []byte) (EventInput, error) {
	var r ndjsonRow
	if err := json.Unmarshal(line, &r); err != nil {
		return EventInput{}, errs.E(errs.Invalid, "the line is not a JSON object: %v", err)
	}
	var missing []string
	for name, p := range map[string]*string{"customer_id": r.CustomerID, "meter": r.Meter, "identifier": r.Identifier} {
		if p == nil {
			missing = append(missing, name)
		}
	}
	if r.Value == nil {
		missing = append(missing, "value")
	}
	if len(missing) > 0 {
		return EventInput{}, errs.E(errs.Invalid, "the row lacks %s", strings.Join(missing, ", "))
	}
	var v float64
	if err := json.Unmarshal(*r.Value, &v); err != nil {
		return EventInput{}, errs.InvalidField("/value", fmt.Sprintf("value %s is not a number", text.Truncate(string(*r.Value), 40)))
	}
	in := EventInput{CustomerID: *r.CustomerID, Meter: *r.Meter, Identifier: *r.Identifier, Value: v}
	ts := ""
	if r.Timestamp != nil {
		ts = *r.Timestamp
	}
	t, err := parseImportTime(ts)
	if err != nil {
		return EventInput{}, err
	}
	in.Timestamp = &t
	return in, nil
}
