//! What the two binaries share: one-line clap errors and exit codes.

use std::process::ExitCode;

/// Exit code for bad usage or configuration (as clap uses).
pub const EXIT_USAGE: u8 = 2;
/// Exit code for a failure at run time.
pub const EXIT_FAILURE: u8 = 1;

/// Parses the command line; on a usage error prints one line and exits with code 2,
/// on `--help`/`--version` prints them and exits 0.
pub fn parse_or_exit<P: clap::Parser>() -> Result<P, ExitCode> {
    P::try_parse().map_err(|e| {
        if !e.use_stderr() {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        let text = e.to_string();
        let line = text.lines().next().unwrap_or("error: invalid arguments");
        eprintln!("{line}");
        ExitCode::from(EXIT_USAGE)
    })
}
