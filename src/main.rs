//! `blkdelta`: the command line. Parsing, then one function per subcommand; everything a
//! library user could want lives in the `blkdelta-common`, `-send` and `-receive` crates.

#![forbid(unsafe_code)]

mod cli;
mod commands;
mod progress;
mod sync;

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;

/// An error that is the caller's mistake rather than a failure: exit status 2.
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

fn main() -> ExitCode {
    let cli = match cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage(&e),
    };
    match commands::run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => report(&err),
    }
}

/// Prints help or version (exit 0), or a clap error as one `blkdelta:` line (exit 2).
fn usage(e: &clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = e.print();
            return ExitCode::from(2);
        }
        _ => {}
    }
    let text = e.render().to_string();
    let words: Vec<&str> = text
        .lines()
        .take_while(|l| !l.starts_with("Usage:"))
        .map(|l| l.trim().trim_start_matches("error: "))
        .filter(|l| !l.is_empty() && !l.starts_with("For more information"))
        .collect();
    let _ = writeln!(
        std::io::stderr(),
        "blkdelta: {} (see blkdelta --help)",
        words.join(" ")
    );
    ExitCode::from(2)
}

/// Prints one `blkdelta:` line for `err` and picks the exit status.
fn report(err: &anyhow::Error) -> ExitCode {
    if is_stdout_broken_pipe(err) {
        // The reader of our output went away: that is its choice, not our failure.
        return ExitCode::SUCCESS;
    }
    if err.downcast_ref::<commands::ReceiverGone>().is_some() {
        // The receiver stopped reading (it refused the stream, or failed): it said why.
        return ExitCode::from(1);
    }
    let line = format!("{err:#}").replace('\n', " ");
    let _ = writeln!(std::io::stderr(), "blkdelta: {line}");
    if err.downcast_ref::<UsageError>().is_some() {
        ExitCode::from(2)
    } else {
        ExitCode::from(1)
    }
}

fn is_stdout_broken_pipe(err: &anyhow::Error) -> bool {
    err.downcast_ref::<commands::StdoutClosed>().is_some()
}
