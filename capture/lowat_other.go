//go:build !linux

package capture

import (
	"errors"
	"net"
)

// setRecvLowat is Linux-only; elsewhere coalescing waits without it.
func setRecvLowat(net.Conn, int) error {
	return errors.New("SO_RCVLOWAT: not supported on this platform")
}
