package main

import (
	"fmt"

	"github.com/spf13/cobra"

	"github.com/tidemark/tidemark/internal/buildinfo"
)

func versionCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "Print the version, VCS revision and Go version of this build",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			bi := buildinfo.Get()
			rev := bi.Revision
			if bi.Modified {
				rev += " (modified)"
			}
			fmt.Fprintf(cmd.OutOrStdout(), "tidemark %s\nrevision %s\n%s\n", bi.Version, rev, bi.GoVersion)
			return nil
		},
	}
}
