//! `exec`: a long-running external program, in any language, gets one alert
//! JSON per line on its stdin.
//!
//! Protocol (with `ack: true`, the default): for every alert line the
//! program writes one line to stdout once it has handled it: `ok`, or
//! `error <reason>` to have the batch retried. A batch counts as delivered
//! only when every alert in it has been acknowledged, so a program killed
//! mid-batch loses nothing: the batch is sent again to its successor. Its
//! stderr goes to tripline's log, line by line.
//!
//! The program starts at the first delivery and is kept running. When it
//! exits (or stops answering within the manifest's `timeout`), the batch in
//! flight fails and is retried by the dispatcher; the next attempt starts a
//! new program, with exponential backoff between restarts of a program that
//! keeps dying. When the sink stops, the program's stdin is closed and it has
//! a few seconds to exit before it is killed.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout};
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::{BuildContext, DeliverFuture, Sink, SinkError, SinkSettings};
use crate::alert::Alert;
use crate::metrics::Metrics;
use crate::redis_conn::Backoff;

/// How long a stopping program may take to exit after its stdin closed.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// How long to wait for an exit status after the program's pipes broke.
const EXIT_WAIT: Duration = Duration::from_millis(500);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecSettings {
    /// The program: a path (with a `/`; relative to the manifest's
    /// directory) or a name looked up in `PATH`, as a shell does.
    pub command: String,
    /// Its arguments. The program runs in the manifest's directory, so a
    /// relative path among them is relative to the manifest too.
    #[serde(default)]
    pub args: Vec<String>,
    /// Variables added to the environment it inherits from tripline
    /// (secrets: `${ENV}`; values are never logged).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// `true`: the program answers each alert line with `ok` or
    /// `error <reason>` on stdout, and a batch is delivered once all are
    /// answered. `false`: a batch is delivered once written to its stdin (a
    /// crash may lose what it had not read yet); its stdout is logged.
    #[serde(default = "yes")]
    pub ack: bool,
}

fn yes() -> bool {
    true
}

impl SinkSettings for ExecSettings {
    fn validate(&self) -> Result<(), String> {
        if self.command.trim().is_empty() {
            return Err("`command` must not be empty".into());
        }
        Ok(())
    }

    fn build(self, cx: &BuildContext) -> Result<Box<dyn Sink>, String> {
        let program = if self.command.contains('/') {
            cx.base_dir.join(&self.command)
        } else {
            PathBuf::from(&self.command)
        };
        Ok(Box::new(ExecSink {
            program,
            dir: cx.base_dir.clone(),
            settings: self,
            sink: cx.sink.clone(),
            metrics: cx.metrics.clone(),
            state: Mutex::new(State {
                program: None,
                restarts: Backoff::new(Duration::from_millis(200), Duration::from_secs(30)),
                next_start: Instant::now(),
            }),
        }))
    }
}

pub struct ExecSink {
    settings: ExecSettings,
    /// `command` resolved against the manifest's directory.
    program: PathBuf,
    /// The manifest's directory: the program's working directory.
    dir: PathBuf,
    /// The sink's name, for log lines.
    sink: String,
    /// Where the program's exits are counted.
    metrics: Arc<Metrics>,
    /// Locked for a whole delivery: the program gets one batch at a time.
    state: Mutex<State>,
}

struct State {
    /// The running program; taken out while a batch is in flight, so a
    /// cancelled delivery (timeout) drops and stops it instead of leaving
    /// half a batch or late acknowledgements for the next one.
    program: Option<Program>,
    /// Spaces the restarts of a program that keeps exiting.
    restarts: Backoff,
    /// The next start may not happen before this.
    next_start: Instant,
}

/// One running instance of the program.
struct Program {
    /// `None` only inside `drop`/`stop`, which take it.
    child: Option<Child>,
    /// Closed (taken) to tell the program to finish.
    stdin: Option<ChildStdin>,
    /// Its stdout, read for acknowledgements; `None` with `ack: false`
    /// (then a task logs it).
    acks: Option<BufReader<ChildStdout>>,
    pid: u32,
}

/// How a batch failed.
enum Fault {
    /// The program answered `error …`: it is healthy and keeps running.
    Refused(String),
    /// Pipes broke or the protocol was violated: the program is replaced.
    Broken(String),
}

/// Logs every line of `r` (a pipe of the program) until it closes. Reads
/// bytes, not UTF-8 lines, so odd output never stops the draining (a full
/// pipe would block the program).
fn forward(sink: String, pid: u32, pipe: &'static str, r: impl AsyncRead + Unpin + Send + 'static) {
    tokio::spawn(async move {
        let mut r = BufReader::new(r);
        let mut line = Vec::new();
        loop {
            line.clear();
            match r.read_until(b'\n', &mut line).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    let text = String::from_utf8_lossy(&line);
                    let text = text.trim_end();
                    if !text.is_empty() {
                        tracing::info!(target: "tripline::exec", sink = %sink, pid, pipe, "{text}");
                    }
                }
            }
        }
    });
}

