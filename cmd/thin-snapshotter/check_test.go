package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/thin-snapshotter/thin-snapshotter/snapshotter"
)

// fakeChecker returns canned reports: one for a plain check, one for a
// repair.
type fakeChecker struct {
	check, repair *snapshotter.Report
	err           error
	got           []snapshotter.CheckOptions
	closed        bool
}

func (f *fakeChecker) Check(_ context.Context, opts snapshotter.CheckOptions) (*snapshotter.Report, error) {
	f.got = append(f.got, opts)
	if opts.Repair {
		return f.repair, f.err
	}
	return f.check, f.err
}

func (f *fakeChecker) Close() error { f.closed = true; return nil }

// runCheckCLI runs the command line with openChecker returning fc (or
// failing with openErr) and returns the exit status and output.
func runCheckCLI(t *testing.T, fc *fakeChecker, openErr error, args ...string) (int, string, string, snapshotter.Config) {
	t.Helper()
	var opened snapshotter.Config
	old, oldCfg := openChecker, defaultConfigPath
	openChecker = func(_ context.Context, cfg snapshotter.Config) (checker, error) {
		opened = cfg
		if openErr != nil {
			return nil, openErr
		}
		return fc, nil
	}
	defaultConfigPath = filepath.Join(t.TempDir(), "missing.toml")
	defer func() { openChecker, defaultConfigPath = old, oldCfg }()
	var stdout, stderr bytes.Buffer
	code := run(append([]string{"thin-snapshotter"}, args...), nil, &stdout, &stderr)
	return code, stdout.String(), stderr.String(), opened
}

