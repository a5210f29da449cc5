//! What a starting program will load next: found as soon as its first bytes are read.
//!
//! An ELF program names its dynamic loader (`PT_INTERP`, and with it `/etc/ld.so.cache`) and
//! its libraries (`DT_NEEDED`, looked up in the image's library directories); a `#!` script
//! names its interpreter. Each found program is queued in turn (its own loads looked up), so
//! the chain of dependent reads the loader would make is fetched in parallel, ahead of it.
//! The dynamic section is read with [`Image::read_file_now`], not behind the program's own
//! whole-file fetch, which reaches it only after everything before it (5.5 MB into
//! python3.11).

use super::{command, elf};
use crate::error::Result;
use crate::image::Image;

/// Directories (relative to the image root) searched for a needed library, besides the
/// `*-linux-*` multiarch directories under `lib` and `usr/lib`.
const LIBRARY_DIRS: [&str; 5] = ["lib", "usr/lib", "lib64", "usr/lib64", "usr/local/lib"];

/// Something a program loads.
#[derive(Debug, PartialEq, Eq)]
pub enum Load {
    /// A program or library (its own loads are looked up in turn).
    Program(u64),
    /// A plain file (the loader's cache).
    File(u64),
}

/// What file `ino` makes the loader open next: its interpreter and, when it has one, the
/// loader's cache, then the libraries it names. For a script: its interpreter. Each is handed
/// to `found` as soon as it is known, so its fetch starts while the rest is looked up.
pub async fn loads(image: &Image, ino: u64, found: &(dyn Fn(Load) + Sync)) -> Result<()> {
    let tree = &image.tree;
    let found_program = |i: Option<u64>| i.into_iter().for_each(|i| found(Load::Program(i)));
    let head = image.read_file(ino, 0, 4096).await?;
    if let Some((interp, looked_up)) = elf::shebang(&head) {
        found_program(tree.resolve_links(&interp));
        if let Some(name) = looked_up {
            found_program(command::find_on_path(tree, &name, None));
        }
        return Ok(());
    }
    let program = elf::is_elf64(&head).then(|| {
        Some((
            elf::program_headers(&head)?,
            elf::program_header_size(&head)?,
        ))
    });
    let Some(((off, len), entry)) = program.flatten() else {
        return Ok(());
    };
    let phdrs = image.read_file(ino, off, len).await?;
    let Some(headers) = elf::segments(&phdrs, entry) else {
        return Ok(());
    };
    if let Some((ioff, ilen)) = headers.interp
        && let Some(path) = elf::interp_path(&image.read_file(ino, ioff, ilen).await?)
    {
        found_program(tree.resolve_links(&path));
        if let Some(cache) = tree.resolve_links("etc/ld.so.cache") {
            found(Load::File(cache));
        }
    }
    let Some((doff, dlen)) = headers.dynamic else {
        return Ok(());
    };
    let dynamic = image.read_file_now(ino, doff, dlen).await?;
    let Some(((soff, slen), offsets)) = elf::needed_offsets(&dynamic, &headers.loads) else {
        return Ok(());
    };
    let strtab = image.read_file_now(ino, soff, slen).await?;
    let dirs = library_dirs(image);
    for name in elf::names(&strtab, &offsets) {
        found_program(
            dirs.iter()
                .find_map(|d| tree.resolve_links(&format!("{d}/{name}"))),
        );
    }
    Ok(())
}

/// Where libraries are looked for: the usual directories and the multiarch ones.
fn library_dirs(image: &Image) -> Vec<String> {
    let tree = &image.tree;
    let mut dirs = Vec::new();
    for base in ["usr/lib", "lib"] {
        if let Some(node) = tree.resolve_links(base).and_then(|i| tree.get(i)) {
            dirs.extend(
                node.children
                    .keys()
                    .filter(|n| n.contains("-linux-"))
                    .map(|n| format!("{base}/{n}")),
            );
        }
    }
    dirs.extend(LIBRARY_DIRS.iter().map(|d| d.to_string()));
    dirs
}
