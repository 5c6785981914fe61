package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/urfave/cli/v3"

	"github.com/thin-snapshotter/thin-snapshotter/cmd/thin-snapshotter/config"
	"github.com/thin-snapshotter/thin-snapshotter/snapshotter"
)

// Exit statuses of the check command.
const (
	checkClean    = 0
	checkProblems = 1
	checkError    = 2
)

// exitStatus carries an exit status out of an action. It deliberately does
// not implement cli.ExitCoder, which would make the cli call os.Exit itself.
type exitStatus struct {
	code int
	err  error // printed by run; nil when the action printed everything
}

func (e *exitStatus) Error() string {
	if e.err == nil {
		return fmt.Sprintf("exit status %d", e.code)
	}
	return e.err.Error()
}

func (e *exitStatus) Unwrap() error { return e.err }

// checker is what the check command needs of the snapshotter; tests pass
// their own opener.
type checker interface {
	Check(ctx context.Context, opts snapshotter.CheckOptions) (*snapshotter.Report, error)
	Close() error
}

// checkOpener opens the snapshotter state for a check; production is
// snapshotter.OpenForCheck.
type checkOpener func(ctx context.Context, cfg snapshotter.Config) (checker, error)

// openChecker is a variable so tests can check without a kernel.
var openChecker checkOpener = func(ctx context.Context, cfg snapshotter.Config) (checker, error) {
	return snapshotter.OpenForCheck(ctx, cfg)
}

// checkDescription is the help text of the check command.
const checkDescription = "Run with the daemon stopped (it holds the database). Uses the same --config and\n" +
	"--root as the daemon. Lists the thin devices of the pool from a metadata snapshot\n" +
	"(thin_ls or thin_dump of thin-provisioning-tools), the dm devices, the records\n" +
	"and the journal, and reports:\n" +
	"  orphan          thin device in the pool that no record, journal entry or base explains\n" +
	"  ghost           record whose thin device is gone from the pool (data lost)\n" +
	"  base_missing    the base device is gone from the pool\n" +
	"  wrong_device    the dm device of a snapshot maps another id, pool, size or mode\n" +
	"  stale_device    dm device named like ours that no active snapshot or view needs\n" +
	"  missing_device  active snapshot or view without its dm device\n" +
	"  pending_journal operation a crash interrupted\n" +
	"  not_ready       record left creating or removing with no operation pending\n" +
	"  leaked_id       device id allocated to nothing and not in the pool\n" +
	"  foreign_id      thin id the pool already had when a create tried it (not ours)\n" +
	"  id_conflict     record whose id is not allocated to it, or shared (needs a person)\n" +
	"  txid_mismatch   the pool's transaction id is not the database's\n" +
	"  pool_unhealthy  pool failed, read-only or needing thin_check (needs a person)\n" +
	"\n" +
	"--repair runs the startup recovery for pending entries, removes stale and wrong dm\n" +
	"devices that are not open, removes records left half-made, deletes orphans, releases\n" +
	"leaked ids, activates missing devices and remakes a missing base, then checks again.\n" +
	"Ghosts are only reported (their data is gone); --remove-ghosts also removes their\n" +
	"records. Foreign ids are kept (never used, never deleted) unless --release-foreign:\n" +
	"it deletes their devices from the pool (say so only when nobody needs them) and\n" +
	"frees the ids. Nothing is repaired when the pool may not be this database's (transaction\n" +
	"ids that pending operations do not explain) or when it is unhealthy.\n" +
	"\n" +
	"Exit status: 0 clean (also: everything repaired), 1 problems found or left after\n" +
	"--repair, 2 the check could not run (e.g. the daemon is running).\n" +
	"--json prints one report object; its fields are documented on snapshotter.Report.\n" +
	"\n" +
	"--online asks the running daemon (--address) instead: the same report, read-only,\n" +
	"from a metadata snapshot and a read transaction while it serves. It checks twice\n" +
	"and reports what both passes found, so operations in flight are not findings.\n" +
	"\n" +
	"The daemon also checks itself every check_interval and after a start whose\n" +
	"recovery did something, finishing pending removals and releasing leaked ids as\n" +
	"it goes; `thin-snapshotter status` shows its last check."

func checkCommand(open checkOpener) *cli.Command {
	return &cli.Command{
		Name:        "check",
		Usage:       "compare the database with the thin pool; --repair fixes what is safe",
		Description: checkDescription,
		Flags: []cli.Flag{
			&cli.BoolFlag{Name: "repair", Usage: "fix what is safe to fix"},
			&cli.BoolFlag{Name: "remove-ghosts", Usage: "with --repair: remove records whose thin device is gone"},
			&cli.BoolFlag{Name: "release-foreign", Usage: "with --repair: delete devices of foreign thin ids from the pool and free the ids"},
			&cli.BoolFlag{Name: "json", Usage: "print the report as JSON"},
			&cli.BoolFlag{Name: "online", Usage: "check the running daemon's state, read-only"},
		},
		Action: func(ctx context.Context, cmd *cli.Command) error {
			return checkAction(ctx, cmd, open)
		},
	}
}

