//! What the daemon tells about itself: counters for `/metrics` and the log
//! of recent events for the status page. Leaves: any layer may record here.

pub mod events;
pub mod metrics;
