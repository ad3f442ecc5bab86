//! `tripline completions <shell>` and `tripline man`: generated from the
//! same clap definitions that parse the arguments, so they cannot drift
//! from the real options.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;

use clap::CommandFactory;
use clap_complete::Shell;

use super::Cli;

/// Writes the completion script for `shell` to standard output.
pub fn completions(shell: Shell) -> anyhow::Result<()> {
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "tripline", &mut out);
    write_stdout(&out)
}

#[derive(Debug, clap::Args)]
pub struct ManArgs {
    /// Write tripline.1 and a page per subcommand (tripline-run.1, …) here,
    /// since tripline(1) refers to them, instead of printing tripline.1.
    #[arg(long, value_name = "DIR")]
    pub out_dir: Option<PathBuf>,
}

/// Prints the tripline(1) man page (roff), or writes every page to a
/// directory.
pub fn man(args: ManArgs) -> anyhow::Result<()> {
    match args.out_dir {
        Some(dir) => clap_mangen::generate_to(Cli::command(), &dir)
            .with_context(|| format!("cannot write the man pages to {}", dir.display())),
        None => {
            let mut out = Vec::new();
            clap_mangen::Man::new(Cli::command()).render(&mut out)?;
            write_stdout(&out)
        }
    }
}

fn write_stdout(bytes: &[u8]) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(bytes)?;
    stdout.flush()?;
    Ok(())
}
