//! ferry's domain model: names, units, entities and the lifecycle state machine.
//!
//! Everything here is pure: no file, network or clock access (callers pass the time in).
pub mod entities;
pub mod lifecycle;
pub mod names;
pub mod units;

pub use entities::*;
pub use lifecycle::*;
pub use names::*;
pub use units::*;
