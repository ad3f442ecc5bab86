//! The file watcher: turns saves under `rules_dir` and `plugins_dir` into
//! reloads.
//!
//! Editors save in many ways: write a temp file and rename it over the old
//! one, delete and recreate, truncate and write, write in several chunks.
//! Each step is an event, and reloading on the first one would compile a
//! half-written file or see a rule vanish for a moment. So events only say
//! "something changed", and a reload starts once the directories have been
//! quiet for [`QUIET`]. It then rescans both directories whole (the paths
//! in events are never trusted: renames and editors make them unreliable)
//! and, like every reload, applies all or nothing. A save thus ends in one
//! reload with the final content.
//!
//! Ignored: reads (each reload opens every file, which must not trigger the
//! next one), metadata-only changes (`touch`), and editor lock, swap, backup
//! and probe files ([`is_editor_file`]). Whatever slips through costs one
//! rescan that finds nothing new, which [`Reloader::reload_if_changed`]
//! neither counts nor logs.
//!
//! The watch is recursive on the directories, not on files: a file replaced
//! by a rename is a new inode, and a watch on the old one would go quiet.
//! A watched directory that disappears (or is renamed away) is logged and
//! looked for again every second; a watcher error is logged and
//! followed by a rescan. SIGHUP and `POST /-/reload` work throughout.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify_debouncer_full::notify::event::{AccessKind, AccessMode, ModifyKind};
use notify_debouncer_full::notify::{Event, EventKind, RecursiveMode};
use notify_debouncer_full::{DebounceEventResult, new_debouncer};
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::Reloader;

/// How long the debouncer holds a raw event to merge it with duplicates and
/// pair the two halves of a rename.
const DEBOUNCE: Duration = Duration::from_millis(20);
/// How often the debouncer hands over the events that are due.
const TICK: Duration = Duration::from_millis(5);
/// A reload starts once no relevant event has arrived for this long. Long
/// enough to cover the steps of one save (editors do them back to back),
/// short enough that a saved rule is in effect well within 250 ms.
pub const QUIET: Duration = Duration::from_millis(80);
/// How often a watched directory that is missing is looked for again.
const RETRY_WATCH: Duration = Duration::from_secs(1);

/// What the debouncer thread tells the watch task.
enum Signal {
    /// Something that may be a rule or a plugin changed. `gone` lists the
    /// watched directories that were themselves removed or renamed, whose
    /// watch must be set up again.
    Changed { gone: Vec<PathBuf> },
    /// The watcher failed; events may have been lost.
    Failed(Vec<String>),
}

/// Watches the rules and plugins directories until `stop`, reloading after
/// each burst of changes.
pub async fn watch(reloader: Arc<Reloader>, stop: CancellationToken) {
    // Absolute, as in the events notify reports, so a root can be recognised.
    let mut roots: Vec<PathBuf> = [&reloader.rules_dir, &reloader.plugins_dir]
        .into_iter()
        .map(|dir| std::path::absolute(dir).unwrap_or_else(|_| dir.clone()))
        .collect();
    roots.dedup();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let handler = {
        let roots = roots.clone();
        move |result: DebounceEventResult| {
            if let Some(signal) = classify(result, &roots) {
                // The receiver is gone only while the task stops.
                let _ = tx.send(signal);
            }
        }
    };
    let mut debouncer = match new_debouncer(DEBOUNCE, Some(TICK), handler) {
        Ok(d) => d,
        Err(e) => {
            tracing::error!(
                "cannot start the file watcher; reload with SIGHUP or POST /-/reload: {e}"
            );
            return;
        }
    };
    let mut missing = Vec::new();
    for root in &roots {
        if let Err(e) = debouncer.watch(root, RecursiveMode::Recursive) {
            if root.exists() {
                tracing::warn!(
                    dir = %root.display(),
                    "cannot watch the directory, trying again every {RETRY_WATCH:?}: {e}"
                );
            } else {
                tracing::info!(
                    dir = %root.display(),
                    "directory does not exist; looking for it every {RETRY_WATCH:?}"
                );
            }
            missing.push(root.clone());
        }
    }
    tracing::info!(
        dirs = ?roots.iter().map(|r| r.display().to_string()).collect::<Vec<_>>(),
        "watching rules and plugins for changes"
    );
    let mut due: Option<Instant> = None;
    let mut retry = tokio::time::interval(RETRY_WATCH);
    retry.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            signal = rx.recv() => {
                match signal {
                    Some(Signal::Changed { gone }) => {
                        for root in gone {
                            let _ = debouncer.unwatch(&root);
                            if !missing.contains(&root) {
                                tracing::warn!(
                                    dir = %root.display(),
                                    "watched directory removed or renamed; the running set stays, and the directory is looked for again every {RETRY_WATCH:?}"
                                );
                                missing.push(root);
                            }
                        }
                    }
                    Some(Signal::Failed(errors)) => {
                        for e in errors {
                            tracing::warn!("file watcher error, rescanning: {e}");
                        }
                    }
                    None => break,
                }
                due = Some(Instant::now() + QUIET);
            }
            _ = tokio::time::sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => {
                due = None;
                reloader.reload_if_changed("file watcher").await;
            }
            _ = retry.tick(), if !missing.is_empty() => {
                let before = missing.len();
                missing.retain(|root| {
                    let back = root.is_dir() && debouncer.watch(root, RecursiveMode::Recursive).is_ok();
                    if back {
                        tracing::info!(dir = %root.display(), "watching the directory again");
                    }
                    !back
                });
                if missing.len() < before {
                    due = Some(Instant::now() + QUIET);
                }
            }
        }
    }
    debouncer.stop();
}

