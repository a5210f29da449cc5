// estargz-build is the tests' bridge to stargz-snapshotter's own estargz package:
//
//	estargz-build TAR [PRIORITIZED,FILES] > blob      build with estargz.Build
//	                                                 (stderr: "<toc digest> <diff id>")
//	estargz-build --verify BLOB TOCDIGEST FILE...     open with estargz.Open, check the TOC
//	                                                 digest and every chunk digest of FILEs,
//	                                                 print "<sha256> <file>" per file
//
// so ocifs's reader is tested against the reference writer, and ocifs's writer against the
// reference reader.
package main

import (
	"crypto/sha256"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/containerd/stargz-snapshotter/estargz"
	digest "github.com/opencontainers/go-digest"
)

func main() {
	if len(os.Args) > 1 && os.Args[1] == "--verify" {
		verify(os.Args[2], os.Args[3], os.Args[4:])
		return
	}
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

func fail(format string, a ...interface{}) {
	fmt.Fprintf(os.Stderr, format+"\n", a...)
	os.Exit(1)
}

func verify(blobPath, tocDigest string, files []string) {
	f, err := os.Open(blobPath)
	if err != nil {
		fail("open: %v", err)
	}
	st, _ := f.Stat()
	r, err := estargz.Open(io.NewSectionReader(f, 0, st.Size()))
	if err != nil {
		fail("estargz.Open: %v", err)
	}
	v, err := r.VerifyTOC(digest.Digest(tocDigest))
	if err != nil {
		fail("VerifyTOC: %v", err)
	}
	for _, name := range files {
		e, ok := r.Lookup(name)
		if !ok {
			fail("%s: not in the TOC", name)
		}
		fr, err := r.OpenFile(name)
		if err != nil {
			fail("%s: OpenFile: %v", name, err)
		}
		for off := int64(0); off < e.Size; {
			ce, ok := r.ChunkEntryForOffset(name, off)
			if !ok {
				fail("%s: no chunk at %d", name, off)
			}
			cv, err := v.Verifier(ce)
			if err != nil {
				fail("%s: verifier: %v", name, err)
			}
			if _, err := io.Copy(cv, io.NewSectionReader(fr, ce.ChunkOffset, ce.ChunkSize)); err != nil {
				fail("%s: read chunk: %v", name, err)
			}
			if !cv.Verified() {
				fail("%s: chunk at %d does not match its digest", name, ce.ChunkOffset)
			}
			off = ce.ChunkOffset + ce.ChunkSize
		}
		h := sha256.New()
		if _, err := io.Copy(h, fr); err != nil {
			fail("%s: read: %v", name, err)
		}
		fmt.Printf("%x %s\n", h.Sum(nil), name)
	}
}