// checkAction runs the online or the offline check that cmd asks for.
// Every error it returns carries the check's exit status.
func checkAction(ctx context.Context, cmd *cli.Command, open checkOpener) error {
	if err := checkFlags(cmd); err != nil {
		return &exitStatus{code: checkError, err: err}
	}
	if cmd.Bool("online") {
		return exitWith(runOnlineCheck(ctx, cmd, cmd.Bool("json"), cmd.Root().Writer))
	}
	cfg, err := resolveConfig(cmd)
	if err != nil {
		return &exitStatus{code: checkError, err: err}
	}
	opts := snapshotter.CheckOptions{Repair: cmd.Bool("repair"), RemoveGhosts: cmd.Bool("remove-ghosts"), ReleaseForeign: cmd.Bool("release-foreign")}
	return exitWith(runCheck(ctx, cfg, open, opts, cmd.Bool("json"), cmd.Root().Writer))
}

// checkFlags refuses arguments, and flags that need another flag or
// exclude one.
func checkFlags(cmd *cli.Command) error {
	if err := noArgs(cmd); err != nil {
		return err
	}
	if cmd.Bool("remove-ghosts") && !cmd.Bool("repair") {
		return errors.New("--remove-ghosts needs --repair")
	}
	if cmd.Bool("release-foreign") && !cmd.Bool("repair") {
		return errors.New("--release-foreign needs --repair")
	}
	if cmd.Bool("online") && cmd.Bool("repair") {
		return errors.New("--repair needs the daemon stopped: it cannot be --online")
	}
	return nil
}

// exitWith turns a check's exit status and error into the action's error:
// nil when the check found nothing and failed in nothing.
func exitWith(code int, err error) error {
	if err != nil || code != checkClean {
		return &exitStatus{code: code, err: err}
	}
	return nil
}

// runCheck checks (and repairs) the state under cfg.Root and prints the
// report; it returns the exit status.
func runCheck(ctx context.Context, cfg *config.Config, open checkOpener, opts snapshotter.CheckOptions, asJSON bool, w io.Writer) (int, error) {
	if _, err := os.Stat(cfg.Root); err != nil {
		return checkError, fmt.Errorf("root %s: %w", cfg.Root, err)
	}
	// Take the daemon's lock: it fails while a daemon runs, and keeps a
	// daemon from starting while the check runs.
	unlock, err := lockRoot(cfg.Root)
	if err != nil {
		return checkError, fmt.Errorf("the daemon is running: stop it first (%w)", err)
	}
	defer unlock()
	s, err := open(ctx, cfg.Snapshotter())
	if err != nil {
		return checkError, err
	}
	r, err := s.Check(ctx, opts)
	if cerr := s.Close(); err == nil && cerr != nil {
		err = fmt.Errorf("closing: %w", cerr)
	}
	if r == nil {
		return checkError, err
	}
	if perr := printCheckReport(w, r, asJSON); perr != nil {
		return checkError, perr
	}
	switch {
	case err != nil:
		return checkError, err
	case !r.Clean:
		return checkProblems, nil
	}
	return checkClean, nil
}

// printCheckReport prints the report of an offline or an online check, as
// JSON or as text.
func printCheckReport(w io.Writer, r *snapshotter.Report, asJSON bool) error {
	if !asJSON {
		printReport(w, r)
		return nil
	}
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(r)
}

// printReport prints r as text: a summary line, one line per finding (and
// what repair did or would do), and a verdict.
func printReport(w io.Writer, r *snapshotter.Report) {
	fmt.Fprintf(w, "pool %s: %d thin devices, %d records, transaction id %d (database %d)\n",
		r.Pool, len(r.PoolDevices), r.Records, r.PoolTransactionID, r.DBTransactionID)
	for _, f := range r.Findings {
		fmt.Fprintf(w, "%-16s %s\n", f.Kind, f.Message)
		switch {
		case f.Repaired:
			fmt.Fprintf(w, "%16s repaired: %s\n", "", f.Action)
		case f.Error != "":
			fmt.Fprintf(w, "%16s repair failed: %s: %s\n", "", f.Action, f.Error)
		case f.Action != "":
			fmt.Fprintf(w, "%16s %s\n", "", f.Action)
		}
	}
	if r.Repair {
		var left []string
		for _, f := range r.Remaining {
			left = append(left, fmt.Sprintf("%s (%s)", f.Kind, f.Message))
		}
		switch {
		case len(r.Findings) == 0 && r.Clean:
			fmt.Fprintln(w, "clean: nothing to repair")
		case r.Clean:
			fmt.Fprintf(w, "repaired: %s fixed, clean now\n", problems(len(r.Findings)))
		default:
			fmt.Fprintf(w, "needs a person: %s left after repair:\n  %s\n", problems(len(r.Remaining)), strings.Join(left, "\n  "))
		}
		return
	}
	repairable := 0
	for _, f := range r.Findings {
		if f.Repairable {
			repairable++
		}
	}
	switch {
	case r.Clean:
		fmt.Fprintln(w, "clean")
	case repairable == len(r.Findings):
		fmt.Fprintf(w, "%s found; --repair fixes them\n", problems(len(r.Findings)))
	default:
		fmt.Fprintf(w, "%s found; --repair fixes %d, %d need a person\n", problems(len(r.Findings)), repairable, len(r.Findings)-repairable)
	}
}

// problems is "1 problem" or "N problems".
func problems(n int) string {
	if n == 1 {
		return "1 problem"
	}
	return fmt.Sprintf("%d problems", n)
}
