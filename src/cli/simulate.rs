//! `tripline simulate`: realistic telemetry for demos and load. N devices ×
//! M interfaces with error counters that grow slowly, burst now and then past
//! the shipped thresholds and reset (a reboot); optical receive power that
//! drifts around −30 dBm and sometimes sinks below −40 dBm and recovers.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::{RngExt, SeedableRng};
use serde_json::json;

use crate::config::{Config, MAX_SHARDS};
use crate::decode::{WATERMILL_METADATA, WATERMILL_PAYLOAD, WATERMILL_UUID, encode_metadata};
use crate::outbox::hash_tag;
use crate::redis_conn::{RedisEndpoint, RedisTarget};
use crate::shard::stream_for;

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Format {
    /// Watermill envelope (`_watermill_message_uuid`, msgpack `metadata`, JSON `payload`).
    Watermill,
    /// One `payload` field holding the JSON.
    Json,
    /// Flat fields (`hostname r1 input_errors 600 …`).
    Flat,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Messages per second in total; 0 publishes as fast as Redis takes them.
    #[arg(long, default_value_t = 200)]
    pub rate: u64,
    /// Stop after this many messages.
    #[arg(long)]
    pub count: Option<u64>,
    /// Stop after this long (e.g. `30s`, `5m`).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// Number of simulated routers.
    #[arg(long, default_value_t = 4)]
    pub devices: u32,
    /// Interfaces per router.
    #[arg(long, default_value_t = 4)]
    pub interfaces: u32,
    /// Wire format of the published entries.
    #[arg(long, value_enum, default_value_t = Format::Watermill)]
    pub format: Format,
    /// Stream for interface error counters.
    #[arg(long, default_value = "packet-counter-errors")]
    pub stream: String,
    /// Stream for optical power readings; empty to publish none.
    #[arg(long, default_value = "transceiver-telemetry")]
    pub transceiver_stream: String,
    /// Publish to sharded topics: each reading goes to `<stream>:{n}`, the
    /// shard its router's name hashes to (1 = the streams themselves).
    #[arg(long, default_value_t = 1)]
    pub shards: u32,
    /// Share of readings that are optical power (0..=1).
    #[arg(long, default_value_t = 0.25)]
    pub transceiver_share: f64,
    /// Chance per reading of a burst of errors past the alert thresholds.
    #[arg(long, default_value_t = 0.02)]
    pub burst_chance: f64,
    /// Random seed, for reproducible runs.
    #[arg(long)]
    pub seed: Option<u64>,
}

struct Port {
    hostname: String,
    interface: String,
    input_errors: i64,
    rx_power_dbm: f64,
}

/// The evolving state of the simulated network.
pub struct Network {
    ports: Vec<Port>,
    rng: rand::rngs::StdRng,
    burst_chance: f64,
}

impl Network {
    pub fn new(devices: u32, interfaces: u32, burst_chance: f64, seed: u64) -> Network {
        let mut ports = Vec::new();
        for d in 0..devices {
            for i in 0..interfaces {
                ports.push(Port {
                    hostname: format!("router-{:02}", d + 1),
                    interface: format!("et-0/0/{i}"),
                    input_errors: 0,
                    rx_power_dbm: -30.0,
                });
            }
        }
        Network {
            ports,
            rng: rand::rngs::StdRng::seed_from_u64(seed),
            burst_chance,
        }
    }

    /// Next interface error reading: a monotonic counter creeping up by a few
    /// errors per reading (well under the shipped rate alert), with bursts
    /// past the thresholds and resets (reboots).
    pub fn counter_reading(&mut self) -> serde_json::Value {
        let n = self.rng.random_range(0..self.ports.len());
        let roll: f64 = self.rng.random();
        let burst = self.rng.random_range(10_000..150_000);
        let step = self.rng.random_range(0..4);
        let p = &mut self.ports[n];
        if roll < 0.01 {
            p.input_errors = 0;
        } else if roll < 0.01 + self.burst_chance {
            p.input_errors += burst;
        } else {
            p.input_errors += step;
        }
        json!({"hostname": p.hostname, "interface": p.interface, "input_errors": p.input_errors})
    }

    /// Next optical receive power reading (a random walk pulled back to −30).
    pub fn power_reading(&mut self) -> serde_json::Value {
        let n = self.rng.random_range(0..self.ports.len());
        let drift: f64 = self.rng.random_range(-1.5..1.5);
        let dip = self.rng.random_bool(0.01);
        let p = &mut self.ports[n];
        p.rx_power_dbm += drift + (-30.0 - p.rx_power_dbm) * 0.05;
        if dip {
            p.rx_power_dbm = -42.0;
        }
        let value = (p.rx_power_dbm * 100.0).round() / 100.0;
        json!({"hostname": p.hostname, "interface": p.interface, "rx_power_dbm": value})
    }
}

