//! What a starting program will load next: found as soon as its first bytes are read.
//!
//! An ELF program names its dynamic loader (`PT_INTERP`, and with it `/etc/ld.so.cache`) and
//! its libraries (`DT_NEEDED`, looked up in the image's library directories); a `#!` script
//! names its interpreter. Each found program is queued in turn (its own loads looked up), so
//! the chain of dependent reads the loader would make is fetched in parallel, ahead of it.
//! The dynamic section is read with [`Image::read_file_now`], not behind the program's own
//! whole-file fetch, which reaches it only after everything before it (5.5 MB into
//! python3.11).
//!
//! A program linking the GNU C library (`libc.so.6`) also gets the small files that library
//! reads as a program starts: its locale, the charset conversions' cache, the time zone, the
//! user database. Each is otherwise one more dependent round trip (in the realistic
//! benchmark's Python start, five of them in a row, 50-136 ms each).

use super::{command, elf};
use crate::error::Result;
use crate::image::Image;
use crate::tree::Tree;

/// Directories (relative to the image root) searched for a needed library, besides the
/// `*-linux-*` multiarch directories under `lib` and `usr/lib`.
const LIBRARY_DIRS: [&str; 5] = ["lib", "usr/lib", "lib64", "usr/lib64", "usr/local/lib"];

/// Files the GNU C library reads when a program sets a locale (Python always does), asks for
/// the local time or looks up a user (with the user and group databases,
/// [`command::RUNTIME_FILES`]); relative to the image root.
const C_LIBRARY_FILES: [&str; 4] = [
    "usr/lib/locale/C.utf8/LC_CTYPE",
    "usr/lib/locale/C.UTF-8/LC_CTYPE",
    "etc/localtime",
    "etc/nsswitch.conf",
];

/// The charset conversions' cache the C library reads with a UTF-8 locale, relative to the
/// directory the library lies in (or its `usr/` twin: without a merged `/usr`, libc lies in
/// `lib/<multiarch>` and the cache in `usr/lib/<multiarch>`).
const GCONV_CACHE: &str = "gconv/gconv-modules.cache";

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
        let library = dirs.iter().find_map(|d| {
            let ino = tree.resolve_links(&format!("{d}/{name}"))?;
            Some((d, ino))
        });
        let Some((dir, ino)) = library else { continue };
        found(Load::Program(ino));
        if name == "libc.so.6" {
            c_library_files(tree, dir)
                .into_iter()
                .for_each(|f| found(Load::File(f)));
        }
    }
    Ok(())
}

/// The small files the GNU C library found in `dir` reads as a program starts (see
/// [`C_LIBRARY_FILES`]), those the image has.
fn c_library_files(tree: &Tree, dir: &str) -> Vec<u64> {
    let mut gconv = vec![format!("{dir}/{GCONV_CACHE}")];
    if !dir.starts_with("usr/") {
        gconv.push(format!("usr/{dir}/{GCONV_CACHE}"));
    }
    let paths: Vec<&str> = C_LIBRARY_FILES
        .iter()
        .chain(command::RUNTIME_FILES.iter())
        .copied()
        .chain(gconv.iter().map(String::as_str))
        .collect();
    // Not past `START_FILE_MAX`: a locale archive of every language can be hundreds of MB.
    command::start_files(tree, &paths)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::{Entry, Kind};

    #[test]
    fn the_c_library_files_the_image_has_are_found_small_ones_only() {
        let file = |p: &str, size| {
            let mut e = Entry::new(p.to_string(), Kind::File);
            e.size = size;
            e
        };
        let mut localtime = Entry::new("etc/localtime".to_string(), Kind::Symlink);
        localtime.link = Some("/usr/share/zoneinfo/Etc/UTC".into());
        let tree = Tree::build(&[vec![
            file("usr/lib/x86_64-linux-gnu/libc.so.6", 2 << 20),
            file("usr/lib/x86_64-linux-gnu/gconv/gconv-modules.cache", 27028),
            file("usr/lib/locale/C.utf8/LC_CTYPE", 353616),
            file("usr/lib/locale/C.UTF-8/LC_CTYPE", 2 << 20),
            file("usr/share/zoneinfo/Etc/UTC", 114),
            localtime,
            file("etc/passwd", 839),
            Entry::new("etc/group".to_string(), Kind::Dir),
        ]]);
        let found = c_library_files(&tree, "usr/lib/x86_64-linux-gnu");
        let want: Vec<u64> = [
            "usr/lib/locale/C.utf8/LC_CTYPE",
            "usr/share/zoneinfo/Etc/UTC",
            "etc/passwd",
            "usr/lib/x86_64-linux-gnu/gconv/gconv-modules.cache",
        ]
        .iter()
        .map(|p| tree.resolve(p).unwrap())
        .collect();
        // Not a file past the size limit, nor a directory, nor what the image lacks.
        assert_eq!(found, want);
        // Without a merged /usr: libc in lib/<multiarch>, the cache under usr/.
        assert_eq!(c_library_files(&tree, "lib/x86_64-linux-gnu"), want);
        assert_eq!(c_library_files(&tree, "lib").len(), 3, "nowhere else");
    }
}