func TestCheckCommand(t *testing.T) {
	orphan := snapshotter.Finding{Kind: snapshotter.FindingOrphan, DeviceID: 9, Message: "thin device 9 is in the pool", Repairable: true}
	ghost := snapshotter.Finding{Kind: snapshotter.FindingGhost, DeviceID: 3, Key: "k", Message: "thin device 3 of k is gone"}
	fixed := orphan
	fixed.Repaired, fixed.Action = true, "deleted thin device 9"
	clean := &snapshotter.Report{Pool: "p", Findings: []snapshotter.Finding{}, Remaining: []snapshotter.Finding{}, Clean: true}
	found := &snapshotter.Report{Pool: "p", Findings: []snapshotter.Finding{orphan, ghost}, Remaining: []snapshotter.Finding{orphan, ghost}}
	repairedAll := &snapshotter.Report{Pool: "p", Repair: true, Findings: []snapshotter.Finding{fixed}, Remaining: []snapshotter.Finding{}, Clean: true}
	repairedSome := &snapshotter.Report{Pool: "p", Repair: true, Findings: []snapshotter.Finding{fixed, ghost}, Remaining: []snapshotter.Finding{ghost}}

	tests := []struct {
		name       string
		args       []string
		fc         *fakeChecker
		openErr    error
		wantCode   int
		wantOut    []string
		wantErr    string
		wantOpts   []snapshotter.CheckOptions
		wantClosed bool
	}{
		{name: "clean", args: []string{"check"}, fc: &fakeChecker{check: clean}, wantCode: 0,
			wantOut: []string{"pool p:", "clean"}, wantOpts: []snapshotter.CheckOptions{{}}, wantClosed: true},
		{name: "problems", args: []string{"check"}, fc: &fakeChecker{check: found}, wantCode: 1,
			wantOut:  []string{"orphan           thin device 9 is in the pool", "ghost            thin device 3 of k is gone", "2 problems found; --repair fixes 1, 1 need a person"},
			wantOpts: []snapshotter.CheckOptions{{}}, wantClosed: true},
		{name: "repair fixes all", args: []string{"check", "--repair"}, fc: &fakeChecker{repair: repairedAll}, wantCode: 0,
			wantOut:  []string{"repaired: deleted thin device 9", "repaired: 1 problem fixed, clean now"},
			wantOpts: []snapshotter.CheckOptions{{Repair: true}}, wantClosed: true},
		{name: "repair leaves a ghost", args: []string{"check", "--repair"}, fc: &fakeChecker{repair: repairedSome}, wantCode: 1,
			wantOut:  []string{"needs a person: 1 problem left after repair:", "ghost (thin device 3 of k is gone)"},
			wantOpts: []snapshotter.CheckOptions{{Repair: true}}, wantClosed: true},
		{name: "remove ghosts", args: []string{"check", "--repair", "--remove-ghosts"}, fc: &fakeChecker{repair: repairedAll}, wantCode: 0,
			wantOpts: []snapshotter.CheckOptions{{Repair: true, RemoveGhosts: true}}, wantClosed: true},
		{name: "remove ghosts needs repair", args: []string{"check", "--remove-ghosts"}, fc: &fakeChecker{}, wantCode: 2,
			wantErr: "--remove-ghosts needs --repair"},
		{name: "release foreign", args: []string{"check", "--repair", "--release-foreign"}, fc: &fakeChecker{repair: repairedAll}, wantCode: 0,
			wantOpts: []snapshotter.CheckOptions{{Repair: true, ReleaseForeign: true}}, wantClosed: true},
		{name: "release foreign needs repair", args: []string{"check", "--release-foreign"}, fc: &fakeChecker{}, wantCode: 2,
			wantErr: "--release-foreign needs --repair"},
		{name: "check fails", args: []string{"check"}, fc: &fakeChecker{err: errors.New("thin_ls exploded")}, wantCode: 2,
			wantErr: "thin_ls exploded", wantOpts: []snapshotter.CheckOptions{{}}, wantClosed: true},
		{name: "open fails", args: []string{"check"}, openErr: errors.New("the daemon is running (database in use): stop it first"), wantCode: 2,
			wantErr: "the daemon is running (database in use): stop it first"},
		{name: "argument", args: []string{"check", "extra"}, fc: &fakeChecker{}, wantCode: 2, wantErr: `unexpected argument "extra"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			root := t.TempDir()
			code, out, errOut, opened := runCheckCLI(t, tt.fc, tt.openErr, append([]string{"--root", root}, tt.args...)...)
			if code != tt.wantCode {
				t.Errorf("exit %d, want %d; stdout %q stderr %q", code, tt.wantCode, out, errOut)
			}
			for _, w := range tt.wantOut {
				if !strings.Contains(out, w) {
					t.Errorf("stdout lacks %q:\n%s", w, out)
				}
			}
			if tt.wantErr != "" && !strings.Contains(errOut, tt.wantErr) {
				t.Errorf("stderr %q lacks %q", errOut, tt.wantErr)
			}
			if tt.wantErr == "" && errOut != "" {
				t.Errorf("stderr %q", errOut)
			}
			if tt.fc != nil {
				if fmt.Sprint(tt.fc.got) != fmt.Sprint(tt.wantOpts) {
					t.Errorf("check options %v, want %v", tt.fc.got, tt.wantOpts)
				}
				if tt.fc.closed != tt.wantClosed {
					t.Errorf("closed %v, want %v", tt.fc.closed, tt.wantClosed)
				}
			}
			if tt.wantOpts != nil && opened.Root != root {
				t.Errorf("opened root %q, want %q", opened.Root, root)
			}
		})
	}
}

func TestCheckCommandJSON(t *testing.T) {
	fc := &fakeChecker{check: &snapshotter.Report{Pool: "p", PoolDevices: []uint32{1, 9},
		Findings:  []snapshotter.Finding{{Kind: snapshotter.FindingOrphan, DeviceID: 9, Message: "m", Repairable: true}},
		Remaining: []snapshotter.Finding{{Kind: snapshotter.FindingOrphan, DeviceID: 9, Message: "m", Repairable: true}}}}
	code, out, _, _ := runCheckCLI(t, fc, nil, "check", "--root", t.TempDir(), "--json")
	if code != 1 {
		t.Fatalf("exit %d", code)
	}
	// The documented shape, field by field: the soak test depends on it.
	var got map[string]any
	if err := json.Unmarshal([]byte(out), &got); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	for _, k := range []string{"root", "pool", "repair", "pool_transaction_id", "db_transaction_id", "base_device_id", "pool_devices", "records", "findings", "remaining", "clean"} {
		if _, ok := got[k]; !ok {
			t.Errorf("report lacks %q: %s", k, out)
		}
	}
	f := got["findings"].([]any)[0].(map[string]any)
	want := map[string]any{"kind": "orphan", "device_id": 9.0, "device": "", "key": "", "message": "m", "repairable": true, "action": "", "repaired": false, "error": ""}
	if fmt.Sprint(f) != fmt.Sprint(want) {
		t.Errorf("finding %v, want %v", f, want)
	}
	if got["clean"] != false {
		t.Errorf("clean %v", got["clean"])
	}
}

func TestCheckCommandDaemonRunning(t *testing.T) {
	root := t.TempDir()
	unlock, err := lockRoot(root)
	if err != nil {
		t.Fatal(err)
	}
	defer unlock()
	// flock is per open file: a second lock in this process conflicts too.
	code, _, errOut, _ := runCheckCLI(t, &fakeChecker{check: &snapshotter.Report{Clean: true}}, nil, "--root", root, "check")
	if code != 2 || !strings.Contains(errOut, "the daemon is running: stop it first") || !strings.Contains(errOut, fmt.Sprintf("process %d", os.Getpid())) {
		t.Errorf("exit %d, stderr %q", code, errOut)
	}
	code, _, errOut, _ = runCheckCLI(t, &fakeChecker{}, nil, "--root", filepath.Join(root, "missing"), "check")
	if code != 2 || !strings.Contains(errOut, "missing") {
		t.Errorf("missing root: exit %d, stderr %q", code, errOut)
	}
}
