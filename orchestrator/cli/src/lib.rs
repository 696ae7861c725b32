//! The `drover` command's library: API clients, output formatting, process management for
//! local clusters, and the two-site drill. Integration tests use the same pieces.

pub mod client;
pub mod cluster;
pub mod drill;
pub mod output;
pub mod size;
