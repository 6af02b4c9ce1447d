// Command corpus is the program the end-to-end tests build through the
// sidecar. It only exists to pull a realistic module graph (logging, CLI,
// testing helpers, UUIDs, text processing) through a GOPROXY.
package main

import (
	"fmt"
	"os"

	"github.com/google/uuid"
	"github.com/sirupsen/logrus"
	"github.com/spf13/cobra"
	"github.com/stretchr/testify/assert"
	"golang.org/x/text/cases"
	"golang.org/x/text/language"
)

// recorder satisfies assert.TestingT so assert can check a value outside a test.
type recorder struct{ failed bool }

func (r *recorder) Errorf(format string, args ...interface{}) { r.failed = true }

func main() {
	root := &cobra.Command{
		Use:   "corpus",
		Short: "Prints a greeting with a fresh UUID",
		RunE: func(cmd *cobra.Command, args []string) error {
			id := uuid.New()
			greeting := cases.Title(language.English).String("hello from the corpus")
			var r recorder
			assert.NotEqual(&r, uuid.Nil, id)
			logrus.WithField("id", id.String()).Info(greeting)
			if r.failed {
				return fmt.Errorf("uuid.New returned the nil UUID")
			}
			return nil
		},
	}
	if err := root.Execute(); err != nil {
		os.Exit(1)
	}
}
