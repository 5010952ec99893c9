//! The in-memory log of recent pulls and builds, newest first, for the
//! status page.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::util::time::now_secs;

/// Events kept for the page.
const RECENT: usize = 50;

/// Requests for the same image by the same client within this time are
/// one pull (HEAD then GET, retries, a mirror that is also the server).
const SAME_PULL: Duration = Duration::from_secs(3);

#[derive(Clone, Debug)]
pub(crate) struct Event {
    /// Seconds since the epoch.
    pub(crate) at: u64,
    pub(crate) kind: &'static str,
    pub(crate) name: String,
    pub(crate) duration: Duration,
    /// `None` when it went well.
    pub(crate) error: Option<String>,
}

/// The last request seen of a pull, to tell its next one from a new pull.
struct PullSeen {
    image: String,
    client: String,
    head: bool,
    failed: bool,
    at: Instant,
}

/// The most recent pulls and builds, newest first.
pub(crate) struct Events {
    recent: Mutex<VecDeque<Event>>,
    /// The last request of each recent pull.
    pulls: Mutex<Vec<PullSeen>>,
}

pub(crate) static EVENTS: Events = Events {
    recent: Mutex::new(VecDeque::new()),
    pulls: Mutex::new(Vec::new()),
};

impl Events {
    pub(crate) fn record(
        &self,
        kind: &'static str,
        name: String,
        duration: Duration,
        error: Option<String>,
    ) {
        let at = now_secs();
        if let Ok(mut r) = self.recent.lock() {
            r.push_front(Event {
                at,
                kind,
                name,
                duration,
                error,
            });
            r.truncate(RECENT);
        }
    }

    /// Records a request for the tag of `image` by `client` (its
    /// User-Agent) as a pull, unless it continues one recorded within
    /// [`SAME_PULL`]: a failure repeating a failure (a client's retries,
    /// containerd asking the same daemon as mirror and as server), or a GET
    /// after a successful HEAD (a client that resolves, then fetches). Two
    /// successful pulls are two. Returns whether it was recorded.
    pub(crate) fn record_pull(
        &self,
        image: String,
        client: &str,
        head: bool,
        duration: Duration,
        error: Option<String>,
    ) -> bool {
        let now = Instant::now();
        let failed = error.is_some();
        if let Ok(mut pulls) = self.pulls.lock() {
            pulls.retain(|p| now.duration_since(p.at) < SAME_PULL);
            let continues = pulls.iter().any(|p| {
                p.image == image
                    && p.client == client
                    && ((p.failed && failed) || (p.head && !p.failed && !head && !failed))
            });
            pulls.retain(|p| !(p.image == image && p.client == client));
            pulls.push(PullSeen {
                image: image.clone(),
                client: client.to_owned(),
                head,
                failed,
                at: now,
            });
            if continues {
                return false;
            }
        }
        self.record("pull", image, duration, error);
        true
    }

    pub(crate) fn snapshot(&self) -> Vec<Event> {
        self.recent
            .lock()
            .map(|r| r.iter().cloned().collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pull_is_one_event_whatever_its_requests() {
        let events = Events {
            recent: Mutex::new(VecDeque::new()),
            pulls: Mutex::new(Vec::new()),
        };
        let ok = |image: &str, client: &str, head: bool| {
            events.record_pull(image.into(), client, head, Duration::ZERO, None)
        };
        let failed = |image: &str, client: &str| {
            events.record_pull(
                image.into(),
                client,
                true,
                Duration::ZERO,
                Some("no".into()),
            )
        };
        // HEAD then GET: one pull; a second HEAD is a second pull.
        assert!(ok("nix.local/hello:latest", "ctr", true));
        assert!(!ok("nix.local/hello:latest", "ctr", false));
        assert!(ok("nix.local/hello:latest", "ctr", true));
        // Another image, another client: their own pulls.
        assert!(ok("docker.io/library/alpine:3", "ctr", true));
        assert!(ok("nix.local/hello:latest", "docker", false));
        // Retries of a failure: one pull.
        assert!(failed("nix.local/nope:latest", "podman"));
        assert!(!failed("nix.local/nope:latest", "podman"));
        assert!(!failed("nix.local/nope:latest", "podman"));
        assert_eq!(events.snapshot().len(), 5);
    }
}
