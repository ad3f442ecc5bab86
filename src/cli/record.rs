//! `tripline record STREAM...`: dumps a range of one or more streams from
//! Redis into the replay format, so a rule change can be backtested on
//! yesterday's telemetry with `tripline replay`. Several streams are merged
//! in id (time) order, as they were written. Reading is paged, so a day of
//! telemetry never sits in memory.

use std::collections::VecDeque;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;

use crate::clock::parse_rfc3339;
use crate::config::Settings;
use crate::group_reader::reply::{StreamEntry, parse_entries};
use crate::replay::Record;

/// Entries fetched per XRANGE call.
const PAGE: usize = 1000;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Streams to dump; several are merged in id order.
    #[arg(required = true, value_name = "STREAM")]
    pub streams: Vec<String>,
    /// First entry: a stream id (`1700000000000-0`), an RFC 3339 time, or how long ago (`24h`). Default: the oldest.
    #[arg(long, value_parser = parse_bound, default_value = "-")]
    pub from: Bound,
    /// Last entry, in the same forms (inclusive). Default: the newest.
    #[arg(long, value_parser = parse_bound, default_value = "+")]
    pub to: Bound,
    /// At most this many entries per stream.
    #[arg(long)]
    pub count: Option<u64>,
    /// Output file; standard output if absent or `-`.
    #[arg(long, short = 'o', value_name = "FILE.jsonl")]
    pub output: Option<PathBuf>,
}

/// One end of the range.
#[derive(Debug, Clone, PartialEq)]
pub enum Bound {
    /// Passed to XRANGE as is: `-`, `+`, `<ms>` or `<ms>-<seq>`.
    Id(String),
    /// This long before now.
    Ago(Duration),
}

fn parse_bound(s: &str) -> Result<Bound, String> {
    let s = s.trim();
    let is_id = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
    if s == "-" || s == "+" {
        return Ok(Bound::Id(s.to_string()));
    }
    if let Some((ms, seq)) = s.split_once('-')
        && is_id(ms)
        && is_id(seq)
    {
        return Ok(Bound::Id(s.to_string()));
    }
    if is_id(s) {
        return Ok(Bound::Id(s.to_string()));
    }
    if let Some(ms) = parse_rfc3339(s) {
        return Ok(Bound::Id(ms.to_string()));
    }
    humantime::parse_duration(s).map(Bound::Ago).map_err(|_| {
        format!(
            "`{s}` is not a stream id (1700000000000-0), an RFC 3339 time (2025-01-01T00:00:00Z) or a duration ago (24h)"
        )
    })
}

impl Bound {
    fn resolve(&self, now_ms: u64) -> String {
        match self {
            Bound::Id(s) => s.clone(),
            Bound::Ago(d) => now_ms.saturating_sub(d.as_millis() as u64).to_string(),
        }
    }
}

/// Reads one stream page by page.
struct Cursor {
    /// The stream read.
    stream: String,
    /// Where the next page starts (`(<id>` after the first page: exclusive).
    next: String,
    /// Last id of the range (inclusive).
    end: String,
    /// Entries fetched and not yet written.
    buffer: VecDeque<StreamEntry>,
    /// Entries still allowed by `--count`.
    left: u64,
    /// The last page came back short: the range is read to its end.
    exhausted: bool,
    /// Lines written for this stream, for the closing report.
    written: u64,
}

impl Cursor {
    /// The next entry, fetching a page when the buffer is empty.
    fn peek(
        &mut self,
        con: &mut dyn redis::ConnectionLike,
    ) -> anyhow::Result<Option<&StreamEntry>> {
        if self.buffer.is_empty() && !self.exhausted && self.left > 0 {
            let want = PAGE.min(usize::try_from(self.left).unwrap_or(PAGE));
            let reply: redis::Value = redis::cmd("XRANGE")
                .arg(&self.stream)
                .arg(&self.next)
                .arg(&self.end)
                .arg("COUNT")
                .arg(want)
                .query(con)
                .with_context(|| format!("XRANGE {} failed", self.stream))?;
            let page = parse_entries(reply);
            if page.len() < want {
                self.exhausted = true;
            }
            if let Some(last) = page.last() {
                self.next = format!("({}", last.id);
            }
            self.buffer.extend(page);
        }
        Ok(self.buffer.front())
    }
}

