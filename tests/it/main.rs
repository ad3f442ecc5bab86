//! One integration-test binary (compiled once); each module is one area.
//! Every test starts its own `redis-server` and real `tripline` processes.

mod pipeline;
mod sinks;
mod util;
