//! The Drover agent.
//!
//! An agent drives one storage backend through a [`Driver`] and serves `drover.agent.v1`.
//! The [`server`] wraps every mutating driver call in the guarantees the orchestrator
//! relies on (DESIGN.md, invariant 3):
//!
//! - **fencing**: each call carries an epoch for a fence scope (a group or a volume); the
//!   highest epoch seen per scope is persisted in the [`ledger`], and lower ones are
//!   refused with FailedPrecondition "stale epoch";
//! - **idempotency**: the terminal outcome of each op_id is persisted, and a repeated
//!   op_id gets that outcome without touching the driver again;
//! - **one mutation at a time** per volume or group: a second gets ABORTED.
//!
//! [`qemu::QemuDriver`] drives qemu-storage-daemon, the reference backend that moves real
//! data. [`mock::MockDriver`] is an in-memory driver for control-plane tests and benchmarks.

pub mod config;
pub mod conformance;
pub mod driver;
pub mod ledger;
pub mod mock;
pub mod qemu;
pub mod registration;
pub mod replica;
pub mod server;

pub use driver::{Driver, DriverError};
