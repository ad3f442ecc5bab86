use clap::Parser;

/// Rhai allocates for nearly every value a rule touches, from several
/// judging threads at once; jemalloc's per-thread caches keep that off
/// glibc malloc's arena locks and consolidation passes.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() {
    let cli = tripline::cli::Cli::parse();
    if let Err(e) = tripline::cli::execute(cli) {
        eprintln!("error: {}", tripline::cli::error_chain(&e));
        std::process::exit(1);
    }
}
