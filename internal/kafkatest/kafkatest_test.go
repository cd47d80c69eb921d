package kafkatest

import (
	"errors"
	"net"
	"syscall"
	"testing"
)

// TestPortTakenIsRecognised: a start on a port another process holds fails
// with an error StartWith recognises as "address in use" and retries on
// fresh ports (the race between freeport.Get and the bind).
func TestPortTakenIsRecognised(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	cl := &Cluster{port: l.Addr().(*net.TCPAddr).Port}
	err = cl.start()
	if err == nil {
		cl.Close()
		t.Fatal("kfake started on a port that is in use")
	}
	if !errors.Is(err, syscall.EADDRINUSE) {
		t.Fatalf("error %v is not recognised as EADDRINUSE; StartWith would not retry", err)
	}
}
