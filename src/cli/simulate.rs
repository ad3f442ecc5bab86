//! `tripline simulate`: realistic telemetry for demos and load. N devices ×
//! M interfaces whose error counters behave like real interface counters: a
//! steady trickle of a few errors per minute, now and then a burst of
//! hundreds per second that lasts a minute or two (a dirty optic, a bad
//! cable), and rarely a reset to zero (a reboot). Optical receive power
//! drifts around −30 dBm and sometimes sinks below −40 dBm for a while.
//!
//! The counters follow the clock (the elapsed time between two readings of
//! a port), not the reading rate, so the rate a rule computes is the same
//! whatever `--rate` is, and a burst stays a burst across many readings
//! instead of one jump that looks like an alert flapping.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::{RngExt, SeedableRng};
use serde_json::json;

use crate::config::{MAX_SHARDS, Settings};
use crate::decode::{WATERMILL_METADATA, WATERMILL_PAYLOAD, WATERMILL_UUID, encode_metadata};
use crate::keys::hash_tag;
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
    /// Chance per interface per minute that a burst of errors (100–2000/s
    /// for 30 s to 3 min, past the shipped alert thresholds) starts.
    #[arg(long, default_value_t = 0.1)]
    pub burst_chance: f64,
    /// Random seed, for reproducible runs.
    #[arg(long)]
    pub seed: Option<u64>,
}

struct Port {
    hostname: String,
    interface: String,
    /// The counter, fractional so that a trickle below one error per
    /// reading still adds up; published rounded down.
    input_errors: f64,
    /// Errors per second outside bursts: most links see a few per minute.
    trickle: f64,
    /// Errors per second and end (ms) of the burst in progress.
    burst: Option<(f64, u64)>,
    /// When this port was last read (ms); its counter advanced to then.
    last_ms: u64,
    rx_power_dbm: f64,
    /// End (ms) of the receive power dip in progress.
    dip_until_ms: u64,
    /// When its power was last read (ms).
    last_power_ms: u64,
}

/// Chance per port per hour of a reboot, which resets its counters.
const RESETS_PER_HOUR: f64 = 0.2;
/// Chance per port per minute of a receive power dip below the alarm.
const DIPS_PER_MINUTE: f64 = 0.03;

/// The evolving state of the simulated network.
pub struct Network {
    ports: Vec<Port>,
    rng: rand::rngs::StdRng,
    /// Chance per port per minute that a burst starts.
    burst_chance: f64,
    /// The port whose counter is read next, then its power: ports take
    /// turns like devices polled on a schedule. Picked at random, one port
    /// was sometimes read twice within a millisecond, and a counter that had
    /// no time to grow read as a rate of 0/s in the middle of a burst.
    next_counter: usize,
    next_power: usize,
}

impl Network {
    pub fn new(devices: u32, interfaces: u32, burst_chance: f64, seed: u64) -> Network {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut ports = Vec::new();
        for d in 0..devices {
            for i in 0..interfaces {
                ports.push(Port {
                    hostname: format!("router-{:02}", d + 1),
                    interface: format!("et-0/0/{i}"),
                    input_errors: rng.random_range(0.0..400.0),
                    trickle: rng.random_range(0.0..0.2),
                    burst: None,
                    last_ms: 0,
                    rx_power_dbm: rng.random_range(-32.0..-28.0),
                    dip_until_ms: 0,
                    last_power_ms: 0,
                });
            }
        }
        Network {
            ports,
            rng,
            burst_chance,
            next_counter: 0,
            next_power: 0,
        }
    }

    /// Whether an event expected `per_second` times a second happened in
    /// the last `secs` seconds.
    fn happened(rng: &mut rand::rngs::StdRng, per_second: f64, secs: f64) -> bool {
        let p = 1.0 - (-per_second * secs).exp();
        p > 0.0 && rng.random_bool(p.min(1.0))
    }

    /// The interface error counter of the next port at `now_ms` (time since
    /// the simulation started): advanced by its trickle or burst rate over
    /// the time since it was last read; sometimes reset.
    pub fn counter_reading(&mut self, now_ms: u64) -> serde_json::Value {
        let n = self.next_counter;
        self.next_counter = (n + 1) % self.ports.len();
        let rng = &mut self.rng;
        let p = &mut self.ports[n];
        let secs = now_ms.saturating_sub(p.last_ms) as f64 / 1000.0;
        p.last_ms = now_ms.max(p.last_ms);
        let rate = match p.burst {
            Some((rate, until)) if until > now_ms => rate,
            _ => {
                p.burst = None;
                if Self::happened(rng, self.burst_chance / 60.0, secs) {
                    let rate = rng.random_range(100.0..2000.0);
                    let lasts = rng.random_range(30_000..180_000);
                    p.burst = Some((rate, now_ms + lasts));
                }
                p.trickle
            }
        };
        if Self::happened(rng, RESETS_PER_HOUR / 3600.0, secs) {
            p.input_errors = 0.0;
        } else {
            p.input_errors += rate * secs;
        }
        json!({"hostname": p.hostname, "interface": p.interface, "input_errors": p.input_errors as i64})
    }