/// `(ms, seq)` of an id, for merging streams in time order.
fn order(id: &str) -> (u64, u64) {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    (ms.parse().unwrap_or(0), seq.parse().unwrap_or(0))
}

pub fn record(config_path: Option<&Path>, args: Args) -> anyhow::Result<()> {
    let config = Settings::load(config_path)?;
    let endpoint = &config.redis.endpoint;
    let mut con = config
        .redis
        .target
        .connect_blocking()
        .with_context(|| format!("cannot connect to Redis at {endpoint}"))?;
    let now = crate::clock::now_ms();
    let (start, end) = (args.from.resolve(now), args.to.resolve(now));
    let mut cursors: Vec<Cursor> = args
        .streams
        .iter()
        .map(|s| Cursor {
            stream: s.clone(),
            next: start.clone(),
            end: end.clone(),
            buffer: VecDeque::new(),
            left: args.count.unwrap_or(u64::MAX),
            exhausted: false,
            written: 0,
        })
        .collect();
    let to_stdout = args.output.as_ref().is_none_or(|p| p.as_os_str() == "-");
    let sink: Box<dyn Write> = match &args.output {
        Some(p) if !to_stdout => Box::new(
            std::fs::File::create(p).with_context(|| format!("cannot create {}", p.display()))?,
        ),
        _ => Box::new(std::io::stdout().lock()),
    };
    let mut out = std::io::BufWriter::new(sink);
    loop {
        let mut best: Option<(usize, (u64, u64))> = None;
        for (i, c) in cursors.iter_mut().enumerate() {
            if let Some(e) = c.peek(&mut *con)? {
                let key = order(&e.id);
                if best.is_none_or(|(_, b)| key < b) {
                    best = Some((i, key));
                }
            }
        }
        let Some((i, _)) = best else { break };
        let c = &mut cursors[i];
        let entry = c.buffer.pop_front().expect("peeked");
        c.left -= 1;
        // An entry deleted (XDEL) while pending has no fields; nothing to replay.
        if let Some(fields) = entry.fields {
            writeln!(
                out,
                "{}",
                Record::from_entry(&c.stream, &entry.id, &fields).to_line()
            )?;
            c.written += 1;
        }
    }
    out.flush()?;
    let per_stream: Vec<String> = cursors
        .iter()
        .map(|c| format!("{} {}", c.stream, c.written))
        .collect();
    let total: u64 = cursors.iter().map(|c| c.written).sum();
    eprintln!(
        "record: {total} entries ({}) written to {}",
        per_stream.join(", "),
        match &args.output {
            Some(p) if !to_stdout => p.display().to_string(),
            _ => "standard output".into(),
        }
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_accept_ids_times_and_ages() {
        assert_eq!(parse_bound("-"), Ok(Bound::Id("-".into())));
        assert_eq!(
            parse_bound("1700000000000-3"),
            Ok(Bound::Id("1700000000000-3".into()))
        );
        assert_eq!(
            parse_bound("2025-01-01T00:00:00Z"),
            Ok(Bound::Id("1735689600000".into()))
        );
        assert_eq!(
            parse_bound("24h"),
            Ok(Bound::Ago(Duration::from_secs(86_400)))
        );
        assert!(
            parse_bound("yesterday")
                .unwrap_err()
                .contains("`yesterday`")
        );
        assert_eq!(Bound::Ago(Duration::from_secs(1)).resolve(5000), "4000");
    }

    #[test]
    fn ids_order_numerically() {
        assert!(order("999-5") < order("1000-0"));
        assert!(order("1000-2") < order("1000-10"));
    }
}
