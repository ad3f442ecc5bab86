use clap::Parser;

fn main() {
    let cli = tripline::cli::Cli::parse();
    if let Err(e) = tripline::cli::execute(cli) {
        eprintln!("error: {}", tripline::cli::error_chain(&e));
        std::process::exit(1);
    }
}