/// The fields of one entry in the chosen format.
pub fn encode(format: Format, body: &serde_json::Value) -> Vec<(String, Vec<u8>)> {
    match format {
        Format::Watermill => vec![
            (
                WATERMILL_UUID.to_string(),
                uuid::Uuid::new_v4().to_string().into_bytes(),
            ),
            (
                WATERMILL_METADATA.to_string(),
                encode_metadata(&[("source", "tripline-simulate")]),
            ),
            (WATERMILL_PAYLOAD.to_string(), body.to_string().into_bytes()),
        ],
        Format::Json => vec![("payload".to_string(), body.to_string().into_bytes())],
        Format::Flat => body
            .as_object()
            .map(|o| {
                o.iter()
                    .map(|(k, v)| {
                        let text = match v {
                            serde_json::Value::String(s) => s.clone(),
                            other => other.to_string(),
                        };
                        (k.clone(), text.into_bytes())
                    })
                    .collect()
            })
            .unwrap_or_default(),
    }
}

pub fn simulate(config_path: Option<&Path>, args: Args) -> anyhow::Result<()> {
    let config = Config::load(config_path)?;
    let endpoint = config.redis.endpoint().map_err(anyhow::Error::msg)?;
    let target = config.redis.target().map_err(anyhow::Error::msg)?;
    if args.devices == 0 || args.interfaces == 0 {
        anyhow::bail!("--devices and --interfaces must be at least 1");
    }
    if !(1..=MAX_SHARDS).contains(&args.shards) {
        anyhow::bail!("--shards must be 1..={MAX_SHARDS}");
    }
    if !(0.0..=1.0).contains(&args.transceiver_share) || !(0.0..=1.0).contains(&args.burst_chance) {
        anyhow::bail!("--transceiver-share and --burst-chance must be between 0 and 1");
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(publish(target, endpoint, args))
}

async fn publish(target: RedisTarget, endpoint: RedisEndpoint, args: Args) -> anyhow::Result<()> {
    let mut conn = target
        .connect(super::REDIS_REPLY_TIMEOUT)
        .await
        .with_context(|| format!("cannot connect to Redis at {endpoint}"))?;
    let seed = args.seed.unwrap_or_else(rand::random);
    let mut net = Network::new(args.devices, args.interfaces, args.burst_chance, seed);
    let mut mix = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed);
    let started = Instant::now();
    let tick = Duration::from_millis(50);
    let per_tick = if args.rate == 0 {
        500
    } else {
        (args.rate / 20).max(1)
    };
    let tty = std::io::stderr().is_terminal();
    let mut sent: u64 = 0;
    let mut last_report = Instant::now();
    let stop = tokio::signal::ctrl_c();
    tokio::pin!(stop);
    let mut next = tokio::time::Instant::now();
    loop {
        if args.count.is_some_and(|c| sent >= c)
            || args.duration.is_some_and(|d| started.elapsed() >= d)
        {
            break;
        }
        let n = match args.count {
            Some(c) => per_tick.min(c - sent),
            None => per_tick,
        };
        // One pipeline per hash slot: a Cluster pipeline must stay in one.
        let mut pipes: BTreeMap<String, redis::Pipeline> = BTreeMap::new();
        for _ in 0..n {
            let (topic, body) =
                if !args.transceiver_stream.is_empty() && mix.random_bool(args.transceiver_share) {
                    (&args.transceiver_stream, net.power_reading())
                } else {
                    (&args.stream, net.counter_reading())
                };
            let device = body["hostname"].as_str().unwrap_or_default();
            let stream = stream_for(topic, args.shards, device);
            let mut cmd = redis::cmd("XADD");
            cmd.arg(&stream).arg("*");
            for (k, v) in encode(args.format, &body) {
                cmd.arg(k).arg(v);
            }
            let slot = if conn.is_cluster() {
                hash_tag(&stream).to_string()
            } else {
                String::new()
            };
            pipes.entry(slot).or_default().add_command(cmd).ignore();
        }
        for pipe in pipes.values() {
            let _: () = pipe
                .query_async(&mut conn)
                .await
                .context("publishing to Redis failed")?;
        }
        sent += n;
        if tty && last_report.elapsed() >= Duration::from_secs(1) {
            let rate = sent as f64 / started.elapsed().as_secs_f64();
            eprint!("\rsimulate: {sent} messages sent, {rate:.0} msg/s   ");
            last_report = Instant::now();
        }
        if args.rate > 0 {
            next += tick;
            tokio::select! {
                _ = tokio::time::sleep_until(next) => {}
                _ = &mut stop => break,
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    if tty {
        eprintln!();
    }
    eprintln!(
        "simulate: {sent} messages in {secs:.1}s ({:.0} msg/s)",
        sent as f64 / secs.max(1e-9)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_grow_burst_and_reset() {
        let mut net = Network::new(1, 1, 0.05, 7);
        let (mut resets, mut bursts, mut prev) = (0, 0, 0);
        for _ in 0..5000 {
            let v = net.counter_reading()["input_errors"].as_i64().unwrap();
            if v < prev {
                resets += 1;
            }
            if v - prev >= 10_000 {
                bursts += 1;
            }
            prev = v;
        }
        assert!(
            resets > 10 && bursts > 50,
            "resets {resets} bursts {bursts}"
        );
    }

    #[test]
    fn power_dips_below_alarm_and_recovers() {
        let mut net = Network::new(1, 1, 0.0, 3);
        let values: Vec<f64> = (0..5000)
            .map(|_| net.power_reading()["rx_power_dbm"].as_f64().unwrap())
            .collect();
        assert!(values.iter().any(|v| *v < -40.0));
        assert!(values.iter().filter(|v| **v >= -40.0).count() > 4000);
    }
}
