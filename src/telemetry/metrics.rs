//! Process-wide counters, rendered in the Prometheus text format at
//! `/metrics`. Counting is a relaxed atomic add (or one short lock for the
//! per-route map), cheap enough for every request and every blob chunk.
//!
//! The counters are one process-wide value rather than a handle threaded
//! through every layer: they observe the daemon and never influence it.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// A histogram with fixed buckets (upper bounds in seconds).
pub(crate) struct Histogram {
    bounds: &'static [f64],
    counts: [AtomicU64; 12],
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    const fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: [const { AtomicU64::new(0) }; 12],
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub(crate) fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        for (i, b) in self.bounds.iter().enumerate() {
            if secs <= *b {
                self.counts[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.sum_micros
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (i, b) in self.bounds.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{b}\"}} {}",
                self.counts[i].load(Ordering::Relaxed)
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {count}");
    }
}

pub(crate) struct Metrics {
    requests: Mutex<BTreeMap<(&'static str, &'static str, u16), u64>>,
    pub(crate) blob_hits: AtomicU64,
    pub(crate) blob_misses: AtomicU64,
    pub(crate) manifest_fetches: AtomicU64,
    pub(crate) bytes_served: AtomicU64,
    pub(crate) bytes_fetched: AtomicU64,
    pub(crate) upstream_errors: AtomicU64,
    pub(crate) upstream_latency: Histogram,
    pub(crate) nix_builds: AtomicU64,
    pub(crate) nix_build_failures: AtomicU64,
    pub(crate) nix_build_duration: Histogram,
    pub(crate) evictions: AtomicU64,
    pub(crate) evicted_bytes: AtomicU64,
}

const LATENCY_BOUNDS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
const BUILD_BOUNDS: &[f64] = &[
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

pub(crate) static METRICS: Metrics = Metrics::new();

pub(crate) fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

impl Metrics {
    const fn new() -> Metrics {
        Metrics {
            requests: Mutex::new(BTreeMap::new()),
            blob_hits: AtomicU64::new(0),
            blob_misses: AtomicU64::new(0),
            manifest_fetches: AtomicU64::new(0),
            bytes_served: AtomicU64::new(0),
            bytes_fetched: AtomicU64::new(0),
            upstream_errors: AtomicU64::new(0),
            upstream_latency: Histogram::new(LATENCY_BOUNDS),
            nix_builds: AtomicU64::new(0),
            nix_build_failures: AtomicU64::new(0),
            nix_build_duration: Histogram::new(BUILD_BOUNDS),
            evictions: AtomicU64::new(0),
            evicted_bytes: AtomicU64::new(0),
        }
    }

    pub(crate) fn request(&self, route: &'static str, method: &'static str, status: u16) {
        if let Ok(mut r) = self.requests.lock() {
            *r.entry((route, method, status)).or_default() += 1;
        }
    }

    /// The text exposition; `cache_bytes` is measured by the caller.
    pub(crate) fn render(&self, cache_bytes: u64) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP nixery_local_requests_total HTTP requests by route, method and status.\n# TYPE nixery_local_requests_total counter"
        );
        if let Ok(r) = self.requests.lock() {
            for ((route, method, status), n) in r.iter() {
                let _ = writeln!(
                    out,
                    "nixery_local_requests_total{{route=\"{route}\",method=\"{method}\",status=\"{status}\"}} {n}"
                );
            }
        }
        let counters: [(&str, &str, &AtomicU64); 10] = [
            (
                "nixery_local_blob_cache_hits_total",
                "Blob requests served from the cache.",
                &self.blob_hits,
            ),
            (
                "nixery_local_blob_cache_misses_total",
                "Blob requests that went to an upstream.",
                &self.blob_misses,
            ),
            (
                "nixery_local_manifest_fetches_total",
                "Manifests fetched from upstreams.",
                &self.manifest_fetches,
            ),
            (
                "nixery_local_served_bytes_total",
                "Blob bytes sent to clients.",
                &self.bytes_served,
            ),
            (
                "nixery_local_fetched_bytes_total",
                "Blob bytes received from upstreams.",
                &self.bytes_fetched,
            ),
            (
                "nixery_local_upstream_errors_total",
                "Upstream requests that failed or timed out.",
                &self.upstream_errors,
            ),
            (
                "nixery_local_nix_builds_total",
                "Nix images built.",
                &self.nix_builds,
            ),
            (
                "nixery_local_nix_build_failures_total",
                "Nix image builds that failed.",
                &self.nix_build_failures,
            ),
            (
                "nixery_local_evictions_total",
                "Cache entries evicted to stay under the size limit.",
                &self.evictions,
            ),
            (
                "nixery_local_evicted_bytes_total",
                "Bytes freed by eviction.",
                &self.evicted_bytes,
            ),
        ];
        for (name, help, c) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                c.load(Ordering::Relaxed)
            );
        }
        self.upstream_latency.render(
            &mut out,
            "nixery_local_upstream_latency_seconds",
            "Time from an upstream request to its response headers.",
        );
        self.nix_build_duration.render(
            &mut out,
            "nixery_local_nix_build_duration_seconds",
            "Duration of Nix image builds.",
        );
        let _ = writeln!(
            out,
            "# HELP nixery_local_cache_bytes Bytes of blobs in the cache.\n# TYPE nixery_local_cache_bytes gauge\nnixery_local_cache_bytes {cache_bytes}"
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative() {
        static H: Histogram = Histogram::new(LATENCY_BOUNDS);
        H.observe(Duration::from_millis(3));
        H.observe(Duration::from_millis(70));
        let mut out = String::new();
        H.render(&mut out, "h", "help");
        assert!(out.contains("h_bucket{le=\"0.005\"} 1\n"), "{out}");
        assert!(out.contains("h_bucket{le=\"0.1\"} 2\n"), "{out}");
        assert!(out.contains("h_bucket{le=\"+Inf\"} 2\n"), "{out}");
        assert!(out.contains("h_count 2\n"), "{out}");
    }

    #[test]
    fn renders_request_labels() {
        let m = Metrics::new();
        m.request("manifest", "GET", 200);
        m.request("manifest", "GET", 200);
        let text = m.render(42);
        assert!(text.contains(
            "nixery_local_requests_total{route=\"manifest\",method=\"GET\",status=\"200\"} 2"
        ));
        assert!(text.contains("nixery_local_cache_bytes 42"));
    }
}
