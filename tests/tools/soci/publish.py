#!/usr/bin/env python3
"""Publish SOCI zTOCs for an image in a registry, the way soci-snapshotter's tools lay them out.

Independent of ocifs on purpose: checkpoints come from the system zlib (through ctypes, the
zran.c algorithm SOCI's own C builder uses), the file list from Python's tarfile, span digests
from hashlib, and the FlatBuffers encoding from Google's flatc with the zTOC schema beside this
script. Only 127.0.0.1 registries over plain HTTP are supported (it is a test tool).

usage: publish.py REGISTRY REPO TAG --soci v1|v2 [--span N] [--damage none|span-digest|truncate|window]
  v1: a SOCI index manifest with `subject`, listed under the referrers tag sha256-<hex>.
  v2: the image manifest gains the com.amazon.soci.index-digest annotation and is pushed, with
      the SOCI index next to it in an image index, as TAG-soci.
Prints the digest of what a mount should use (the image index for v2, the manifest for v1).
"""

import argparse
import ctypes
import ctypes.util
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zlib
from datetime import datetime, timezone

WIN = 32768
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
V1 = "application/vnd.amazon.soci.index.v1+json"
V2 = "application/vnd.amazon.soci.index.v2+json"


class ZStream(ctypes.Structure):
    _fields_ = [
        ("next_in", ctypes.c_void_p), ("avail_in", ctypes.c_uint), ("total_in", ctypes.c_ulong),
        ("next_out", ctypes.c_void_p), ("avail_out", ctypes.c_uint), ("total_out", ctypes.c_ulong),
        ("msg", ctypes.c_char_p), ("state", ctypes.c_void_p), ("zalloc", ctypes.c_void_p),
        ("zfree", ctypes.c_void_p), ("opaque", ctypes.c_void_p), ("data_type", ctypes.c_int),
        ("adler", ctypes.c_ulong), ("reserved", ctypes.c_ulong),
    ]


def checkpoints(blob, span):
    """zran: a resume point at a deflate block end once `span` output bytes have passed."""
    z = ctypes.CDLL(ctypes.util.find_library("z"))
    z.zlibVersion.restype = ctypes.c_char_p
    strm = ZStream()
    if z.inflateInit2_(ctypes.byref(strm), 47, z.zlibVersion(), ctypes.sizeof(ZStream)) != 0:
        sys.exit("inflateInit2 failed")
    inbuf = ctypes.create_string_buffer(blob, len(blob))
    window = ctypes.create_string_buffer(WIN)
    strm.next_in, strm.avail_in = ctypes.addressof(inbuf), len(blob)
    totin = totout = last = 0
    points = []
    while True:
        if strm.avail_out == 0:
            strm.next_out, strm.avail_out = ctypes.addressof(window), WIN
        totin += strm.avail_in
        totout += strm.avail_out
        ret = z.inflate(ctypes.byref(strm), 5)  # Z_BLOCK
        totin -= strm.avail_in
        totout -= strm.avail_out
        if ret == 1:  # Z_STREAM_END
            break
        if ret != 0:
            sys.exit(f"inflate failed: {ret}")
        dt = strm.data_type
        if dt & 128 and not dt & 64 and (totout == 0 or totout - last > span):
            left = strm.avail_out
            w = window.raw
            points.append((totin, totout, dt & 7, w[WIN - left:] + w[:WIN - left]))
            last = totout
    z.inflateEnd(ctypes.byref(strm))
    return points