    /// The optical receive power of the next port at `now_ms`: a random
    /// walk pulled back to its level, now and then a dip below −40 dBm
    /// that lasts tens of seconds.
    pub fn power_reading(&mut self, now_ms: u64) -> serde_json::Value {
        let n = self.next_power;
        self.next_power = (n + 1) % self.ports.len();
        let rng = &mut self.rng;
        let p = &mut self.ports[n];
        let secs = now_ms.saturating_sub(p.last_power_ms) as f64 / 1000.0;
        p.last_power_ms = now_ms.max(p.last_power_ms);
        if p.dip_until_ms <= now_ms && Self::happened(rng, DIPS_PER_MINUTE / 60.0, secs) {
            p.dip_until_ms = now_ms + rng.random_range(20_000..90_000);
        }
        let level = if p.dip_until_ms > now_ms {
            -42.0
        } else {
            -30.0
        };
        let drift: f64 = rng.random_range(-0.3..0.3);
        p.rx_power_dbm += drift + (level - p.rx_power_dbm) * 0.3;
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
    let config = Settings::load(config_path)?;
    let endpoint = config.redis.endpoint.clone();
    let target = config.redis.target;
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
            let now_ms = started.elapsed().as_millis() as u64;
            let (topic, body) =
                if !args.transceiver_stream.is_empty() && mix.random_bool(args.transceiver_share) {
                    (&args.transceiver_stream, net.power_reading(now_ms))
                } else {
                    (&args.stream, net.counter_reading(now_ms))
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

    /// (seconds, counter) of one port read once a second for `secs`.
    fn counter_series(burst_chance: f64, secs: u64, seed: u64) -> Vec<(u64, i64)> {
        let mut net = Network::new(1, 1, burst_chance, seed);
        (1..=secs)
            .map(|s| {
                let v = net.counter_reading(s * 1000)["input_errors"]
                    .as_i64()
                    .unwrap();
                (s, v)
            })
            .collect()
    }

    #[test]
    fn counters_trickle_burst_for_minutes_and_rarely_reset() {
        let series = counter_series(0.5, 24 * 3600, 7);
        let (mut resets, mut quiet, mut bursting) = (0, 0, 0);
        for w in series.windows(2) {
            let rate = w[1].1 - w[0].1;
            if rate < 0 {
                resets += 1;
            } else if rate < 5 {
                quiet += 1;
            } else if rate >= 90 {
                bursting += 1;
            } else {
                panic!("a rate between trickle and burst: {rate}/s at {}s", w[1].0);
            }
        }
        assert!((1..=20).contains(&resets), "resets {resets}");
        assert!(
            quiet > bursting && bursting > 600,
            "quiet {quiet} bursting {bursting}"
        );
    }

    /// What made the demo look like flapping: a burst was one jump, so the
    /// rate alert fired and resolved within a second.
    #[test]
    fn rate_alert_would_not_resolve_within_seconds_of_firing() {
        for seed in 0..20 {
            let series = counter_series(0.5, 3600, seed);
            let mut fired_at = None;
            for w in series.windows(2) {
                let rate = w[1].1 - w[0].1;
                match fired_at {
                    None if rate > 50 => fired_at = Some(w[1].0),
                    Some(at) if (0..5).contains(&rate) => {
                        assert!(
                            w[1].0 - at >= 30,
                            "seed {seed}: fired at {at}s, cleared at {}s",
                            w[1].0
                        );
                        fired_at = None;
                    }
                    _ => {}
                }
            }
        }
    }

    /// A port read twice in one publishing tick showed no growth, a rate of
    /// 0/s in the middle of a burst: the demo's rate alert resolved and
    /// fired again within seconds.
    #[test]
    fn ports_take_turns_so_none_is_read_twice_in_a_tick() {
        let mut net = Network::new(4, 4, 1.0, 5);
        for tick in 0..1000u64 {
            let mut seen = std::collections::HashSet::new();
            for _ in 0..10 {
                let r = net.counter_reading(tick * 50);
                let port = format!("{}|{}", r["hostname"], r["interface"]);
                assert!(seen.insert(port), "tick {tick}");
            }
        }
    }

    #[test]
    fn power_dips_below_alarm_for_a_while_and_recovers() {
        let mut net = Network::new(1, 1, 0.0, 3);
        let values: Vec<f64> = (1..=3 * 3600)
            .map(|s| {
                net.power_reading(s * 1000)["rx_power_dbm"]
                    .as_f64()
                    .unwrap()
            })
            .collect();
        let low = values.iter().filter(|v| **v < -40.0).count();
        assert!(low > 20, "{low} readings below -40");
        assert!(values.iter().filter(|v| **v >= -40.0).count() > 9000);
        let dips = values
            .windows(2)
            .filter(|w| w[0] >= -40.0 && w[1] < -40.0)
            .count();
        assert!(
            dips >= 1 && low / dips >= 10,
            "{dips} dips, {low} low readings"
        );
    }
}
