// estargz-build converts a tar into an eStargz blob with stargz-snapshotter's own
// estargz.Build, so ocifs's reader is tested against the reference writer.
//
//	estargz-build TAR [PRIORITIZED,FILES] > blob   (stderr: "<toc digest> <diff id>")
package main

import (
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/containerd/stargz-snapshotter/estargz"
)

func main() {
	f, err := os.Open(os.Args[1])
	if err != nil {
		panic(err)
	}
	st, _ := f.Stat()
	sr := io.NewSectionReader(f, 0, st.Size())
	opts := []estargz.Option{estargz.WithChunkSize(64 * 1024)}
	if len(os.Args) > 2 && os.Args[2] != "" {
		opts = append(opts, estargz.WithPrioritizedFiles(strings.Split(os.Args[2], ",")))
	}
	blob, err := estargz.Build(sr, opts...)
	if err != nil {
		panic(err)
	}
	defer blob.Close()
	io.Copy(os.Stdout, blob)
	fmt.Fprintf(os.Stderr, "%s %s\n", blob.TOCDigest(), blob.DiffID())
}
