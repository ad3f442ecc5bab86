//! Alerts: the book that turns a stream of assertions into firing /
//! resolved notifications, the store that commits them, their timers and
//! silences. The alert itself is [`crate::model`]'s.

mod book;
mod lifecycle;
pub mod silence;
pub mod store;
mod stored;
pub mod timers;

pub use crate::model::{Alert, Fingerprint, Origin, Severity, Status, fingerprint};
pub use book::{AlertBook, Decision, Snapshot, Transition, Write};
pub use lifecycle::{Action, ActionKind, Policy};
