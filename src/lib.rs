pub mod digest;
pub mod reference;
pub mod store;
