package capture

import (
	"errors"
	"net"
	"syscall"
)

// setRecvLowat sets the socket's SO_RCVLOWAT: Linux then neither wakes a
// waiting reader nor reports the socket readable until that many bytes are
// queued (a non-blocking read still returns whatever is there).
func setRecvLowat(c net.Conn, n int) error {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return errors.New("not a socket")
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := rc.Control(func(fd uintptr) {
		serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVLOWAT, n)
	}); err != nil {
		return err
	}
	return serr
}
