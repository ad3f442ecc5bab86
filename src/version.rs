//! What this binary was built from, for `--version` and
//! `tripline_build_info`: the crate version alone cannot tell two builds
//! between releases apart.

/// Short hash of the commit built, "-dirty" when tracked files had
/// changes; "unknown" outside a git checkout (see `build.rs`).
pub const COMMIT: &str = env!("TRIPLINE_GIT_COMMIT");

/// The crate version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// `--version`'s text after the program name: "0.1.0 (commit 1a2b3c4)".
pub const LONG: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("TRIPLINE_GIT_COMMIT"),
    ")"
);
