//! Which files a starting program will open next.
//!
//! A process starts with a chain of dependent reads: the kernel reads the binary, the dynamic
//! loader it names (`PT_INTERP`) reads it again, then its cache `/etc/ld.so.cache`, then each
//! library it names, each of them a round trip on a cold mount. An ELF file's program headers
//! name the loader and its dynamic section lists the libraries (`DT_NEEDED`), so as soon as a
//! program's first bytes have been read, all of these can be found in the image and fetched in
//! the background, in parallel, before the loader asks for them. This reads only 64-bit little-endian ELF (x86_64, aarch64, riscv64
//! and the like); anything else, or anything malformed, predicts nothing.

/// A prediction never reads more than this from one file.
const MAX_TABLE: u64 = 1 << 20;
const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;
/// An interpreter path longer than this is not a path a loader would have.
const MAX_INTERP: u64 = 4096;
/// A library name longer than this is not looked for.
const MAX_NAME: u64 = 1024;
const DT_NEEDED: u64 = 1;
const DT_STRTAB: u64 = 5;
const DT_STRSZ: u64 = 10;

/// Whether `head` (a file's first bytes) starts a 64-bit little-endian ELF file.
pub fn is_elf64(head: &[u8]) -> bool {
    head.len() >= 64 && head.starts_with(b"\x7fELF") && head[4] == 2 && head[5] == 1
}

