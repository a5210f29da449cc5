// estargz-build is the tests' bridge to stargz-snapshotter's own estargz package:
//
//	estargz-build TAR [PRIORITIZED,FILES] > blob      build with estargz.Build
//	                                                 (stderr: "<toc digest> <diff id>")
//	estargz-build --zstd-chunked TAR [PRIORITIZED]   the same with its zstdchunked compressor
//	  > blob                                         (stderr: "<toc digest> <diff id>
//	                                                 <manifest checksum> <manifest position>")
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
	"github.com/containerd/stargz-snapshotter/estargz/zstdchunked"
	"github.com/klauspost/compress/zstd"
	digest "github.com/opencontainers/go-digest"
)

func main() {
	if len(os.Args) > 1 && os.Args[1] == "--verify" {
		verify(os.Args[2], os.Args[3], os.Args[4:])
		return
	}
	args := os.Args[1:]
	var chunked *zstdchunked.Compressor
	opts := []estargz.Option{estargz.WithChunkSize(64 * 1024)}
	if args[0] == "--zstd-chunked" {
		args = args[1:]
		chunked = &zstdchunked.Compressor{
			CompressionLevel: zstd.SpeedDefault,
			Metadata:         map[string]string{},
		}
		opts = append(opts, estargz.WithCompression(zstdChunked{chunked, &zstdchunked.Decompressor{}}))
	}
	f, err := os.Open(args[0])
	if err != nil {
		panic(err)
	}
	st, _ := f.Stat()
	sr := io.NewSectionReader(f, 0, st.Size())
	if len(args) > 1 && args[1] != "" {
		opts = append(opts, estargz.WithPrioritizedFiles(strings.Split(args[1], ",")))
	}
	blob, err := estargz.Build(sr, opts...)
	if err != nil {
		panic(err)
	}
	defer blob.Close()
	io.Copy(os.Stdout, blob)
	fmt.Fprintf(os.Stderr, "%s %s", blob.TOCDigest(), blob.DiffID())
	if chunked != nil {
		fmt.Fprintf(os.Stderr, " %s %s",
			chunked.Metadata[zstdchunked.ManifestChecksumAnnotation],
			chunked.Metadata[zstdchunked.ManifestPositionAnnotation])
	}
	fmt.Fprintln(os.Stderr)
}

// zstdChunked is stargz-snapshotter's zstd:chunked compression (its package has the two
// halves; estargz.Build takes both).
type zstdChunked struct {
	*zstdchunked.Compressor
	*zstdchunked.Decompressor
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
