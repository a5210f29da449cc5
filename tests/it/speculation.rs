//! Fetching ahead of reads: eStargz prioritized files, recorded profiles, a program's
//! libraries, and directories read together (families).

use crate::builder::{self, Enc, Item, encode, file, layout, noise, push};
use crate::harness::{Env, Mount, Proxy, ocifs, push_index};
use crate::stats::{poll_stats, stats};
use ocifs::stats::MountStats;
use std::sync::atomic::Ordering;

/// Waits (20 s at most) for a profile, written, renamed into place whole, when the daemon
/// that recorded it unmounts.
fn wait_for_profile(profile: &std::path::Path) {
    for _ in 0..400 {
        if profile.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Mounts `reference` with `--prefetch profile` and waits for the prefetch; returns the mount
/// and the blob bytes fetched until then (the proxy's counters are reset after).
fn mount_prefetched(proxy: &Proxy, reference: &str, profile: &str) -> (Mount, u64) {
    proxy.reset();
    let m = Mount::new(reference, &["--verify", "off", "--prefetch", profile], &[]);
    wait_for_prefetch(m.path());
    let fetched = proxy.blob_bytes.load(Ordering::SeqCst);
    proxy.reset();
    (m, fetched)
}

/// Polls `ocifs stats --json` until background prefetch has finished.
fn wait_for_prefetch(mountpoint: &std::path::Path) -> MountStats {
    let finished = |v: &MountStats| {
        let total = v.prefetch.total_bytes;
        total > 0 && v.prefetch.done_bytes >= total
    };
    let v = poll_stats(mountpoint, finished);
    assert!(finished(&v), "prefetch did not finish");
    v
}

#[test]
fn estargz_prioritized_files_are_prefetched_and_stats_explain_it() {
    let Some(Env { reg, work }) = Env::new("prio") else {
        return;
    };
    let proxy = Proxy::start(&reg.addr, None);
    let tar = builder::tar(&[
        Item::Dir("app", 0o755),
        file("app/start.py", noise(300_000, 1)),
        Item::Dir("data", 0o755),
        file("data/big.bin", noise(8 << 20, 2)),
    ]);
    let layers = vec![builder::encode_prioritized(
        tar,
        Enc::Estargz,
        &["app/start.py"],
    )];
    let dir = layout(work.path(), "v1", &[("linux", "amd64", None, &layers)]);
    push(&dir, "v1", &reg.addr, "prio/image", None);
    let m = Mount::new(
        &format!("{}/prio/image:v1", proxy.addr),
        &["--verify", "off"],
        &[],
    );
    let v = wait_for_prefetch(m.path());
    assert!(v.layers[0].fetched_bytes > 0, "{v:?}");
    proxy.reset();
    assert_eq!(
        builder::sha(&std::fs::read(m.path().join("app/start.py")).unwrap()),
        builder::sha(&noise(300_000, 1))
    );
    assert_eq!(
        proxy.blob_bytes.load(Ordering::SeqCst),
        0,
        "the prioritized file was already prefetched"
    );
    let (ok, out, _) = ocifs(&["stats", m.path().to_str().unwrap()], &[]);
    let text = String::from_utf8(out).unwrap();
    assert!(
        ok && text.contains("estargz") && text.contains("latency p50"),
        "{text}"
    );
    let v = stats(m.path());
    assert!(v.reads.count > 0 && v.reads.bytes >= 300_000, "{v:?}");
}

#[test]
fn recorded_profile_prefetches_a_second_start() {
    let Some(Env { reg, work }) = Env::new("profile") else {
        return;
    };
    let proxy = Proxy::start(&reg.addr, None);
    let mut items = vec![
        file("needed/a.txt", noise(200_000, 3)),
        file("needed/b.txt", "bee\n"),
    ];
    items.push(file("unneeded.bin", noise(6 << 20, 4)));
    let layers = vec![encode(builder::tar(&items), Enc::Estargz)];
    let dir = layout(work.path(), "v1", &[("linux", "amd64", None, &layers)]);
    push(&dir, "v1", &reg.addr, "profile/image", None);
    let r = format!("{}/profile/image:v1", proxy.addr);
    let profile = work.path().join("startup.profile");
    let p = profile.to_str().unwrap();
    {
        let m = Mount::new(&r, &["--verify", "off", "--record", p], &[]);
        std::fs::read(m.path().join("needed/b.txt")).unwrap();
        std::fs::read(m.path().join("needed/a.txt")).unwrap();
    }
    wait_for_profile(&profile);
    let text = std::fs::read_to_string(&profile).expect("profile written at unmount");
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let paths: Vec<&str> = lines.iter().map(|l| l["path"].as_str().unwrap()).collect();
    assert_eq!(
        paths,
        vec!["needed/b.txt", "needed/a.txt"],
        "in access order"
    );
    assert_eq!(lines[1]["len"], 200_000);

    let (m, planned) = mount_prefetched(&proxy, &r, p);
    // The mount's tail read (512 KiB: footer and TOC) and the two files' chunks, merged into
    // one range; nothing of the 6 MiB after them (the read path fetched a 2 MiB run).
    assert!(
        planned < 1_000_000,
        "mount and prefetch fetched {planned} bytes"
    );
    assert_eq!(
        builder::sha(&std::fs::read(m.path().join("needed/a.txt")).unwrap()),
        builder::sha(&noise(200_000, 3))
    );
    assert_eq!(
        proxy.blob_bytes.load(Ordering::SeqCst),
        0,
        "profile prefetch fetched it already"
    );
}

#[test]
fn a_profile_prefetch_of_a_gzip_layer_fetches_each_span_front_once() {
    let Some(Env { reg, work }) = Env::new("gzprofile") else {
        return;
    };
    let proxy = Proxy::start(&reg.addr, None);
    let tar = builder::tar(&[
        file("a.bin", noise(3 << 20, 21)),
        file("needed1.txt", noise(30_000, 22)),
        file("needed2.txt", noise(30_000, 23)),
        file("far.bin", noise(8 << 20, 24)),
        file("needed3.txt", noise(30_000, 25)),
    ]);
    let layers = vec![encode(tar, Enc::Gzip)];
    builder::push_one(work.path(), &layers, &reg.addr, "gzprofile/image");
    let r = format!("{}/gzprofile/image:v1", proxy.addr);
    push_index(&r, &["--span", "1MiB"]);
    let profile = work.path().join("p.profile");
    let p = profile.to_str().unwrap();
    {
        let m = Mount::new(
            &r,
            &["--verify", "off", "--record", p, "--no-whole-files"],
            &[],
        );
        for f in ["needed1.txt", "needed2.txt", "needed3.txt"] {
            std::fs::read(m.path().join(f)).unwrap();
        }
    }
    wait_for_profile(&profile);
    let (m, planned) = mount_prefetched(&proxy, &r, p);
    // The tail probe, the index, and two compressed ranges from a span start to the mark past
    // the files (needed1 and needed2 share theirs): 2.4 MB of this 11 MB blob. Reading each
    // file through the read path, as before, fetched 3.3 MB (runs past the files).
    assert!(
        planned < 2_800_000,
        "mount and prefetch fetched {planned} bytes"
    );
    for (f, seed) in [
        ("needed1.txt", 22),
        ("needed2.txt", 23),
        ("needed3.txt", 25),
    ] {
        assert_eq!(
            builder::sha(&std::fs::read(m.path().join(f)).unwrap()),
            builder::sha(&noise(30_000, seed))
        );
    }
    assert_eq!(proxy.blob_bytes.load(Ordering::SeqCst), 0, "all prefetched");
}

#[test]
fn a_programs_libraries_are_fetched_before_the_loader_asks() {
    let Some(Env { reg, work }) = Env::new("elf") else {
        return;
    };
    // A real dynamically linked program and the libc it names, from this (Debian x86_64)
    // machine, with 4 MiB between them so no fetch run carries one along with the other.
    let tool = std::fs::read("/usr/bin/true").unwrap();
    let tool_len = tool.len();
    let libc = std::fs::read("/usr/lib/x86_64-linux-gnu/libc.so.6").unwrap();
    let tar = builder::tar(&[
        Item::Dir("usr", 0o755),
        Item::Dir("usr/bin", 0o755),
        Item::Dir("usr/lib", 0o755),
        Item::Dir("usr/lib/x86_64-linux-gnu", 0o755),
        Item::Symlink("lib", "usr/lib"),
        Item::File("usr/bin/tool".into(), tool, 0o755),
        Item::File("usr/bin/run".into(), SCRIPT.to_vec(), 0o755),
        file("filler", noise(4 << 20, 3)),
        Item::File(
            "usr/lib/x86_64-linux-gnu/libc.so.6".into(),
            libc.clone(),
            0o755,
        ),
        file("filler2", noise(4 << 20, 4)),
        // What the C library reads as a program starts comes with libc, but for a file
        // past the size limit (1 MiB).
        Item::Dir("usr/lib/x86_64-linux-gnu/gconv", 0o755),
        file(
            "usr/lib/x86_64-linux-gnu/gconv/gconv-modules.cache",
            noise(27_028, 11),
        ),
        Item::Dir("usr/lib/locale", 0o755),
        Item::Dir("usr/lib/locale/C.utf8", 0o755),
        file("usr/lib/locale/C.utf8/LC_CTYPE", noise(2 << 20, 12)),
        Item::Dir("etc", 0o755),
        file("etc/nsswitch.conf", noise(839, 13)),
        Item::Dir("conf", 0o755),
        file("conf/a", noise(20_000, 5)),
        file("conf/b", noise(20_000, 6)),
        file("conf/c", noise(20_000, 7)),
        file("conf/plugin.so", noise(300_000, 8)),
    ]);
    let layers = vec![encode(tar, Enc::Estargz)];
    builder::push_one(work.path(), &layers, &reg.addr, "elf/image");
    let m = Mount::new(
        &format!("{}/elf/image:v1", reg.addr),
        &["--verify", "off", "--no-prefetch"],
        &[],
    );
    // Only the program's first page is read, as the kernel does at exec.
    let mut head = [0u8; 4096];
    std::io::Read::read_exact(
        &mut std::fs::File::open(m.path().join("usr/bin/tool")).unwrap(),
        &mut head,
    )
    .unwrap();
    let c_files = (27_028 + 839) as u64;
    let expected = libc.len() as u64 + c_files;
    let whole = |v: &MountStats| v.prefetch.whole_file_bytes;
    let whole = whole(&poll_stats(m.path(), |v| whole(v) >= expected));
    // libc (found through the lib -> usr/lib link) and the small files it reads at start,
    // nothing else, was fetched whole.
    assert_eq!(whole, expected);
    // Reading one file of a directory whose files lie together fetches its siblings of the
    // same kind too (not the shared object among them); a program does not bring its bin
    // directory.
    std::fs::read(m.path().join("conf/a")).unwrap();
    let together = |v: &MountStats| v.prefetch.directory_bytes;
    let together = together(&poll_stats(m.path(), |v| together(v) >= 60_000));
    // Counted in file bytes (the same for every format), not the compressed range fetched.
    assert_eq!(together, 60_000, "conf/ fetched together");
    assert_eq!(
        std::fs::read(m.path().join("lib/x86_64-linux-gnu/libc.so.6")).unwrap(),
        libc
    );
    drop(m);

    // The same layer in an image whose config names the command `tool /conf/b`: the mount
    // fetches the program (found on the default PATH), its libc and the file its argument
    // names before anything is read.
    let dir = builder::layout_with_command(
        &work.path().join("cmd"),
        "v1",
        &[("linux", "amd64", None, &layers)],
        &["tool", "/conf/b"],
    );
    push(&dir, "v1", &reg.addr, "elf/command", None);
    let m = Mount::new(
        &format!("{}/elf/command:v1", reg.addr),
        &["--verify", "off"],
        &[],
    );
    let expected = (tool_len + libc.len() + 20_000) as u64 + c_files;
    let whole = |v: &MountStats| v.prefetch.whole_file_bytes;
    let got = whole(&poll_stats(m.path(), |v| whole(v) >= expected));
    assert_eq!(
        got, expected,
        "tool, libc, its files and conf/b, nothing else"
    );
    drop(m);

    // A script as the command: `#!/usr/bin/env tool` runs tool, found on the search path.
    let dir = builder::layout_with_command(
        &work.path().join("script"),
        "v1",
        &[("linux", "amd64", None, &layers)],
        &["run"],
    );
    push(&dir, "v1", &reg.addr, "elf/script", None);
    let m = Mount::new(
        &format!("{}/elf/script:v1", reg.addr),
        &["--verify", "off"],
        &[],
    );
    let expected = (SCRIPT.len() + tool_len + libc.len()) as u64 + c_files;
    let got = whole(&poll_stats(m.path(), |v| whole(v) >= expected));
    assert_eq!(got, expected, "the script, tool, libc and its files");
}

#[test]
fn the_user_and_group_files_a_runtime_reads_are_fetched_as_the_mount_starts() {
    let Some(Env { reg, work }) = Env::new("runtime") else {
        return;
    };
    // A runtime reads /etc/passwd and /etc/group before it starts a container (podman does
    // for every one): a mount fetches them before anything is read, planned or not, each
    // as its own bytes and only if those are few (at most 256 KiB).
    let tar = builder::tar(&[
        Item::Dir("etc", 0o755),
        file("etc/passwd", noise(839, 1)),
        file("filler", noise(4 << 20, 3)),
        file("etc/group", noise(300 << 10, 4)),
    ]);
    builder::push_one(
        work.path(),
        &[encode(tar, Enc::Estargz)],
        &reg.addr,
        "rt/image",
    );
    let reference = format!("{}/rt/image:v1", reg.addr);
    let whole = |v: &MountStats| v.prefetch.whole_file_bytes;
    let profile = work.path().join("profile");
    std::fs::write(
        &profile,
        "{\"layer\":\"\",\"path\":\"filler\",\"offset\":0,\"len\":10}\n",
    )
    .unwrap();
    for flags in [vec![], vec!["--prefetch", profile.to_str().unwrap()]] {
        let m = Mount::new(
            &reference,
            &[&["--verify", "off"], &flags[..]].concat(),
            &[],
        );
        assert_eq!(
            whole(&poll_stats(m.path(), |v| whole(v) >= 839)),
            839,
            "{flags:?}"
        );
        // Given time, nothing more: not the group file, whose bytes are too many.
        std::thread::sleep(std::time::Duration::from_millis(500));
        assert_eq!(whole(&stats(m.path())), 839, "{flags:?}");
    }
    // With --no-whole-files they are not fetched (on this registry they came within
    // milliseconds of the mount above).
    let m = Mount::new(&reference, &["--verify", "off", "--no-whole-files"], &[]);
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_eq!(whole(&stats(m.path())), 0);
}

/// Four packages `lib/{a,b,c,d}`, each with a module cache directory of three files
/// (`cache/m{0,1,2}.pyc`, `sizes[i]` bytes of noise seeded `10 * i + m`), and 3 MiB of noise
/// after it so that no fetch run carries one package's files along with another's.
fn module_caches(sizes: [usize; 4]) -> Vec<Item> {
    let mut items = vec![Item::Dir("lib", 0o755)];
    for (i, p) in ["a", "b", "c", "d"].iter().enumerate() {
        items.push(Item::Dir(
            Box::leak(format!("lib/{p}").into_boxed_str()),
            0o755,
        ));
        items.push(Item::Dir(
            Box::leak(format!("lib/{p}/cache").into_boxed_str()),
            0o755,
        ));
        for m in 0..3 {
            items.push(file(
                &format!("lib/{p}/cache/m{m}.pyc"),
                noise(sizes[i], (10 * i + m) as u64),
            ));
        }
        items.push(file(
            &format!("lib/{p}/filler"),
            noise(3 << 20, 100 + i as u64),
        ));
    }
    items
}

#[test]
fn a_second_directory_of_a_family_brings_the_rest_of_it() {
    let Some(Env { reg, work }) = Env::new("family") else {
        return;
    };
    let items = module_caches([30_000; 4]);
    builder::push_one(
        work.path(),
        &[encode(builder::tar(&items), Enc::Estargz)],
        &reg.addr,
        "family/image",
    );
    let m = Mount::new(
        &format!("{}/family/image:v1", reg.addr),
        &["--verify", "off", "--no-prefetch"],
        &[],
    );
    let together = |v: &MountStats| v.prefetch.directory_bytes;
    // One directory of the family read: its own files come together, and nothing else.
    std::fs::read(m.path().join("lib/a/cache/m0.pyc")).unwrap();
    let one = together(&poll_stats(m.path(), |v| together(v) >= 90_000));
    assert!((90_000..180_000).contains(&one), "a/cache: {one} bytes");
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(together(&poll_stats(m.path(), |_| true)), one);
    // A second one: the other two come as well.
    std::fs::read(m.path().join("lib/b/cache/m1.pyc")).unwrap();
    let all = together(&poll_stats(m.path(), |v| together(v) >= 4 * 90_000));
    assert!(
        (4 * 90_000..4 * 180_000).contains(&all),
        "the family: {all} bytes"
    );
    assert_eq!(
        std::fs::read(m.path().join("lib/d/cache/m2.pyc")).unwrap(),
        noise(30_000, 32)
    );
}

#[test]
fn a_family_member_over_the_budget_is_fetched_on_its_own_first_read() {
    let Some(Env { reg, work }) = Env::new("budget") else {
        return;
    };
    // Two small module caches (a, b) and two of 5 MiB (c, d): the family's rest (8 MiB at
    // most) has room for c but not d, which is left for its own first read.
    let items = module_caches([30_000, 30_000, 1_700_000, 1_700_000]);
    builder::push_one(
        work.path(),
        &[encode(builder::tar(&items), Enc::Estargz)],
        &reg.addr,
        "family/budget",
    );
    let m = Mount::new(
        &format!("{}/family/budget:v1", reg.addr),
        &["--verify", "off", "--no-prefetch"],
        &[],
    );
    let together = |v: &MountStats| v.prefetch.directory_bytes;
    std::fs::read(m.path().join("lib/a/cache/m0.pyc")).unwrap();
    poll_stats(m.path(), |v| together(v) >= 90_000);
    std::fs::read(m.path().join("lib/b/cache/m1.pyc")).unwrap();
    let family = 2 * 90_000 + 5_100_000;
    let before = together(&poll_stats(m.path(), |v| together(v) >= family));
    assert!(
        (family..family + 2_000_000).contains(&before),
        "a, b, c: {before} bytes"
    );
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(
        together(&poll_stats(m.path(), |_| true)),
        before,
        "d is not fetched yet"
    );
    // d's first read brings its siblings.
    assert_eq!(
        std::fs::read(m.path().join("lib/d/cache/m0.pyc")).unwrap(),
        noise(1_700_000, 30)
    );
    let after = together(&poll_stats(m.path(), |v| together(v) >= before + 5_100_000));
    assert!(after >= before + 5_100_000, "d: {} bytes", after - before);
}

/// A script whose interpreter `env` looks up on the search path.
const SCRIPT: &[u8] = b"#!/usr/bin/env tool\nexit 0\n";
