//! One integration-test binary (compiled once); each module is one area.
//! Every test starts its own `redis-server` and real `tripline` processes.

mod cli;
mod cluster;
mod contrib;
mod http;
mod lifecycle;
mod logging;
mod pipeline;
mod reader;
mod reload;
mod seed_wire;
mod sinks;
mod util;
