//! One integration-test binary (compiled once); each module is one area.
//! Every test starts its own `redis-server` and real `tripline` processes.

mod cli;
mod cluster;
mod contrib;
mod http;
mod http_limits;
mod ingest;
mod lifecycle;
mod log_targets;
mod logging;
mod metrics;
mod pipeline;
mod reader;
mod redis_state;
mod reload;
mod sandbox;
mod seed_wire;
mod sinks;
mod status;
mod tls;
mod util;
