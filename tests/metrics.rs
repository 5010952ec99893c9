//! `/metrics` counts what the daemon really did, in Prometheus' text format.

mod common;

use common::*;

fn value(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
}

#[test]
fn metrics_count_requests_hits_and_bytes() {
    let layouts = tempdir("nl-metrics");
    let state = tempdir("nl-metrics-state");
    let image = busybox_layout(&layouts.path().join("img"), "1", "hi");
    import_ok(state.path(), &image, "docker.io/library/hello:1");
    let daemon = Daemon::start_in(state.path(), &["--offline"]);
    let addr = daemon.addr();

    let before = request(addr, "GET", "/metrics", &[]);
    assert_eq!(before.status, 200, "{before}");
    assert!(before
        .header("content-type")
        .is_some_and(|t| t.starts_with("text/plain")));
    let before = before.text();
    let layer = &image.layer_digests[0];
    for _ in 0..3 {
        let r = request(addr, "GET", "/v2/library/hello/manifests/1", &[]);
        assert_eq!(r.status, 200);
    }
    let r = request(
        addr,
        "GET",
        &format!("/v2/library/hello/blobs/{layer}"),
        &[],
    );
    assert_eq!(r.status, 200);
    // Not cached, and offline: a 502.
    let missing = "/v2/library/hello/manifests/nope";
    assert_eq!(request(addr, "GET", missing, &[]).status, 502);

    let after = request(addr, "GET", "/metrics", &[]).text();
    let manifests = r#"nixery_local_requests_total{route="manifest",method="GET",status="200"}"#;
    assert_eq!(value(&after, manifests), 3);
    let misses = r#"nixery_local_requests_total{route="manifest",method="GET",status="502"}"#;
    assert_eq!(value(&after, misses), 1);
    let hits = "nixery_local_blob_cache_hits_total";
    assert_eq!(value(&after, hits), value(&before, hits) + 1);
    let served = "nixery_local_served_bytes_total";
    assert_eq!(
        value(&after, served),
        value(&before, served) + r.body.len() as u64
    );
    let cache = value(&after, "nixery_local_cache_bytes");
    let blobs: u64 = image
        .blob_digests()
        .iter()
        .map(|d| image.blob(d).len() as u64)
        .sum();
    assert_eq!(cache, blobs, "cache size must be the blobs' total");
}
