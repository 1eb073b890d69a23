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
        eprintln!("{}", one_line(&e.to_string()));
        ExitCode::from(EXIT_USAGE)
    })
}

/// The first line of a clap error, with the line after it when the first only
/// introduces it ("the following required arguments were not provided:").
fn one_line(text: &str) -> String {
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let first = lines.next().unwrap_or("error: invalid arguments");
    match (first.ends_with(':'), lines.next()) {
        (true, Some(next)) => format!("{first} {next}"),
        _ => first.to_string(),
    }
}

/// Parses a duration such as `500ms`, `30s`, `10m`, `2h` or `7d` (one number, one unit).
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{text:?} has no unit (use ms, s, m, h or d)"))?;
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} does not start with a whole number"))?;
    let ms_per_unit: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {text:?} (use ms, s, m, h or d)"
            ));
        }
    };
    number
        .checked_mul(ms_per_unit)
        .filter(|ms| *ms > 0)
        .map(std::time::Duration::from_millis)
        .ok_or_else(|| format!("{text:?} is out of range (above 0, below centuries)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clap_errors_fit_one_line() {
        assert_eq!(
            one_line(
                "error: the following required arguments were not provided:\n  --x <X>\n\nUsage: y\n"
            ),
            "error: the following required arguments were not provided: --x <X>"
        );
        assert_eq!(
            one_line("error: unexpected argument 'z'\n\nUsage"),
            "error: unexpected argument 'z'"
        );
    }

    #[test]
    fn durations() {
        for (text, ms) in [
            ("500ms", 500),
            ("30s", 30_000),
            ("10m", 600_000),
            ("2h", 7_200_000),
            ("1d", 86_400_000),
        ] {
            assert_eq!(
                parse_duration(text),
                Ok(std::time::Duration::from_millis(ms)),
                "{text}"
            );
        }
        for (text, want) in [
            ("10", "no unit"),
            ("m", "whole number"),
            ("5y", "unknown unit"),
            ("0s", "out of range"),
            ("", "no unit"),
        ] {
            let err = parse_duration(text).unwrap_err();
            assert!(err.contains(want), "{text}: {err}");
        }
    }
}
