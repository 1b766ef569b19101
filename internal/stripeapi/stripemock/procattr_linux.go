package stripemock

import (
	"os/exec"
	"syscall"
)

// setProcAttr has the kernel kill stripe-mock when the test binary dies, so
// an interrupted `go test` leaves no stray server behind.
func setProcAttr(cmd *exec.Cmd) {
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}