fn u16_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?) as u64)
}
fn u32_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?) as u64)
}
fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Whether `head` (a file's first bytes) starts an ELF program that a process runs (it names
/// an interpreter, or is a fixed-address executable) rather than a library or plugin.
pub fn is_executable(head: &[u8]) -> bool {
    if !is_elf64(head) {
        return false;
    }
    if u16_at(head, 0x10) == Some(2) {
        return true; // ET_EXEC
    }
    let (Some((off, len)), Some(size)) = (program_headers(head), program_header_size(head)) else {
        return false;
    };
    let phdrs = off
        .checked_add(len)
        .and_then(|end| head.get(usize::try_from(off).ok()?..usize::try_from(end).ok()?));
    phdrs
        .and_then(|p| segments(p, size))
        .is_some_and(|h| h.interp.is_some())
}

/// Where the program headers are: (offset, length) in the file.
pub fn program_headers(head: &[u8]) -> Option<(u64, u64)> {
    let (off, size, num) = (
        u64_at(head, 0x20)?,
        u16_at(head, 0x36)?,
        u16_at(head, 0x38)?,
    );
    (size >= 56 && num <= 256).then_some((off, size * num))
}

/// A loadable segment: file offset, virtual address, file size.
#[derive(Debug, Clone, Copy)]
pub struct Segment {
    offset: u64,
    vaddr: u64,
    size: u64,
}

/// What the program headers say: the loadable segments, and where the dynamic section and
/// the interpreter's path (the dynamic loader a program names) are, as (offset, length).
#[derive(Debug, Default)]
pub struct Headers {
    pub loads: Vec<Segment>,
    pub dynamic: Option<(u64, u64)>,
    pub interp: Option<(u64, u64)>,
}

/// Reads the program headers.
pub fn segments(phdrs: &[u8], entry_size: usize) -> Option<Headers> {
    if entry_size < 56 {
        return None;
    }
    let mut h = Headers::default();
    for p in phdrs.chunks_exact(entry_size) {
        let seg = Segment {
            offset: u64_at(p, 8)?,
            vaddr: u64_at(p, 16)?,
            size: u64_at(p, 32)?,
        };
        match u32_at(p, 0)? as u32 {
            PT_LOAD => h.loads.push(seg),
            PT_DYNAMIC => h.dynamic = Some((seg.offset, seg.size.min(MAX_TABLE))),
            PT_INTERP if seg.size <= MAX_INTERP => h.interp = Some((seg.offset, seg.size)),
            _ => {}
        }
    }
    Some(h)
}

/// The interpreter's path from the bytes PT_INTERP points at (NUL-terminated), if absolute.
pub fn interp_path(bytes: &[u8]) -> Option<String> {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    let path = std::str::from_utf8(&bytes[..end]).ok()?;
    (path.starts_with('/') && path.len() > 1).then(|| path.to_string())
}

/// Size of one program header, from the ELF header.
pub fn program_header_size(head: &[u8]) -> Option<usize> {
    Some(u16_at(head, 0x36)? as usize)
}

/// From the dynamic section: where in the file the `DT_NEEDED` names lie, as (offset, length)
/// of the part of the string table holding them, and each name's offset into that part. Only
/// that part is read: a large program's string table (python3.11 exports thousands of
/// symbols) runs far past its first pages, and the names are usually at its start.
pub fn needed_offsets(dynamic: &[u8], loads: &[Segment]) -> Option<((u64, u64), Vec<u64>)> {
    let (mut strtab, mut strsz, mut needed) = (None, None, Vec::new());
    for d in dynamic.chunks_exact(16) {
        let (tag, val) = (u64_at(d, 0)?, u64_at(d, 8)?);
        match tag {
            0 => break,
            DT_NEEDED => needed.push(val),
            DT_STRTAB => strtab = Some(val),
            DT_STRSZ => strsz = Some(val.min(MAX_TABLE)),
            _ => {}
        }
    }
    let addr = strtab?;
    let seg = loads
        .iter()
        .find(|s| s.vaddr <= addr && addr < s.vaddr + s.size)?;
    let (lo, hi) = (*needed.iter().min()?, *needed.iter().max()?);
    let end = hi.saturating_add(MAX_NAME).min(strsz?);
    let start = (addr - seg.vaddr)
        .checked_add(seg.offset)?
        .checked_add(lo)?;
    let relative = needed.iter().map(|o| o - lo).collect();
    Some(((start, end.saturating_sub(lo)), relative))
}

/// The programs a `#!` script runs: its interpreter (the first word, if absolute) and, for
/// `/usr/bin/env NAME`, the program name `env` will look up on the search path.
pub fn shebang(head: &[u8]) -> Option<(String, Option<String>)> {
    let line = head.strip_prefix(b"#!")?;
    let line = &line[..line.iter().position(|&b| b == b'\n')?];
    let mut words = std::str::from_utf8(line).ok()?.split_whitespace();
    let interp = words.next().filter(|w| w.starts_with('/'))?;
    let looked_up = (interp.ends_with("/env"))
        .then(|| words.find(|w| !w.starts_with('-') && !w.contains('=')))
        .flatten()
        .filter(|w| !w.contains('/'))
        .map(str::to_string);
    Some((interp.to_string(), looked_up))
}

/// The names at `offsets` of a string table.
pub fn names(strtab: &[u8], offsets: &[u64]) -> Vec<String> {
    offsets
        .iter()
        .filter_map(|&o| {
            let rest = strtab.get(o as usize..)?;
            let end = rest.iter().position(|&b| b == 0)?;
            let name = std::str::from_utf8(&rest[..end]).ok()?;
            // Plain file names only: a '/' would name a path the loader opens as given.
            (!name.is_empty() && !name.contains('/')).then(|| name.to_string())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64: header, two program headers (LOAD, DYNAMIC), dynamic section, strings.
    fn tiny_elf() -> Vec<u8> {
        let mut f = vec![0u8; 0x400];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 2;
        f[5] = 1;
        f[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        f[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        f[0x38..0x3a].copy_from_slice(&3u16.to_le_bytes());
        let ph = |f: &mut Vec<u8>, at: usize, ty: u32, off: u64, vaddr: u64, size: u64| {
            f[at..at + 4].copy_from_slice(&ty.to_le_bytes());
            f[at + 8..at + 16].copy_from_slice(&off.to_le_bytes());
            f[at + 16..at + 24].copy_from_slice(&vaddr.to_le_bytes());
            f[at + 32..at + 40].copy_from_slice(&size.to_le_bytes());
        };
        ph(&mut f, 64, PT_LOAD, 0, 0x10000, 0x400);
        ph(&mut f, 120, PT_DYNAMIC, 0x200, 0x10200, 64);
        ph(&mut f, 176, PT_INTERP, 0x380, 0x10380, 28);
        f[0x380..0x380 + 28].copy_from_slice(b"/lib64/ld-linux-x86-64.so.2\0");
        let dynamic: [(u64, u64); 4] = [
            (DT_NEEDED, 1),
            (DT_NEEDED, 11),
            (DT_STRTAB, 0x10300),
            (DT_STRSZ, 32),
        ];
        for (i, (t, v)) in dynamic.iter().enumerate() {
            f[0x200 + 16 * i..0x208 + 16 * i].copy_from_slice(&t.to_le_bytes());
            f[0x208 + 16 * i..0x210 + 16 * i].copy_from_slice(&v.to_le_bytes());
        }
        f[0x300..0x300 + 21].copy_from_slice(b"\0libz.so.1\0libc.so.6\0");
        f
    }

    #[test]
    fn finds_the_needed_libraries() {
        let f = tiny_elf();
        assert!(is_elf64(&f));
        assert!(is_executable(&f)); // it names an interpreter
        let (off, len) = program_headers(&f).unwrap();
        let h = segments(
            &f[off as usize..(off + len) as usize],
            program_header_size(&f).unwrap(),
        )
        .unwrap();
        let (doff, dlen) = h.dynamic.unwrap();
        let ((soff, slen), needed) =
            needed_offsets(&f[doff as usize..(doff + dlen) as usize], &h.loads).unwrap();
        assert_eq!(soff, 0x301, "only the part holding the names is read");
        let strtab = &f[soff as usize..(soff + slen) as usize];
        assert_eq!(names(strtab, &needed), ["libz.so.1", "libc.so.6"]);
        let (ioff, ilen) = h.interp.unwrap();
        assert_eq!(
            interp_path(&f[ioff as usize..(ioff + ilen) as usize]).as_deref(),
            Some("/lib64/ld-linux-x86-64.so.2")
        );
    }

    #[test]
    fn garbage_predicts_nothing() {
        assert!(!is_elf64(b"#!/bin/sh\n"));
        let mut f = tiny_elf();
        f[0x38] = 0xff; // 255 program headers: beyond the data
        let (off, len) = program_headers(&f).unwrap();
        assert!(f.get(off as usize..(off + len) as usize).is_none());
        assert!(!is_executable(&f));
        assert!(!is_executable(b"#!/bin/sh\n"));
        assert!(needed_offsets(&[0u8; 7], &[]).is_none());
        assert!(names(b"abc", &[10]).is_empty());
        assert!(interp_path(b"ld.so\0").is_none());
        assert_eq!(
            shebang(b"#! /bin/sh -e\necho"),
            Some(("/bin/sh".to_string(), None))
        );
        assert_eq!(
            shebang(b"#!/usr/bin/env -S python3 -u\n"),
            Some(("/usr/bin/env".to_string(), Some("python3".to_string())))
        );
        assert!(shebang(b"#!sh\n").is_none());
        assert!(shebang(b"#!/bin/sh").is_none()); // no end of line within the head
        assert!(segments(&[0u8; 112], 8).is_none());
    }
}
