//! `xenft`: the xe-style command line. Parses arguments and runs [`xenft_xapi::cli::run`];
//! the exit codes are listed in [`xenft_xapi::cli::exit`].

use clap::Parser;
use xenft_xapi::cli::{self, exit, Args};

fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("XENFT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("xenft: cannot start: {e}");
            std::process::exit(exit::FAILURE);
        }
    };
    let mut out = std::io::stdout().lock();
    let code = match rt.block_on(cli::run(&args, &mut out)) {
        Ok(()) => exit::OK,
        Err(e) => {
            eprintln!("xenft: {}", e.message);
            e.code
        }
    };
    std::process::exit(code);
}