/// Turns one delivery of the debouncer into a signal, or `None` when none
/// of its events can change what a reload loads.
fn classify(result: DebounceEventResult, roots: &[PathBuf]) -> Option<Signal> {
    let events = match result {
        Ok(events) => events,
        Err(errors) => {
            return Some(Signal::Failed(
                errors.iter().map(ToString::to_string).collect(),
            ));
        }
    };
    let gone: Vec<PathBuf> = roots
        .iter()
        .filter(|root| events.iter().any(|e| moves_or_removes(e, root)))
        .cloned()
        .collect();
    (!gone.is_empty() || events.iter().any(|e| is_relevant(e))).then_some(Signal::Changed { gone })
}

/// Whether `e` removes or renames the directory `root` itself.
fn moves_or_removes(e: &Event, root: &Path) -> bool {
    matches!(
        e.kind,
        EventKind::Remove(_) | EventKind::Modify(ModifyKind::Name(_))
    ) && e.paths.iter().any(|p| p == root)
}

/// Whether `e` may change what a reload would load.
fn is_relevant(e: &Event) -> bool {
    if e.need_rescan() {
        return true;
    }
    let kind_matters = match e.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) | EventKind::Modify(ModifyKind::Metadata(_)) => false,
        _ => true,
    };
    kind_matters && e.paths.iter().any(|p| !is_editor_file(p))
}

/// Files editors keep beside the one being edited: Emacs locks (`.#x`) and
/// auto-saves (`#x#`), backups (`x~`), Vim swap files (`.x.swp`, `.x.swo`,
/// …) and its write probe (`4913`, any all-digit name), Kate swap files,
/// JetBrains safe-write copies and GNOME's output streams.
pub fn is_editor_file(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    let vim_swap = name.starts_with('.')
        && (name.ends_with(".swpx")
            || name
                .rsplit_once('.')
                .is_some_and(|(_, ext)| ext.len() == 3 && ext.starts_with("sw")));
    name.starts_with(".#")
        || (name.len() > 1 && name.starts_with('#') && name.ends_with('#'))
        || name.ends_with('~')
        || vim_swap
        || name.ends_with(".kate-swp")
        || name.bytes().all(|b| b.is_ascii_digit())
        || name.contains("___jb_tmp___")
        || name.contains("___jb_old___")
        || name.starts_with(".goutputstream-")
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify_debouncer_full::notify::event::{CreateKind, DataChange, MetadataKind};

    fn event(kind: EventKind, path: &str) -> Event {
        Event::new(kind).add_path(PathBuf::from(path))
    }

    #[test]
    fn editor_files_are_recognised() {
        for name in [
            ".#a.rhai",
            "#a.rhai#",
            "a.rhai~",
            ".a.rhai.swp",
            ".a.rhai.swo",
            ".a.rhai.swpx",
            "a.rhai.kate-swp",
            "4913",
            "a.rhai___jb_tmp___",
            "a.rhai___jb_old___",
            ".goutputstream-XYZ123",
        ] {
            assert!(is_editor_file(&Path::new("rules").join(name)), "{name}");
        }
        for name in [
            "a.rhai",
            "console.yaml",
            "..data",
            "sub",
            "v2.rhai",
            ".tmp123",
        ] {
            assert!(!is_editor_file(&Path::new("rules").join(name)), "{name}");
        }
    }

    #[test]
    fn reads_metadata_and_editor_files_do_not_count() {
        let modify = EventKind::Modify(ModifyKind::Data(DataChange::Any));
        assert!(is_relevant(&event(modify, "rules/a.rhai")));
        assert!(is_relevant(&event(
            EventKind::Access(AccessKind::Close(AccessMode::Write)),
            "rules/a.rhai"
        )));
        assert!(!is_relevant(&event(
            EventKind::Access(AccessKind::Open(AccessMode::Any)),
            "rules/a.rhai"
        )));
        assert!(!is_relevant(&event(
            EventKind::Modify(ModifyKind::Metadata(MetadataKind::Any)),
            "rules/a.rhai"
        )));
        assert!(!is_relevant(&event(
            EventKind::Create(CreateKind::File),
            "rules/.a.rhai.swp"
        )));
        assert!(!is_relevant(&event(modify, "rules/4913")));
        // A rename from a temp file onto the rule: the target counts.
        let rename = Event::new(EventKind::Modify(ModifyKind::Name(
            notify_debouncer_full::notify::event::RenameMode::Both,
        )))
        .add_path(PathBuf::from("rules/a.rhai~"))
        .add_path(PathBuf::from("rules/a.rhai"));
        assert!(is_relevant(&rename));
    }

    #[test]
    fn a_removed_root_is_reported_gone() {
        let roots = vec![PathBuf::from("rules"), PathBuf::from("plugins")];
        let removed = notify_debouncer_full::DebouncedEvent::new(
            event(
                EventKind::Remove(notify_debouncer_full::notify::event::RemoveKind::Folder),
                "rules",
            ),
            std::time::Instant::now(),
        );
        let Some(Signal::Changed { gone }) = classify(Ok(vec![removed]), &roots) else {
            panic!("a removed root is a change");
        };
        assert_eq!(gone, [PathBuf::from("rules")]);
        let read = notify_debouncer_full::DebouncedEvent::new(
            event(
                EventKind::Access(AccessKind::Open(AccessMode::Any)),
                "rules/a.rhai",
            ),
            std::time::Instant::now(),
        );
        assert!(classify(Ok(vec![read]), &roots).is_none());
    }
}
