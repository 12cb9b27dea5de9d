//! Test fixtures shared by kappa's crates (dev-only): seeded data generators, a simulated
//! clock, storage that counts fsyncs and fails on demand, and helpers to run `kappa up` as a
//! child process.

pub mod clock;
pub mod data;
pub mod fs;
pub mod kafka;
pub mod process;
pub mod python;
pub mod sim;
pub mod storage;
