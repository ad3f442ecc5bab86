//! This process as one member of a fleet: the instance name it holds a lease
//! on while it runs ([`lease`]), and the removal of consumers that instances
//! gone for good left in the groups ([`cleanup`]). Subscriptions and sinks
//! both name their consumers after the instance, so both look here.

pub mod cleanup;
pub mod lease;
