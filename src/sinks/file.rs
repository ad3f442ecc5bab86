//! `file`: appends each alert as one JSON line. The file is opened in append
//! mode per batch, so log rotation (move + recreate) just works.
//!
//! The write runs on tokio's blocking pool: a stuck filesystem (a dead NFS
//! mount, a FIFO nobody reads) then costs one blocked thread, and the
//! dispatcher's timeout still ends the attempt.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use serde::Deserialize;

use super::{BuildContext, DeliverFuture, Sink, SinkError, SinkSettings};
use crate::alert::Alert;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSettings {
    /// File to append to (relative to the manifest's directory); parent
    /// directories are created.
    pub path: PathBuf,
    /// fsync after each batch: slower, but a delivered alert survives a
    /// power cut.
    #[serde(default)]
    pub fsync: bool,
}

impl SinkSettings for FileSettings {
    fn validate(&self) -> Result<(), String> {
        if self.path.as_os_str().is_empty() {
            return Err("`path` must not be empty".into());
        }
        Ok(())
    }

    fn build(self, cx: &BuildContext) -> Result<Box<dyn Sink>, String> {
        Ok(Box::new(FileSink {
            settings: Arc::new(FileSettings {
                path: cx.base_dir.join(&self.path),
                ..self
            }),
        }))
    }
}

pub struct FileSink {
    /// Shared with the blocking task doing the write.
    settings: Arc<FileSettings>,
}

fn write(settings: &FileSettings, buf: &[u8]) -> Result<(), SinkError> {
    if let Some(parent) = settings.path.parent()
        && !parent.as_os_str().is_empty()
    {
        std::fs::create_dir_all(parent)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&settings.path)?;
    f.write_all(buf)?;
    if settings.fsync {
        f.sync_data()?;
    }
    Ok(())
}

impl Sink for FileSink {
    fn deliver<'a>(&'a self, alerts: &'a [Alert]) -> DeliverFuture<'a> {
        Box::pin(async move {
            let mut buf = Vec::with_capacity(alerts.len() * 256);
            for a in alerts {
                serde_json::to_writer(&mut buf, a).expect("alerts always serialize");
                buf.push(b'\n');
            }
            let settings = self.settings.clone();
            tokio::task::spawn_blocking(move || write(&settings, &buf))
                .await
                .map_err(|e| SinkError::Failed(format!("file writer task failed: {e}")))?
        })
    }
}
