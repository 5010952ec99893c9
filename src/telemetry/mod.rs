//! What the daemon tells about itself: counters for `/metrics`, and the log
//! of recent events and the work in progress for the status page. Leaves:
//! any layer may record here.

pub(crate) mod activity;
pub(crate) mod events;
pub(crate) mod metrics;
