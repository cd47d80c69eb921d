package buildinfo

import (
	"runtime"
	"testing"
)

func TestGet(t *testing.T) {
	bi := Get()
	if bi.Version != Release+"-dev" || bi.GoVersion != runtime.Version() || bi.Revision == "" {
		t.Errorf("Get() = %+v, want version %s-dev (a test binary carries no stamp) and the Go version", bi, Release)
	}
}
