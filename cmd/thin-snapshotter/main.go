// Command thin-snapshotter is a containerd proxy snapshotter that keeps
// snapshots as thin devices in a device-mapper thin pool.
//
//	thin-snapshotter [--config FILE] [--root DIR] [--address SOCKET] [--log-level LEVEL]
//	thin-snapshotter config default
//	thin-snapshotter check [--repair [--remove-ghosts] [--release-foreign]] [--json]
//	thin-snapshotter check --online [--json]
//	thin-snapshotter status [--json] | devices [--json] | cleanup
//	thin-snapshotter --version
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

	"github.com/urfave/cli/v3"

	"github.com/thin-snapshotter/thin-snapshotter/cmd/thin-snapshotter/config"
)

// defaultConfigPath is a variable so tests can point it elsewhere.
var defaultConfigPath = config.DefaultPath

func main() {
	os.Exit(run(os.Args, openSnapshotter, os.Stdout, os.Stderr))
}

// run is main with the snapshotter factory and output as parameters; it
// returns the exit code.
func run(args []string, open snapshotterFactory, stdout, stderr io.Writer) int {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	go func() {
		// Once the first signal has cancelled ctx, stop restores the
		// default handling, so that a second signal kills at once.
		<-ctx.Done()
		stop()
	}()
	app := newApp(func(ctx context.Context, cfg *config.Config) error {
		return serve(ctx, cfg, open, defaultServeOptions())
	}, stdout, stderr)
	if err := app.Run(ctx, args); err != nil {
		// The check command chooses its own exit status.
		if es, ok := errors.AsType[*exitStatus](err); ok {
			if es.err != nil {
				fmt.Fprintf(stderr, "thin-snapshotter: %v\n", es.err)
			}
			return es.code
		}
		fmt.Fprintf(stderr, "thin-snapshotter: %v\n", err)
		return 1
	}
	return 0
}

// newApp builds the command line; run is what the root command does with
// the resolved, validated configuration.
func newApp(run func(context.Context, *config.Config) error, stdout, stderr io.Writer) *cli.Command {
	return &cli.Command{
		Name:  "thin-snapshotter",
		Usage: "containerd snapshotter on device-mapper thin provisioning",
		Description: "Without a subcommand, serves containerd's snapshots API on a unix socket\n" +
			"(configure containerd with [proxy_plugins.<name>] type = \"snapshot\").\n" +
			"Flags override the configuration file.",
		Version:   versionString(),
		Writer:    stdout,
		ErrWriter: stderr,
		Flags: []cli.Flag{
			&cli.StringFlag{
				Name:    "config",
				Aliases: []string{"c"},
				Value:   defaultConfigPath,
				Usage:   "configuration `FILE`; the default path may be missing, a path given here must exist",
			},
			&cli.StringFlag{Name: "root", Usage: "state `DIR` (overrides root; default " + config.DefaultRoot + ")"},
			&cli.StringFlag{Name: "address", Aliases: []string{"a"}, Usage: "unix `SOCKET` to serve on, or of the daemon that status, devices, cleanup and check --online ask (overrides address; default " + config.DefaultAddress + ")"},
			&cli.StringFlag{Name: "log-level", Usage: "`LEVEL`: trace, debug, info, warn, error (overrides log_level)"},
		},
		Action: func(ctx context.Context, cmd *cli.Command) error {
			if err := noArgs(cmd); err != nil {
				return err
			}
			cfg, err := resolveConfig(cmd)
			if err != nil {
				return err
			}
			return run(ctx, cfg)
		},
		Commands: []*cli.Command{
			configCommand(), checkCommand(openChecker),
			statusCommand(), devicesCommand(), cleanupCommand(),
		},
	}
}

// resolveConfig loads the configuration file, applies the flags over it and
// validates the result.
func resolveConfig(cmd *cli.Command) (*config.Config, error) {
	path := cmd.String("config")
	cfg, err := config.LoadFile(path)
	if err != nil {
		// Only the default file may be absent: a path given on the command
		// line that does not exist is a mistake worth stopping for.
		if !errors.Is(err, os.ErrNotExist) || cmd.IsSet("config") {
			return nil, err
		}
		cfg = config.Default()
	}
	if cmd.IsSet("root") {
		cfg.Root = cmd.String("root")
	}
	if cmd.IsSet("address") {
		cfg.Address = cmd.String("address")
	}
	if cmd.IsSet("log-level") {
		cfg.LogLevel = cmd.String("log-level")
	}
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("invalid configuration (%s and flags):\n%w", path, err)
	}
	return cfg, nil
}

// noArgs refuses positional arguments: no command takes any.
func noArgs(cmd *cli.Command) error {
	if cmd.Args().Len() > 0 {
		return fmt.Errorf("unexpected argument %q (see --help)", cmd.Args().First())
	}
	return nil
}

// versionString is what --version prints after the name.
func versionString() string {
	v, c := buildVersion()
	return v + " (commit " + c + ")"
}

func configCommand() *cli.Command {
	return &cli.Command{
		Name:  "config",
		Usage: "configuration file helpers",
		Commands: []*cli.Command{{
			Name:  "default",
			Usage: "print the complete default configuration, with comments",
			Action: func(ctx context.Context, cmd *cli.Command) error {
				return config.Render(cmd.Root().Writer, config.Default())
			},
		}},
	}
}
