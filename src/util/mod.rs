//! Small leaves any layer may use: clocks and dates, file-system errors
//! with context.

pub(crate) mod fs;
pub(crate) mod singleflight;
pub mod time;
