package main

import (
	"bufio"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"
)

// Where a scenario's CPU went. A ratio says how far a target is missed; to
// say what limits it, BENCHMARKS.md needs the CPU each process spent per
// operation (the server, PostgreSQL, this tool) and how busy the machine
// was: with both cores full the cost per operation limits, with CPU to
// spare the waiting does. Linux's /proc has both; elsewhere the report
// leaves it out.

// userHZ is the unit of /proc's CPU times: USER_HZ, 100 on every Linux ABI
// Go runs on.
const userHZ = 100

// cpuSnapshot is the CPU time spent so far by the processes of each
// watched command name, and by the whole machine.
type cpuSnapshot struct {
	at     time.Time
	byName map[string]time.Duration
	busy   time.Duration // every CPU's time not idle nor waiting for I/O
	total  time.Duration
}

// cpuProbe reads snapshots of procDir (/proc) for the processes named in
// names (their command, as /proc/<pid>/stat shows it: at most 15 bytes).
type cpuProbe struct {
	procDir string
	names   []string
}

// newCPUProbe returns a probe of /proc for names, or nil when there is
// nothing to watch or no /proc to read.
func newCPUProbe(procDir string, names []string) *cpuProbe {
	if len(names) == 0 {
		return nil
	}
	if _, err := os.Stat(filepath.Join(procDir, "stat")); err != nil {
		return nil
	}
	return &cpuProbe{procDir: procDir, names: names}
}

func ticks(s string) time.Duration {
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n < 0 {
		return 0
	}
	return time.Duration(n) * time.Second / userHZ
}

// snapshot reads the machine's and the named processes' CPU time. A
// process that ends between two snapshots takes its time with it, and one
// that starts between them brings all of its own: the scenarios keep their
// connections and processes for the whole run, so neither moves much.
func (p *cpuProbe) snapshot(now time.Time) cpuSnapshot {
	s := cpuSnapshot{at: now, byName: map[string]time.Duration{}}
	if f, err := os.Open(filepath.Join(p.procDir, "stat")); err == nil {
		sc := bufio.NewScanner(f)
		if sc.Scan() {
			// cpu user nice system idle iowait irq softirq steal ...
			// (guest time is counted in user already, so only the first eight)
			fields := strings.Fields(sc.Text())
			for i, v := range fields[1:min(len(fields), 9)] {
				t := ticks(v)
				s.total += t
				if i != 3 && i != 4 { // idle, iowait
					s.busy += t
				}
			}
		}
		f.Close()
	}
	entries, err := os.ReadDir(p.procDir)
	if err != nil {
		return s
	}
	for _, e := range entries {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		data, err := os.ReadFile(filepath.Join(p.procDir, e.Name(), "stat"))
		if err != nil {
			continue // ended meanwhile
		}
		// pid (comm) state ppid ... utime stime: comm may hold spaces and
		// parentheses, so it ends at the last ')'.
		line := string(data)
		open, closing := strings.IndexByte(line, '('), strings.LastIndexByte(line, ')')
		if open < 0 || closing < open {
			continue
		}
		comm := line[open+1 : closing]
		watched := false
		for _, n := range p.names {
			watched = watched || n == comm
		}
		rest := strings.Fields(line[closing+1:])
		if !watched || len(rest) < 13 {
			continue
		}
		s.byName[comm] += ticks(rest[11]) + ticks(rest[12]) // utime, stime
	}
	return s
}

// cpuUse is what a scenario's measured window cost: each watched
// process's CPU time and the machine's busy share.
type cpuUse struct {
	Window      float64            `json:"window_seconds"`
	BusyPercent float64            `json:"machine_busy_percent"`
	Seconds     map[string]float64 `json:"cpu_seconds"`
	// PerOpMicros divides Seconds by what the scenario counts (operations,
	// or its rate's unit: events accepted, payments credited).
	PerOpMicros map[string]float64 `json:"per_op_microseconds,omitempty"`
}

// between is the CPU spent from a to b.
func between(a, b cpuSnapshot) *cpuUse {
	u := &cpuUse{Window: b.at.Sub(a.at).Seconds(), Seconds: map[string]float64{}}
	if t := b.total - a.total; t > 0 {
		u.BusyPercent = 100 * float64(b.busy-a.busy) / float64(t)
	}
	for name, d := range b.byName {
		u.Seconds[name] = (d - a.byName[name]).Seconds()
	}
	return u
}

// perOp fills PerOpMicros for n counted operations.
func (u *cpuUse) perOp(n float64) {
	if u == nil || n <= 0 {
		return
	}
	u.PerOpMicros = map[string]float64{}
	for name, sec := range u.Seconds {
		u.PerOpMicros[name] = sec * 1e6 / n
	}
}

// String is the report's line: the machine's busy share and each
// process's CPU per counted operation.
func (u *cpuUse) String(unit string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "machine %.0f%% busy over %.1fs", u.BusyPercent, u.Window)
	if len(u.PerOpMicros) > 0 {
		fmt.Fprintf(&b, "; CPU per %s:", unit)
		for _, n := range slices.Sorted(maps.Keys(u.PerOpMicros)) {
			fmt.Fprintf(&b, " %s %.0f µs", n, u.PerOpMicros[n])
		}
	}
	return b.String()
}