impl ExecSink {
    async fn start(&self, st: &mut State) -> Result<Program, SinkError> {
        tokio::time::sleep_until(st.next_start).await;
        st.next_start = Instant::now() + st.restarts.next_delay();
        let s = &self.settings;
        let mut cmd = tokio::process::Command::new(&self.program);
        cmd.args(&s.args)
            .current_dir(&self.dir)
            .envs(&s.env)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group: Ctrl-C on tripline's terminal must not
            // kill it before tripline has flushed what is queued for it.
            .process_group(0)
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(|e| {
            SinkError::Failed(format!(
                "cannot start `{}` (in {}): {e}",
                self.program.display(),
                self.dir.display()
            ))
        })?;
        let pid = child.id().unwrap_or(0);
        tracing::info!(sink = %self.sink, command = %s.command, pid, "exec program started");
        if let Some(err) = child.stderr.take() {
            forward(self.sink.clone(), pid, "stderr", err);
        }
        let out = child.stdout.take().expect("stdout is piped");
        let acks = if s.ack {
            Some(BufReader::new(out))
        } else {
            forward(self.sink.clone(), pid, "stdout", out);
            None
        };
        Ok(Program {
            stdin: child.stdin.take(),
            child: Some(child),
            acks,
            pid,
        })
    }

    async fn deliver_batch(&self, alerts: &[Alert]) -> Result<(), SinkError> {
        let mut st = self.state.lock().await;
        let mut program = match st.program.take() {
            Some(mut p) => match p.exited() {
                Some(status) => {
                    self.metrics
                        .sink_program_exited(&self.sink, p.pid, &status.to_string());
                    drop(p);
                    self.start(&mut st).await?
                }
                None => p,
            },
            None => self.start(&mut st).await?,
        };
        match program.send(alerts, &self.sink).await {
            Ok(()) => {
                st.restarts.reset();
                st.next_start = Instant::now();
                st.program = Some(program);
                Ok(())
            }
            Err(Fault::Refused(reason)) => {
                st.program = Some(program);
                Err(SinkError::Failed(format!(
                    "`{}` refused the batch: {reason}",
                    self.settings.command
                )))
            }
            Err(Fault::Broken(reason)) => {
                let status = program.exit_status(EXIT_WAIT).await;
                let status = match status {
                    Some(s) => {
                        self.metrics
                            .sink_program_exited(&self.sink, program.pid, &s.to_string());
                        format!(" ({s})")
                    }
                    None => String::new(),
                };
                Err(SinkError::Failed(format!(
                    "`{}`: {reason}{status}",
                    self.settings.command
                )))
            }
        }
    }

    async fn close_program(&self) -> Result<(), SinkError> {
        let program = self.state.lock().await.program.take();
        if let Some(mut p) = program {
            p.stop().await;
        }
        Ok(())
    }
}

impl Program {
    fn exited(&mut self) -> Option<ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    async fn exit_status(&mut self, wait: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        tokio::time::timeout(wait, child.wait()).await.ok()?.ok()
    }

    /// Writes the batch and, with acknowledgements on, reads one answer per
    /// alert. Writing and reading run together: a program answering as it
    /// goes never blocks on a full stdout pipe.
    async fn send(&mut self, alerts: &[Alert], sink: &str) -> Result<(), Fault> {
        let mut buf = Vec::with_capacity(alerts.len() * 256);
        for a in alerts {
            serde_json::to_writer(&mut buf, a).expect("alerts always serialize");
            buf.push(b'\n');
        }
        let stdin = self.stdin.as_mut().expect("open until stop");
        let write = async {
            stdin.write_all(&buf).await?;
            stdin.flush().await
        };
        let write = async {
            write
                .await
                .map_err(|e| Fault::Broken(format!("writing to its stdin failed: {e}")))
        };
        let Some(acks) = self.acks.as_mut() else {
            return write.await;
        };
        let read = read_acks(acks, alerts.len(), sink, self.pid);
        let ((), refused) = tokio::try_join!(write, read)?;
        match refused {
            Some(reason) => Err(Fault::Refused(reason)),
            None => Ok(()),
        }
    }

    /// Closes stdin (a well-behaved program finishes and exits on EOF) and
    /// reaps it.
    async fn stop(&mut self) {
        self.stdin.take();
        if let Some(child) = self.child.take() {
            reap(child).await;
        }
    }
}

