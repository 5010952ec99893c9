//! Small leaves any layer may use: clocks and dates.

pub mod time;
