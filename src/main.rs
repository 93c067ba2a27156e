//! The `reset-worker` binary: parse the command line, run the command.
//! Everything else lives in the library; see its crate docs for the layout.

use std::process::ExitCode;

use clap::Parser;
use reset_worker::cli::Cli;

fn main() -> ExitCode {
    Cli::parse().run()
}
