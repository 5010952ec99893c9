//! Small leaves any layer may use: clocks and dates, file-system errors
//! with context, sizes and ages for people, accounts and groups.

pub(crate) mod fs;
pub(crate) mod singleflight;
pub mod time;
pub mod units;
pub mod users;
