package main

import (
	"runtime/debug"
)

// Set at build time by `make build` (-ldflags -X main.version=... -X
// main.commit=...); empty in a plain `go build`, where buildVersion falls
// back to what the toolchain recorded.
var (
	version string
	commit  string
)

// buildVersion returns the version and commit of this binary: the ones set
// at build time, else the module version and VCS revision of the build
// info ("(devel)" and "unknown" when there are none).
func buildVersion() (v, c string) {
	v, c = version, commit
	if info, ok := debug.ReadBuildInfo(); ok {
		if v == "" {
			v = info.Main.Version
		}
		if c == "" {
			c = vcsRevision(info.Settings)
		}
	}
	return orDefault(v, "(devel)"), orDefault(c, "unknown")
}

// vcsRevision is the commit the go command stamped, "-dirty" when the tree
// had changes.
func vcsRevision(settings []debug.BuildSetting) string {
	rev, dirty := "", false
	for _, s := range settings {
		switch s.Key {
		case "vcs.revision":
			rev = s.Value
		case "vcs.modified":
			dirty = s.Value == "true"
		}
	}
	if rev != "" && dirty {
		rev += "-dirty"
	}
	return rev
}

func orDefault(s, def string) string {
	if s == "" {
		return def
	}
	return s
}
