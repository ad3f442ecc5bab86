//! `file`: appends each alert as one JSON line. The file is opened in append
//! mode per batch, so log rotation (move + recreate) just works.

use std::io::Write;
use std::path::PathBuf;

use serde::Deserialize;

use super::{DeliverFuture, Sink, SinkError};
use crate::alert::Alert;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSettings {
    /// File to append to; parent directories are created.
    pub path: PathBuf,
    /// fsync after each batch: slower, but a delivered alert survives a
    /// power cut.
    #[serde(default)]
    pub fsync: bool,
}

pub struct FileSink {
    settings: FileSettings,
}

pub fn build(v: &serde_yaml::Value) -> Result<Box<dyn Sink>, String> {
    let settings: FileSettings = super::settings(v)?;
    if settings.path.as_os_str().is_empty() {
        return Err("`path` must not be empty".into());
    }
    Ok(Box::new(FileSink { settings }))
}

impl FileSink {
    fn write(&self, alerts: &[Alert]) -> Result<(), SinkError> {
        if let Some(parent) = self.settings.path.parent()
            && !parent.as_os_str().is_empty()
        {
            std::fs::create_dir_all(parent)?;
        }
        let mut buf = Vec::with_capacity(alerts.len() * 256);
        for a in alerts {
            serde_json::to_writer(&mut buf, a).expect("alerts always serialize");
            buf.push(b'\n');
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.settings.path)?;
        f.write_all(&buf)?;
        if self.settings.fsync {
            f.sync_data()?;
        }
        Ok(())
    }
}

impl Sink for FileSink {
    fn deliver<'a>(&'a self, alerts: &'a [Alert]) -> DeliverFuture<'a> {
        Box::pin(async move { self.write(alerts) })
    }
}