def rfc3339(ti):
    raw = ti.pax_headers.get("mtime")
    secs, frac = (raw.split(".") + [""])[:2] if raw else (str(int(ti.mtime)), "")
    frac = frac[:9].rstrip("0")
    t = datetime.fromtimestamp(int(secs), timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    return t + ("." + frac if frac else "") + "Z"


TYPES = {tarfile.REGTYPE: "reg", tarfile.AREGTYPE: "reg", tarfile.DIRTYPE: "dir",
         tarfile.SYMTYPE: "symlink", tarfile.LNKTYPE: "hardlink", tarfile.CHRTYPE: "char",
         tarfile.BLKTYPE: "block", tarfile.FIFOTYPE: "fifo"}


def toc(tar_bytes):
    out = []
    with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:") as t:
        for ti in t:
            out.append({
                "name": ti.name, "type": TYPES[ti.type],
                "uncompressed_offset": ti.offset_data,
                "uncompressed_size": ti.size if ti.type in (tarfile.REGTYPE, tarfile.AREGTYPE) else 0,
                "linkname": ti.linkname, "mode": ti.mode, "uid": ti.uid, "gid": ti.gid,
                "uname": ti.uname, "gname": ti.gname, "mod_time": rfc3339(ti),
                "devmajor": ti.devmajor, "devminor": ti.devminor,
                "xattrs": [{"key": k, "value": v} for k, v in sorted(ti.pax_headers.items())],
            })
    return out


def ztoc(blob, span, damage):
    points = checkpoints(blob, span)
    digests = []
    for i, (inp, _, bits, _) in enumerate(points):
        start = inp - (1 if bits else 0)
        end = points[i + 1][0] if i + 1 < len(points) else len(blob)
        digests.append("sha256:" + hashlib.sha256(blob[start:end]).hexdigest())
    if damage == "span-digest":
        digests[-1] = "sha256:" + "0" * 64
    if damage == "window":
        # Every window past the first altered: span digests still match the compressed
        # bytes, but back references across a span start now decode to other bytes.
        points = points[:1] + [(i, o, b, bytes(x ^ 0x55 for x in w)) for i, o, b, w in points[1:]]
    zinfo = len(points).to_bytes(4, "little") + span.to_bytes(8, "little")
    for inp, out, bits, w in points:
        zinfo += inp.to_bytes(8, "little") + out.to_bytes(8, "little") + bytes([bits]) + w
    tar_bytes = zlib.decompress(blob, 47)
    doc = {
        "version": "0.9", "build_tool_identifier": "ocifs tests (zlib + tarfile + flatc)",
        "compressed_archive_size": len(blob), "uncompressed_archive_size": len(tar_bytes),
        "toc": {"metadata": toc(tar_bytes)},
        "compression_info": {"max_span_id": len(points) - 1, "span_digests": digests,
                             "checkpoints": list(zinfo)},
    }
    schema = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ztoc.fbs")
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "ztoc.json")
        with open(src, "w") as f:
            json.dump(doc, f)
        subprocess.run(["flatc", "-b", "-o", d, schema, src], check=True)
        with open(os.path.join(d, "ztoc.bin"), "rb") as f:
            data = f.read()
    if damage == "truncate":
        data = data[: len(data) // 2]
    return data, len(points)


class Registry:
    def __init__(self, host, repo):
        self.base, self.repo = f"http://{host}/v2/{repo}", repo

    def get(self, path, accept=None):
        req = urllib.request.Request(self.base + path, headers={"Accept": accept} if accept else {})
        with urllib.request.urlopen(req) as r:
            return r.read()

    def blob(self, data):
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        req = urllib.request.Request(self.base + "/blobs/uploads/", method="POST")
        with urllib.request.urlopen(req) as r:
            loc = r.headers["Location"]
        if loc.startswith("/"):
            loc = self.base.split("/v2/")[0] + loc
        loc += ("&" if "?" in loc else "?") + "digest=" + digest
        req = urllib.request.Request(loc, data=data, method="PUT",
                                     headers={"Content-Type": "application/octet-stream"})
        urllib.request.urlopen(req).read()
        return {"digest": digest, "size": len(data)}

    def manifest(self, ref, doc, media_type):
        body = json.dumps(doc).encode()
        req = urllib.request.Request(self.base + "/manifests/" + ref, data=body, method="PUT",
                                     headers={"Content-Type": media_type})
        urllib.request.urlopen(req).read()
        return {"mediaType": media_type, "digest": "sha256:" + hashlib.sha256(body).hexdigest(),
                "size": len(body)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("registry")
    p.add_argument("repo")
    p.add_argument("tag")
    p.add_argument("--soci", choices=["v1", "v2"], required=True)
    p.add_argument("--span", type=int, default=1 << 22)
    p.add_argument("--damage", choices=["none", "span-digest", "truncate", "window"], default="none")
    a = p.parse_args()
    reg = Registry(a.registry, a.repo)
    raw = reg.get("/manifests/" + a.tag, OCI_MANIFEST)
    image = json.loads(raw)
    image_desc = {"mediaType": OCI_MANIFEST, "digest": "sha256:" + hashlib.sha256(raw).hexdigest(),
                  "size": len(raw)}
    ztocs = []
    for layer in image["layers"]:
        if not layer["mediaType"].endswith("gzip"):
            continue
        data, spans = ztoc(reg.get("/blobs/" + layer["digest"]), a.span, a.damage)
        desc = reg.blob(data)
        desc.update({"mediaType": "application/octet-stream", "annotations": {
            "com.amazon.soci.image-layer-digest": layer["digest"],
            "com.amazon.soci.image-layer-mediaType": layer["mediaType"]}})
        ztocs.append(desc)
        print(f"zTOC of {layer['digest']}: {spans} spans, {len(data)} bytes", file=sys.stderr)
    kind = V1 if a.soci == "v1" else V2
    config = reg.blob(b"{}")
    config["mediaType"] = kind
    index = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config, "layers": ztocs,
             "annotations": {"com.amazon.soci.build-tool-identifier": "ocifs tests"}}
    if a.soci == "v1":
        index["subject"] = image_desc
        soci = reg.manifest("soci-v1", index, OCI_MANIFEST)
        soci["artifactType"] = V1
        tag = "sha256-" + image_desc["digest"].split(":")[1]
        reg.manifest(tag, {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [soci]},
                     OCI_INDEX)
        print(image_desc["digest"])
        return
    soci = reg.manifest("soci-v2-index", index, OCI_MANIFEST)
    image.setdefault("annotations", {})["com.amazon.soci.index-digest"] = soci["digest"]
    enabled = reg.manifest("soci-v2-image", image, OCI_MANIFEST)
    platform = {"os": "linux", "architecture": "amd64"}
    soci.update({"artifactType": V2, "platform": platform,
                 "annotations": {"com.amazon.soci.image-manifest-digest": enabled["digest"]}})
    enabled["platform"] = platform
    # The SOCI index first: a reader that treats it as an image for the platform is wrong.
    top = reg.manifest(a.tag + "-soci", {"schemaVersion": 2, "mediaType": OCI_INDEX,
                                         "manifests": [soci, enabled]}, OCI_INDEX)
    print(top["digest"])


if __name__ == "__main__":
    main()
