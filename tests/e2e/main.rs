//! End-to-end tests: drive the real `ferry` binary exactly as /work/shared/CLI.md specifies.
//! One test binary (faster links); one module per area.

mod harness;
mod harness_selftest;

mod agents;
mod cli;
mod cloud;
mod crashes;
mod drills;
mod encryption;
mod failback_rules;
mod faultproxy;
mod faults;
mod guest;
mod jobs;
mod lifecycle;
mod matrix;
mod networks;
mod plans;
mod qemu;
mod serve;
mod setup;
mod storefaults;
