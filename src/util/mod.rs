//! Small leaves any layer may use: clocks and dates, file-system errors
//! with context.

pub mod fs;
pub mod singleflight;
pub mod time;
