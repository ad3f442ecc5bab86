use clap::Parser;

fn main() {
    let cli = tripline::cli::Cli::parse();
    if let Err(e) = tripline::cli::execute(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
