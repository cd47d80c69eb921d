// Package buildinfo says which build of Tidemark is running: the version
// stamped at build time (-ldflags "-X
// github.com/tidemark/tidemark/internal/buildinfo.version=1.2.3"), else the
// module version Go recorded, else Release with "-dev"; and the VCS
// revision Go recorded.
package buildinfo

import (
	"runtime"
	"runtime/debug"
	"sync"
)

// Release is the release this source tree is, or leads to.
const Release = "0.9.0"

// version is set by the linker; empty in a plain go build.
var version string

// Info is what a build records about itself.
type Info struct {
	Version   string // e.g. "0.9.0", or "0.9.0-dev"
	Revision  string // the VCS revision, "unknown" when not recorded
	Modified  bool   // the work tree had uncommitted changes
	GoVersion string
}

var (
	once sync.Once
	info Info
)

// Get returns this build's Info.
func Get() Info {
	once.Do(func() {
		info = Info{Version: version, Revision: "unknown", GoVersion: runtime.Version()}
		bi, ok := debug.ReadBuildInfo()
		if ok {
			if info.Version == "" && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
				info.Version = bi.Main.Version
			}
			for _, s := range bi.Settings {
				switch s.Key {
				case "vcs.revision":
					info.Revision = s.Value
				case "vcs.modified":
					info.Modified = s.Value == "true"
				}
			}
		}
		if info.Version == "" {
			info.Version = Release + "-dev"
		}
	})
	return info
}

// Version is Get().Version.
func Version() string { return Get().Version }
