//! The wall-clock budget of one rule call (`limits.max_eval_time`).
//!
//! The operations limit bounds the number of steps, not their cost: a `push`
//! or a map insert re-measures the whole collection, so a loop that grows one
//! costs time quadratic in its size and reached seconds per message before
//! any size or operations limit stopped it. Rhai calls the progress callback
//! before every operation; the callback reads the clock every
//! [`CHECK_EVERY`] operations and stops the call once its budget is spent.

use std::cell::Cell;
use std::time::{Duration, Instant};

use rhai::Dynamic;

/// Operations between two looks at the clock. Reading it costs about as much
/// as a few cheap operations, so reading it on every one would slow every
/// rule; the dearest single operation (measuring a full array or map after a
/// change, or building a 64 KiB string) costs tens of microseconds, so the
/// call overshoots its budget by at most a few milliseconds.
const CHECK_EVERY: u64 = 64;

thread_local! {
    /// When the rule call running on this thread started; `None` between
    /// calls, so nothing else that runs the engine is ever stopped by it.
    static STARTED: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// Starts the budget of one call on this thread; it ends when the returned
/// guard drops.
pub(crate) fn start() -> Running {
    STARTED.set(Some(Instant::now()));
    Running
}

/// A rule call in progress on this thread (see [`start`]).
pub(crate) struct Running;

impl Drop for Running {
    fn drop(&mut self) {
        STARTED.set(None);
    }
}

/// The engine's progress callback: `Some(reason)` stops the running call.
pub(crate) fn check(ops: u64, budget: Duration) -> Option<Dynamic> {
    if !ops.is_multiple_of(CHECK_EVERY) {
        return None;
    }
    let started = STARTED.get()?;
    (started.elapsed() > budget).then(|| {
        format!(
            "stopped after limits.max_eval_time ({})",
            humantime::format_duration(budget)
        )
        .into()
    })
}
