//go:build linux

package main

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"os/signal"
	"sync"
	"syscall"
)

// forwarded are the signals that end a command: Ctrl-C, Ctrl-\, kill, a
// closed terminal.
var forwarded = []os.Signal{syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP, syscall.SIGQUIT}

// forwarder catches the signals that would end tally-devdb. Before the
// command runs, the first one cancels the preparation; while it runs, each
// goes to the command's process group (exactly once: the command has its own
// group, so a Ctrl-C at the terminal reaches it only through here); after it
// has ended they are ignored, so the server is always stopped.
type forwarder struct {
	sigs   chan os.Signal
	cancel context.CancelFunc
	done   chan struct{}

	mu    sync.Mutex
	pgid  int
	first os.Signal
}

func newForwarder(cancel context.CancelFunc) *forwarder {
	f := &forwarder{sigs: make(chan os.Signal, 8), cancel: cancel, done: make(chan struct{})}
	signal.Notify(f.sigs, forwarded...)
	go f.loop()
	return f
}

func (f *forwarder) loop() {
	defer close(f.done)
	for sig := range f.sigs {
		f.mu.Lock()
		if f.first == nil {
			f.first = sig
		}
		if f.pgid != 0 {
			_ = syscall.Kill(-f.pgid, sig.(syscall.Signal))
		} else {
			f.cancel()
		}
		f.mu.Unlock()
	}
}

// attach sends the signals to process group pgid from now on; detach stops.
func (f *forwarder) attach(pgid int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.pgid = pgid
}

func (f *forwarder) detach() { f.attach(0) }

// received is the first signal caught, or nil.
func (f *forwarder) received() os.Signal {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.first
}

func (f *forwarder) close() {
	signal.Stop(f.sigs)
	close(f.sigs)
	<-f.done
}

// runCommand runs args with env in a process group of its own and returns
// its exit status. The kernel sends it SIGTERM should tally-devdb die first,
// so it never runs on without its database.
func runCommand(args, env []string, fw *forwarder, say func(string, ...any)) int {
	cmd := exec.Command(args[0], args[1:]...)
	cmd.Env = env
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGTERM}
	// Attach under the forwarder's lock, so a signal that arrives while the
	// command starts is either forwarded or, before the start, cancels it.
	fw.mu.Lock()
	if fw.first != nil {
		fw.mu.Unlock()
		return signalStatus(fw.first)
	}
	err := cmd.Start()
	if err == nil {
		fw.pgid = cmd.Process.Pid
	}
	fw.mu.Unlock()
	if err != nil {
		say("%v", err)
		if errors.Is(err, exec.ErrNotFound) || errors.Is(err, os.ErrNotExist) {
			return 127
		}
		return 126
	}
	err = cmd.Wait()
	fw.detach()
	if err == nil {
		return 0
	}
	var exit *exec.ExitError
	if !errors.As(err, &exit) {
		say("%v", err)
		return 1
	}
	if ws, ok := exit.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		return signalStatus(ws.Signal())
	}
	return exit.ExitCode()
}

// signalStatus is the shell's exit status for a process ended by sig.
func signalStatus(sig os.Signal) int {
	if s, ok := sig.(syscall.Signal); ok {
		return 128 + int(s)
	}
	return 1
}
