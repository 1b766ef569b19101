package main

import (
	"context"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// writeProc lays out a /proc with the machine's counters and one stat
// file per process: pid -> "comm utime stime".
func writeProc(t *testing.T, dir, machine string, procs map[string]string) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(dir, "stat"), []byte("cpu "+machine+"\ncpu0 1 2 3\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	for pid, p := range procs {
		f := strings.Fields(p)
		comm, utime, stime := strings.Join(f[:len(f)-2], " "), f[len(f)-2], f[len(f)-1]
		// pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime ...
		line := pid + " (" + comm + ") S 1 1 1 0 -1 4194304 10 0 0 0 " + utime + " " + stime + " 0 0 20 0 1 0 100 0 0\n"
		if err := os.MkdirAll(filepath.Join(dir, pid), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, pid, "stat"), []byte(line), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// The CPU of a window: each named command's processes summed (a command
// with spaces and parentheses in its name included), others left out, and
// the machine's busy share without idle and I/O wait; per operation in the
// report's unit.
func TestCPUOfAWindowByProcessName(t *testing.T) {
	dir := t.TempDir()
	// user nice system idle iowait irq softirq steal guest guest_nice
	writeProc(t, dir, "100 0 100 700 100 0 0 0 50 0", map[string]string{
		"10": "postgres 100 50", "11": "postgres 10 0", "20": "tally (x) 40 10", "30": "other 500 500",
	})
	p := newCPUProbe(dir, []string{"postgres", "tally (x)"})
	if p == nil {
		t.Fatal("no probe of a directory with a stat file")
	}
	a := p.snapshot(time.Unix(0, 0))
	writeProc(t, dir, "500 0 300 1100 100 0 0 0 90 0", map[string]string{
		"10": "postgres 400 150", "11": "postgres 10 0", "20": "tally (x) 90 10", "30": "other 900 900",
	})
	u := between(a, p.snapshot(time.Unix(10, 0)))
	if u.Window != 10 || u.Seconds["postgres"] != 4 || u.Seconds["tally (x)"] != 0.5 || len(u.Seconds) != 2 {
		t.Fatalf("window %+v, want postgres 4 s and tally (x) 0.5 s over 10 s", u)
	}
	// busy: user 400 + system 200 of 1,000 ticks (idle 400; guest is in user)
	if math.Abs(u.BusyPercent-60) > 1e-9 {
		t.Errorf("busy %.2f%%, want 60%%", u.BusyPercent)
	}
	sc := scenarioResult{Requests: 8000, CPU: u}
	sc.cpuPerOp(10 * time.Second)
	if got := sc.CPU.String(sc.cpuUnit()); got != "machine 60% busy over 10.0s; CPU per operation: postgres 500 µs tally (x) 62 µs" {
		t.Errorf("report line %q", got)
	}
	ev := scenarioResult{Requests: 8, Rate: 4000, RateUnit: unitEvents, CPU: between(a, p.snapshot(time.Unix(10, 0)))}
	ev.cpuPerOp(10 * time.Second)
	if ev.CPU.PerOpMicros["postgres"] != 100 || ev.cpuUnit() != "event" {
		t.Errorf("per event %v (%s), want postgres 100 µs per event", ev.CPU.PerOpMicros, ev.cpuUnit())
	}
	if newCPUProbe(t.TempDir(), []string{"postgres"}) != nil || newCPUProbe(dir, nil) != nil {
		t.Error("a probe without /proc/stat or without names")
	}
}

// drive measures the CPU of its window on the real /proc: this test's own
// process, spinning, shows.
func TestDriveTakesTheCPUOfItsWindow(t *testing.T) {
	data, err := os.ReadFile("/proc/self/stat")
	if err != nil {
		t.Fatalf("the CPU probe reads Linux's /proc, which this machine does not have: %v", err)
	}
	line := string(data)
	self := line[strings.IndexByte(line, '(')+1 : strings.LastIndexByte(line, ')')]
	r := drive(context.Background(), time.Now, 2, 20*time.Millisecond, 300*time.Millisecond, 1, newCPUProbe("/proc", []string{self}),
		func(ctx context.Context, w *worker) outcome {
			for end := time.Now().Add(time.Millisecond); time.Now().Before(end); {
			}
			return outcome{ok: true}
		})
	if r.cpu == nil || r.cpu.Seconds[self] <= 0 || r.cpu.Window < 0.25 || r.cpu.BusyPercent <= 0 {
		t.Fatalf("cpu of the window %+v, want this process's spinning in it", r.cpu)
	}
}