/// Waits up to [`STOP_GRACE`] for the exit, then kills.
async fn reap(mut child: Child) {
    if tokio::time::timeout(STOP_GRACE, child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
}

/// Reads `n` answers; `Some(reason)` if any was `error …`. Lines that are
/// neither are logged and skipped.
async fn read_acks(
    out: &mut BufReader<ChildStdout>,
    n: usize,
    sink: &str,
    pid: u32,
) -> Result<Option<String>, Fault> {
    let mut refused = None;
    let mut answered = 0;
    let mut line = Vec::new();
    while answered < n {
        line.clear();
        let read = out
            .read_until(b'\n', &mut line)
            .await
            .map_err(|e| Fault::Broken(format!("reading its stdout failed: {e}")))?;
        if read == 0 {
            return Err(Fault::Broken(format!(
                "closed its stdout after {answered} of {n} acknowledgements"
            )));
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim();
        if text == "ok" {
            answered += 1;
        } else if let Some(reason) = text.strip_prefix("error") {
            answered += 1;
            refused.get_or_insert_with(|| reason.trim_start_matches([':', ' ']).to_string());
        } else if !text.is_empty() {
            tracing::warn!(
                target: "tripline::exec",
                sink,
                pid,
                "ignoring stdout line that is neither `ok` nor `error …` (log to stderr instead): {text}"
            );
        }
    }
    Ok(refused)
}

impl Drop for Program {
    /// A program dropped mid-batch (the delivery was cancelled) gets the
    /// same stop as a closing sink, in the background.
    fn drop(&mut self) {
        self.stdin.take();
        if let Some(child) = self.child.take()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            rt.spawn(reap(child));
        }
        // Without a runtime the child is dropped here: `kill_on_drop`.
    }
}

impl Sink for ExecSink {
    fn deliver<'a>(&'a self, alerts: &'a [Alert]) -> DeliverFuture<'a> {
        Box::pin(self.deliver_batch(alerts))
    }

    fn close(&self) -> DeliverFuture<'_> {
        Box::pin(self.close_program())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alert::{Origin, Severity, Status};

    fn alerts(n: usize) -> Vec<Alert> {
        (0..n)
            .map(|i| Alert {
                fingerprint: format!("{i:016x}"),
                rule: "r".into(),
                name: "A".into(),
                severity: Severity::Major,
                status: Status::Firing,
                labels: [("n".to_string(), i.to_string())].into(),
                annotations: Default::default(),
                starts_at: "2026-01-01T00:00:00Z".into(),
                ends_at: None,
                origin: Origin::default(),
            })
            .collect()
    }

    fn sink(script: &str, ack: bool) -> ExecSink {
        let settings = ExecSettings {
            command: "sh".into(),
            args: vec!["-c".into(), script.into()],
            env: BTreeMap::new(),
            ack,
        };
        ExecSink {
            program: "sh".into(),
            dir: std::env::temp_dir(),
            sink: "t".into(),
            metrics: Arc::new(Metrics::new(Vec::new())),
            state: Mutex::new(State {
                program: None,
                restarts: Backoff::new(Duration::from_millis(10), Duration::from_millis(50)),
                next_start: Instant::now(),
            }),
            settings,
        }
    }

    #[tokio::test]
    async fn acknowledged_batch_is_delivered_and_program_kept() {
        let s = sink("while read l; do echo ok; done", true);
        s.deliver(&alerts(300)).await.unwrap();
        let pid = s.state.lock().await.program.as_ref().unwrap().pid;
        s.deliver(&alerts(2)).await.unwrap();
        assert_eq!(s.state.lock().await.program.as_ref().unwrap().pid, pid);
        s.close().await.unwrap();
    }

    #[tokio::test]
    async fn error_answer_fails_the_batch_but_keeps_the_program() {
        let s = sink(
            "while read l; do echo 'error: mail server down'; done",
            true,
        );
        let e = s.deliver(&alerts(3)).await.unwrap_err();
        assert!(e.to_string().contains("mail server down"), "{e}");
        assert!(s.state.lock().await.program.is_some());
        s.close().await.unwrap();
    }

    #[tokio::test]
    async fn a_dying_program_fails_the_batch_and_is_restarted() {
        // Answers one alert, then exits: the batch of two must fail.
        let s = sink("read l; echo ok; exit 3", true);
        let e = s.deliver(&alerts(2)).await.unwrap_err();
        assert!(e.to_string().contains("exit status: 3"), "{e}");
        assert!(s.state.lock().await.program.is_none());
        // The next attempt starts a fresh program, which takes one alert.
        s.deliver(&alerts(1)).await.unwrap();
    }
}
