//! Reload latency: from the moment a rule file is saved to the moment the
//! new rule decides, over many reloads while a light stream flows.
//!
//! `cargo bench --bench reload` (`RELOADS=200` for more). Starts its own
//! `redis-server` and the real `tripline` binary. Each round saves a new
//! version of a rule (temp file + rename, as editors do); every message
//! raises an alert labelled with the version that judged it, and the file
//! sink writes them out. Two figures per round:
//! - in effect: the judge time of the first message judged by the new
//!   version (the alert's `starts_at`) minus the save time;
//! - delivered: when that alert appeared in the sink's file.
//!
//! Under `cargo test` (no `--bench` argument) it runs a few rounds only, to
//! check that it still works.

#[path = "../tests/it/util.rs"]
mod util;

use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use util::*;

/// Time between two messages of the background stream.
const MESSAGE_GAP: Duration = Duration::from_millis(2);

fn rule(version: usize) -> String {
    format!(
        "fn on_message(msg, ctx) {{\n    alert(#{{ name: \"Seen\", labels: #{{ seq: `${{msg.seq}}`, version: \"{version}\" }} }});\n}}\n"
    )
}

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Reads the lines a file sink appends, from where the last call stopped.
struct Tail {
    path: std::path::PathBuf,
    offset: u64,
}

impl Tail {
    fn new_alerts(&mut self) -> Vec<serde_json::Value> {
        let Ok(mut f) = std::fs::File::open(&self.path) else {
            return Vec::new();
        };
        f.seek(SeekFrom::Start(self.offset)).unwrap();
        let mut out = Vec::new();
        let mut reader = BufReader::new(f);
        let mut line = String::new();
        // Only whole lines: a line still being written is read next time.
        while reader.read_line(&mut line).unwrap() > 0 && line.ends_with('\n') {
            self.offset += line.len() as u64;
            out.push(serde_json::from_str(&line).unwrap());
            line.clear();
        }
        out
    }
}

fn percentile(sorted: &[i64], p: f64) -> i64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn report(what: &str, mut ms: Vec<i64>) {
    ms.sort_unstable();
    println!(
        "{what:>10}: p50 {} ms, p90 {} ms, p99 {} ms, max {} ms (n = {})",
        percentile(&ms, 0.5),
        percentile(&ms, 0.9),
        percentile(&ms, 0.99),
        ms[ms.len() - 1],
        ms.len()
    );
}

fn main() {
    let benching = std::env::args().any(|a| a == "--bench");
    let rounds: usize = match std::env::var("RELOADS") {
        Ok(n) => n.parse().expect("RELOADS must be a number"),
        Err(_) if benching => 100,
        Err(_) => 3,
    };
    let redis = RedisServer::start();
    let project = Project::new(
        &config("  - name: bench\n    streams: [bench]\n"),
        &[("rules/r.rhai", &rule(0)), ("plugins/file.yaml", FILE_SINK)],
    );
    let tl = project.start(&redis);
    assert!(
        wait_until(Duration::from_secs(20), || tl
            .stderr()
            .contains("watching rules and plugins for changes")),
        "tripline did not start:\n{}",
        tl.stderr()
    );

    let stop = Arc::new(AtomicBool::new(false));
    let producer = {
        let stop = stop.clone();
        let mut con = redis.conn();
        std::thread::spawn(move || {
            let mut seq = 0u64;
            while !stop.load(Ordering::SeqCst) {
                seq += 1;
                xadd(&mut con, "bench", &[("seq", seq.to_string().as_bytes())]);
                std::thread::sleep(MESSAGE_GAP);
            }
            seq
        })
    };

    let path = project.path("rules/r.rhai");
    let tmp = project.path("rules/.r.rhai.tmp");
    let mut tail = Tail {
        path: project.path("alerts.jsonl"),
        offset: 0,
    };
    let (mut in_effect, mut delivered) = (Vec::new(), Vec::new());
    for version in 1..=rounds {
        tail.new_alerts();
        let saved_ms = unix_ms();
        let saved = Instant::now();
        std::fs::write(&tmp, rule(version)).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        let want = version.to_string();
        let first = loop {
            let hit = tail
                .new_alerts()
                .into_iter()
                .find(|a| a["labels"]["version"] == want.as_str());
            if let Some(a) = hit {
                break a;
            }
            assert!(
                saved.elapsed() < Duration::from_secs(10),
                "version {version} never took effect:\n{}",
                tl.stderr()
            );
            std::thread::sleep(Duration::from_millis(1));
        };
        delivered.push(saved.elapsed().as_millis() as i64);
        let judged = chrono::DateTime::parse_from_rfc3339(first["starts_at"].as_str().unwrap())
            .unwrap()
            .timestamp_millis();
        in_effect.push(judged - saved_ms);
    }
    stop.store(true, Ordering::SeqCst);
    let messages = producer.join().unwrap();

    println!(
        "reload latency, {rounds} reloads (rename over), stream of one message every {MESSAGE_GAP:?} ({messages} messages):"
    );
    report("in effect", in_effect);
    report("delivered", delivered);
}
