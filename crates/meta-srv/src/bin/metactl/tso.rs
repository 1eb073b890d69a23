//! `metactl tso`: timestamps from the leader's oracle, with their physical time.

use meta_client::tso::LOGICAL_BITS;
use meta_client::{MetaClient, TsoClient};
use serde_json::json;

use super::{Failure, Output, print};

/// Prints `count` consecutive timestamps, one per line: the timestamp, its physical
/// time (UTC) and its logical part.
pub async fn tso(client: &MetaClient, count: u32, output: Output) -> Result<(), Failure> {
    let highest = TsoClient::new(client).timestamps(count).await?;
    let first = highest - u64::from(count) + 1;
    let all: Vec<u64> = (first..=highest).collect();
    let lines: Vec<String> = all
        .iter()
        .map(|ts| {
            let (physical, logical) = parts(*ts);
            format!("{ts} {} {logical}", utc(physical))
        })
        .collect();
    let json: Vec<serde_json::Value> = all
        .iter()
        .map(|ts| {
            let (physical, logical) = parts(*ts);
            json!({ "timestamp": ts, "physical_ms": physical, "time": utc(physical), "logical": logical })
        })
        .collect();
    print(output, lines.join("\n"), json!(json));
    Ok(())
}

fn parts(ts: u64) -> (u64, u64) {
    (ts >> LOGICAL_BITS, ts & ((1 << LOGICAL_BITS) - 1))
}

/// Unix milliseconds as `YYYY-MM-DDTHH:MM:SS.mmmZ` (the civil calendar from a day
/// count, as in Howard Hinnant's `civil_from_days`).
fn utc(ms: u64) -> String {
    let (days, rest) = ((ms / 86_400_000) as i64, ms % 86_400_000);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rest / 3_600_000,
        rest / 60_000 % 60,
        rest / 1_000 % 60,
        rest % 1_000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn physical_times_print_as_utc() {
        assert_eq!(utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(utc(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(utc(1_796_139_300_123), "2026-12-01T15:35:00.123Z");
    }
}
