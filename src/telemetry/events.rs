//! The in-memory log of recent pulls and builds, newest first, for the
//! status page.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use crate::util::time::now_secs;

/// Events kept for the page.
const RECENT: usize = 50;

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

/// The most recent pulls and builds, newest first.
pub(crate) struct Events {
    recent: Mutex<VecDeque<Event>>,
}

pub(crate) static EVENTS: Events = Events {
    recent: Mutex::new(VecDeque::new()),
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

    pub(crate) fn snapshot(&self) -> Vec<Event> {
        self.recent
            .lock()
            .map(|r| r.iter().cloned().collect())
            .unwrap_or_default()
    }
}
