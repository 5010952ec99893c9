//! Running on a host: client setup, the doctor's checks, and systemd.

pub mod doctor;
pub mod setup;
pub mod systemd;
