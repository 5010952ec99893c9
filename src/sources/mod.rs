//! Where images come from: Nix builds ([`nix`]), upstream registries
//! ([`mirror`]) and OCI layouts on disk ([`layout`]).

pub mod layout;
pub mod mirror;
pub mod nix;
