//! Replays every committed fuzz input through the same checks the fuzz targets run, on
//! stable and in seconds: the minimized corpora (`fuzz/corpus/<target>/`) and the crashes the
//! fuzzers found (`fuzz/regressions/<target>/`). The checks are in `fuzz/harness.rs`; to fuzz,
//! see `scripts/fuzz`.

#[path = "../fuzz/harness.rs"]
mod harness;

use std::path::{Path, PathBuf};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// The files of `dir`, sorted; none if it does not exist.
fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|entry| entry.expect("read corpus directory").path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    files
}

/// Runs `check` on every file under `fuzz/<kind>/<target>/`, naming the file that fails.
fn replay(kind: &str, target: &str, check: fn(&[u8])) -> usize {
    let inputs = files(&fuzz_dir().join(kind).join(target));
    for path in &inputs {
        let bytes = std::fs::read(path).expect("read corpus file");
        if std::panic::catch_unwind(|| check(&bytes)).is_err() {
            panic!("{} fails its check", path.display());
        }
    }
    inputs.len()
}

#[test]
fn corpora_and_regressions_pass_their_checks() {
    for (target, check) in harness::TARGETS {
        let corpus = replay("corpus", target, *check);
        assert!(corpus > 0, "fuzz/corpus/{target}/ is empty");
        replay("regressions", target, *check);
    }
}

/// The seeds described in `harness::seeds` are the files committed as `seed-*`. To rewrite
/// them after changing the seeds: `SHARDCAST_WRITE_SEEDS=1 cargo test --test fuzz_corpus`.
#[test]
fn seed_files_match_the_harness() {
    let write = std::env::var_os("SHARDCAST_WRITE_SEEDS").is_some();
    for (target, name, bytes) in harness::seeds() {
        assert!(
            harness::TARGETS.iter().any(|(t, _)| *t == target),
            "seed for unknown target {target}"
        );
        let path = fuzz_dir()
            .join("corpus")
            .join(target)
            .join(format!("seed-{name}"));
        if write {
            std::fs::create_dir_all(path.parent().expect("corpus directory"))
                .expect("create corpus directory");
            std::fs::write(&path, &bytes).expect("write seed");
        }
        let committed = std::fs::read(&path)
            .unwrap_or_else(|e| panic!("{}: {e}; write the seeds (see above)", path.display()));
        assert_eq!(committed, bytes, "{} is out of date", path.display());
    }
}

/// Caught by the `publish_body` check (fuzz/regressions/publish_body/): serde read the body
/// from an array by position (`[users, topics, broadcast, data]`) as well as from an object.
#[test]
fn publish_bodies_are_objects_not_arrays() {
    assert!(shardcast::api::parse_publish_body(br#"[["alice"],[],false,{"t":1}]"#).is_err());
    assert!(shardcast::api::parse_publish_body(b"\r\n {\"broadcast\":true,\"data\":1}").is_ok());
}
