// Package freeport finds a free TCP port on 127.0.0.1 for the throwaway
// servers of tests, the demo and the bench.
package freeport

import (
	"fmt"
	"net"
)

// Get returns a port that was free a moment ago (the caller binds it soon
// after; another process could take it in between).
func Get() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("finding a free port: %w", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}
