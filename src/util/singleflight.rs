//! One piece of work per key at a time: the first caller starts it as its
//! own task, later callers wait for the same outcome. A caller that goes
//! away does not cancel the work, and work that panics is forgotten, so the
//! next caller starts afresh instead of waiting for nothing.
//!
//! Nix builds and blobserve's layer extractions share outcomes this way.
//! The mirror's downloads do not: its callers need the download itself,
//! while it runs, to stream from.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::watch;

type Flights<K, V> = Arc<Mutex<HashMap<K, watch::Receiver<Option<V>>>>>;

pub(crate) struct SingleFlight<K, V> {
    flights: Flights<K, V>,
}

impl<K, V> Default for SingleFlight<K, V> {
    fn default() -> Self {
        SingleFlight {
            flights: Arc::new(Mutex::new(HashMap::new())),
        }
    }
}

fn lock<K, V>(f: &Flights<K, V>) -> MutexGuard<'_, HashMap<K, watch::Receiver<Option<V>>>> {
    // The map stays consistent whatever panicked while holding it.
    f.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Removes `key` from a shared map when dropped, also while a panic
/// unwinds: what a task in flight leaves when it ends, however it ends. The
/// mirror's downloads use it too.
pub(crate) struct RemoveOnDrop<K: Eq + Hash, V> {
    map: Arc<Mutex<HashMap<K, V>>>,
    key: K,
}

impl<K: Eq + Hash, V> RemoveOnDrop<K, V> {
    pub(crate) fn new(map: Arc<Mutex<HashMap<K, V>>>, key: K) -> Self {
        RemoveOnDrop { map, key }
    }
}

impl<K: Eq + Hash, V> Drop for RemoveOnDrop<K, V> {
    fn drop(&mut self) {
        self.map
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(&self.key);
    }
}

impl<K, V> SingleFlight<K, V>
where
    K: Eq + Hash + Clone + Send + 'static,
    V: Clone + Send + Sync + 'static,
{
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// The outcome of the work for `key`: the one in flight, or `work()`
    /// started now as its own task. `None` if the work panicked.
    pub(crate) async fn run<F>(&self, key: K, work: impl FnOnce() -> F) -> Option<V>
    where
        F: Future<Output = V> + Send + 'static,
    {
        let (mut rx, start) = {
            let mut flights = lock(&self.flights);
            match flights.get(&key) {
                Some(rx) => (rx.clone(), None),
                None => {
                    let (tx, rx) = watch::channel(None);
                    flights.insert(key.clone(), rx.clone());
                    (rx, Some(tx))
                }
            }
        };
        // Started outside the lock: `work` is the caller's code, and the
        // landing must be able to take the lock if it panics.
        if let Some(tx) = start {
            let landing = RemoveOnDrop::new(Arc::clone(&self.flights), key);
            let fut = work();
            tokio::spawn(async move {
                let outcome = fut.await;
                let _ = tx.send(Some(outcome));
                drop(landing);
            });
        }
        // The sender goes without a value only if the work panicked.
        let outcome = match rx.wait_for(Option::is_some).await {
            Ok(v) => v.clone(),
            Err(_) => None,
        };
        outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn concurrent_callers_share_one_run() {
        let flight = Arc::new(SingleFlight::<u32, usize>::new());
        let runs = Arc::new(AtomicUsize::new(0));
        let mut joins = Vec::new();
        for _ in 0..8 {
            let (flight, runs) = (Arc::clone(&flight), Arc::clone(&runs));
            joins.push(tokio::spawn(async move {
                flight
                    .run(1, || async move {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        runs.fetch_add(1, Ordering::SeqCst) + 1
                    })
                    .await
            }));
        }
        for j in joins {
            assert_eq!(j.await.expect("join"), Some(1));
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        // Done work is not remembered: the next call runs again.
        let again = flight.run(1, || async { 7 }).await;
        assert_eq!(again, Some(7));
    }

    #[tokio::test]
    async fn a_panic_is_none_and_forgotten() {
        let flight = SingleFlight::<u32, u32>::new();
        let panicked = flight
            .run(1, || async {
                if true {
                    panic!("work panicked on purpose");
                }
                0
            })
            .await;
        assert_eq!(panicked, None);
        assert_eq!(flight.run(1, || async { 2 }).await, Some(2));
    }

    #[tokio::test]
    async fn a_panic_starting_the_work_is_forgotten_too() {
        let flight = Arc::new(SingleFlight::<u32, u32>::new());
        let f = Arc::clone(&flight);
        let caller = tokio::spawn(async move {
            f.run(1, || -> std::future::Ready<u32> {
                panic!("start failed on purpose")
            })
            .await
        });
        assert!(caller.await.expect_err("panicked").is_panic());
        assert_eq!(flight.run(1, || async { 3 }).await, Some(3));
    }
}
