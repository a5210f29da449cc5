package main

import (
	"io"
	"os"
	"fmt"
	"github.com/containerd/stargz-snapshotter/estargz"
)

func main() {
	f, err := os.Open(os.Args[1])
	if err != nil { panic(err) }
	st, _ := f.Stat()
	sr := io.NewSectionReader(f, 0, st.Size())
	blob, err := estargz.Build(sr, estargz.WithChunkSize(64*1024))
	if err != nil { panic(err) }
	defer blob.Close()
	io.Copy(os.Stdout, blob)
	fmt.Fprintf(os.Stderr, "%s %s\n", blob.TOCDigest(), blob.DiffID())
}
