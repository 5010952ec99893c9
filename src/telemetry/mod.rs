//! What the daemon tells about itself: counters for `/metrics`.

pub mod metrics;
