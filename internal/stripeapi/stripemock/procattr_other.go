//go:build !linux

package stripemock

import "os/exec"

func setProcAttr(cmd *exec.Cmd) {}
