//! `nixery-local gc` keeps the cache under its limit, least recently used
//! first, without breaking what stays; `ls` shows what is cached.

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime};

use common::*;

/// Makes every blob look written an hour ago (the collector spares fresh ones).
fn age_blobs(state: &Path) {
    let old = SystemTime::now() - Duration::from_secs(3600);
    for f in list_files(&state.join("blobs")) {
        let file = fs::File::options()
            .write(true)
            .open(state.join("blobs").join(f))
            .expect("open blob");
        file.set_modified(old).expect("set mtime");
    }
}

fn run(args: &[&str]) -> String {
    run_ok(
        &format!("{args:?}"),
        Command::new(bin()).args(args),
        Duration::from_secs(60),
    )
}

#[test]
fn gc_evicts_least_recently_used_and_frees_the_disk() {
    let layouts = tempdir("nl-gc");
    let state = tempdir("nl-gc-state");
    let s = state.path().to_str().expect("utf8");
    // Three images of about 2 MiB each; b is pulled after a and c.
    let a = blob_layout(&layouts.path().join("a"), "1", 2 << 20);
    let b = blob_layout(&layouts.path().join("b"), "1", (2 << 20) + 1);
    let c = blob_layout(&layouts.path().join("c"), "1", (2 << 20) + 2);
    import_ok(state.path(), &a, "docker.io/library/a:1");
    import_ok(state.path(), &b, "docker.io/library/b:1");
    import_ok(state.path(), &c, "docker.io/library/c:1");
    age_blobs(state.path());
    {
        let daemon = Daemon::start_in(state.path(), &["--offline"]);
        for name in ["a", "c", "b"] {
            let r = request(
                daemon.addr(),
                "GET",
                &format!("/v2/library/{name}/manifests/1"),
                &[],
            );
            assert_eq!(r.status, 200, "{r}");
            std::thread::sleep(Duration::from_millis(1100));
        }
        daemon.stop();
    }
    let listing = run(&["ls", "--state-dir", s]);
    for name in ["library/a:1", "library/b:1", "library/c:1"] {
        assert!(listing.contains(name), "ls lacks {name}:\n{listing}");
    }

    let blobs_before = total_size(&state.path().join("blobs"));
    // Room for one image: a and c (least recently used) go, b stays.
    let report = run(&["gc", "--state-dir", s, "--max-cache-size", "3MiB"]);
    assert!(report.contains("evicted docker.io/library/a:1"), "{report}");
    assert!(report.contains("evicted docker.io/library/c:1"), "{report}");
    assert!(!report.contains("library/b"), "{report}");
    let blobs_after = total_size(&state.path().join("blobs"));
    assert!(blobs_after <= 3 << 20, "still {blobs_after} bytes of blobs");
    assert!(
        report.contains(&format!(
            "{} freed",
            nixery_local::util::units::human_bytes(blobs_before - blobs_after)
        )),
        "reported freed bytes must match the disk: {report}"
    );

    // What stays is whole; what went is a clean miss.
    let daemon = Daemon::start_in(state.path(), &["--offline"]);
    let r = request(daemon.addr(), "GET", "/v2/library/b/manifests/1", &[]);
    assert_eq!(r.status, 200, "{r}");
    let layer = &b.layer_digests[0];
    let r = request(
        daemon.addr(),
        "GET",
        &format!("/v2/library/b/blobs/{layer}"),
        &[],
    );
    assert_eq!(r.status, 200);
    assert_eq!(sha256_digest(&r.body), *layer);
    // Evicted, and the daemon is offline: a 502 that says so.
    let r = request(daemon.addr(), "GET", "/v2/library/a/manifests/1", &[]);
    assert_eq!(r.status, 502, "{r}");
    let listing = run(&["ls", "--state-dir", s]);
    assert!(
        !listing.contains("library/a:1") && listing.contains("library/b:1"),
        "{listing}"
    );
}
