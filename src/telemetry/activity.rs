//! Work in progress, for the status page: each Nix build and upstream
//! download registers while it runs and says how far along it is. A guard
//! removes it when the work ends, however it ends.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One piece of work as the page shows it.
#[derive(Clone, Debug)]
pub(crate) struct Activity {
    pub(crate) kind: &'static str,
    pub(crate) name: String,
    pub(crate) elapsed: Duration,
    /// What it is doing now ("evaluating", "12.0 MB of 40.0 MB").
    pub(crate) stage: String,
}

struct Entry {
    kind: &'static str,
    name: String,
    started: Instant,
    stage: String,
}

pub(crate) struct Activities {
    running: Mutex<BTreeMap<u64, Entry>>,
    next: AtomicU64,
}

pub(crate) static ACTIVITIES: Activities = Activities {
    running: Mutex::new(BTreeMap::new()),
    next: AtomicU64::new(0),
};

impl Activities {
    /// Registers work that runs until the returned guard is dropped.
    pub(crate) fn start(&'static self, kind: &'static str, name: String) -> ActivityGuard {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut running) = self.running.lock() {
            running.insert(
                id,
                Entry {
                    kind,
                    name,
                    started: Instant::now(),
                    stage: String::new(),
                },
            );
        }
        ActivityGuard { owner: self, id }
    }

    /// What runs now, oldest first.
    pub(crate) fn snapshot(&self) -> Vec<Activity> {
        self.running
            .lock()
            .map(|running| {
                running
                    .values()
                    .map(|e| Activity {
                        kind: e.kind,
                        name: e.name.clone(),
                        elapsed: e.started.elapsed(),
                        stage: e.stage.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Keeps an activity on the page; dropping it takes it off.
pub(crate) struct ActivityGuard {
    owner: &'static Activities,
    id: u64,
}

impl ActivityGuard {
    /// Says how far along the work is.
    pub(crate) fn stage(&self, stage: impl Into<String>) {
        if let Ok(mut running) = self.owner.running.lock() {
            if let Some(e) = running.get_mut(&self.id) {
                e.stage = stage.into();
            }
        }
    }
}

impl Drop for ActivityGuard {
    fn drop(&mut self) {
        if let Ok(mut running) = self.owner.running.lock() {
            running.remove(&self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_shows_while_its_guard_lives() {
        let guard = ACTIVITIES.start("build", "activity-test-image".into());
        guard.stage("evaluating");
        let mine = |all: Vec<Activity>| {
            all.into_iter()
                .find(|a| a.name == "activity-test-image")
                .map(|a| (a.kind, a.stage))
        };
        assert_eq!(
            mine(ACTIVITIES.snapshot()),
            Some(("build", "evaluating".to_owned()))
        );
        drop(guard);
        assert_eq!(mine(ACTIVITIES.snapshot()), None);
    }
}
