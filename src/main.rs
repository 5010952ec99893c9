//! The `nixery-local` command: parses the command line, sets up logging, and
//! hands over to [`cli`], one file per command. The binary is the only
//! place `anyhow` is used.

mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = match cli::Cli::parse_or_exit() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    init_logging();
    cli.run()
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("NIXERY_LOCAL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for people, not for journald or log files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
