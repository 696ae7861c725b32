//! The Drover agent contract, shared by every backend.
//!
//! An agent drives one storage backend through a [`Driver`] and serves `drover.agent.v1`.
//! This crate holds everything that is the same for every backend:
//!
//! - [`driver`]: the `Driver` trait and its types: what a backend must do;
//! - [`server`]: the gRPC server, whose guard wraps every mutating driver call in the
//!   guarantees the orchestrator relies on (DESIGN.md, invariant 3): fencing by epoch per
//!   group or volume, idempotency by op_id (outcomes persisted in the [`ledger`]), and
//!   one mutation at a time per volume or group (a second gets ABORTED); the [`oplog`]
//!   is its optional account of each mutation it let the driver run;
//! - [`replica`]: the agent-to-agent stream that carries recovery points;
//! - [`roles`]: the role rules (promote, demote, resync) every driver applies;
//! - [`registration`]: heartbeats to the orchestrator, and [`returning`]: fenced on
//!   return (writes held at start until an orchestrator confirms the primary role);
//! - [`config`] and [`launch`]: the settings common to every agent, and starting one.
//!
//! Backends live in their own crates (`drover-agent-qemu`, `drover-agent-mock`, …) and
//! implement [`launch::Backend`]; the `drover` binary lists them in one place. With the
//! `testing` feature, [`conformance`] is the suite every driver must pass.

pub mod config;
#[cfg(feature = "testing")]
pub mod conformance;
pub mod driver;
pub mod launch;
pub mod ledger;
pub mod metrics;
pub mod oplog;
pub mod registration;
pub mod replica;
pub mod returning;
pub mod roles;
pub mod server;

pub use driver::{Driver, DriverError};
