//! The fuzz targets on stable: each runs its committed corpus (seeds and the inputs of crashes
//! found and fixed), then deterministic mutations of it and random bytes, so that `cargo test`
//! exercises every target on machines without nightly. A failing input is written to
//! `target/fuzz-failures/` for `cargo fuzz run TARGET FILE`.

use super::TARGETS;
use super::mutate::Mutator;
use std::path::PathBuf;

/// Mutated and random inputs per target: a few seconds each in a debug build (fewer for the
/// zTOC, whose 32 KiB windows make each input 66 KB).
const ROUNDS: usize = 3000;
const FEW_ROUNDS: usize = 300;
/// Longest random input.
const NOISE: usize = 4096;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = root().join("fuzz/corpus").join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

/// Runs `input` through `target`; on a panic, keeps the input and fails naming it.
fn one(name: &str, target: fn(&[u8]), input: &[u8], what: &str) {
    if std::panic::catch_unwind(|| target(input)).is_err() {
        let dir = root().join("target/fuzz-failures");
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join(format!("{name}-{what}"));
        std::fs::write(&file, input).unwrap();
        panic!(
            "fuzz target {name} failed on {what}, kept as {}",
            file.display()
        );
    }
}

fn drive(name: &str, rounds: usize) {
    let target = TARGETS.iter().find(|(n, _)| *n == name).unwrap().1;
    let seeds = corpus(name);
    assert!(!seeds.is_empty(), "fuzz/corpus/{name} is empty");
    for (i, s) in seeds.iter().enumerate() {
        one(name, target, s, &format!("corpus-{i}"));
    }
    let mut m = Mutator::new(name.bytes().fold(0xcbf29ce484222325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
    }));
    for i in 0..rounds {
        let input = if i % 10 == 9 {
            m.noise(NOISE)
        } else {
            let a = &seeds[m.below(seeds.len())];
            let b = &seeds[m.below(seeds.len())];
            m.mutate(a, b)
        };
        one(name, target, &input, &format!("round-{i}"));
    }
}

macro_rules! targets {
    ($($name:ident: $rounds:expr),*) => {
        $(#[test]
        fn $name() {
            drive(stringify!($name), $rounds);
        })*

        /// The list the tests run is the list of targets.
        #[test]
        fn every_target_is_tested() {
            let tested = [$(stringify!($name)),*];
            let all: Vec<&str> = TARGETS.iter().map(|(n, _)| *n).collect();
            assert_eq!(tested.to_vec(), all);
        }
    };
}

targets!(
    reference: ROUNDS,
    manifest: ROUNDS,
    estargz: ROUNDS,
    zstdchunked: ROUNDS,
    soci: FEW_ROUNDS,
    tar: ROUNDS,
    checkpoint_file: ROUNDS
);

/// Each target has its libFuzzer driver, declared in the fuzz crate, and a committed corpus.
#[test]
fn every_target_has_a_driver_and_a_corpus() {
    let manifest = std::fs::read_to_string(root().join("fuzz/Cargo.toml")).unwrap();
    for (name, _) in TARGETS {
        let driver = format!("fuzz_targets/{name}.rs");
        assert!(root().join("fuzz").join(&driver).exists(), "{driver}");
        assert!(
            manifest.contains(&format!("name = \"{name}\"")),
            "{name} in fuzz/Cargo.toml"
        );
        assert!(!corpus(name).is_empty(), "fuzz/corpus/{name}");
    }
}
