//! The admin API's wire types, shared by the server (`admin/mod.rs`) and the CLI's client
//! (`admin/client.rs`): dead letters, replay requests and answers, pause state, sink status and
//! history, the error body, and time as the API writes (`rfc3339`) and reads it (`parse_since`).

use crate::clock::{Millis, millis};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The most dead letters one listing returns, and the most ids one replay takes.
pub const MAX_LIMIT: u32 = 10_000;
/// Dead letters a listing returns when `limit` is not given.
pub const DEFAULT_LIMIT: u32 = 100;

/// The body of every admin error: `{"error": "..."}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

// ---------------------------------------------------------------------------------------------
// The JSON of the admin API (the CLI deserializes the same types).

/// One dead letter. Times are RFC 3339 in UTC with milliseconds (`2025-01-31T12:00:00.123Z`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetterView {
    /// The delivery id: what `ids` in a replay refers to.
    pub id: i64,
    pub event_id: String,
    pub sink: String,
    pub kind: String,
    /// The PSID (or `user_ref`); absent for page-level events.
    pub user: Option<String>,
    pub attempts: u32,
    /// The HTTP status of the last attempt; absent when no answer came (timeout, refused).
    pub last_status: Option<u16>,
    /// The last error, with a redacted excerpt of the response.
    pub last_error: Option<String>,
    pub first_attempt_at: Option<String>,
    pub last_attempt_at: Option<String>,
}

/// `POST /admin/dead-letters/replay`: every field narrows the selection; `{}` replays every
/// dead letter.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplayRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sink: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Dead since: milliseconds since the epoch, an RFC 3339 time, or a duration ago (`"1h"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<Since>,
    /// Delivery ids (at most [`MAX_LIMIT`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ids: Option<Vec<i64>>,
}

/// A point in time as a client may give it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Since {
    Millis(Millis),
    Text(String),
}

/// The answer to a replay.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replayed {
    pub replayed: usize,
    /// Matching dead letters left dead because their sink is not enabled now, by sink (absent
    /// when there are none). Requeued, they would only wait for a dispatcher that is not running.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub left_dead: BTreeMap<String, usize>,
}

/// The answer to a pause or an unpause.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PauseState {
    pub user: String,
    pub paused: bool,
}

/// One paused user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PausedUser {
    pub user: String,
    pub paused_at: String,
}

/// One sink in `GET /admin/sinks` (SPEC §5).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SinkView {
    pub sink: String,
    pub enabled: bool,
    /// `ok`, or `outage` while the sink fails as a whole.
    pub state: String,
    /// When the current outage began (RFC 3339); null while `ok`.
    pub outage_since: Option<String>,
    /// Deliveries not yet delivered: waiting for their turn, due, or scheduled for a retry.
    pub queue_depth: u64,
    pub in_flight: u64,
    pub dead: u64,
    /// Since this process started.
    pub last_success_at: Option<String>,
    pub last_error: Option<LastErrorView>,
    /// What an operator should know: why a sink is not enabled (first, when it is not), a
    /// retired API, the vendor's deprecation notices.
    pub warnings: Vec<String>,
}

/// The last failure of a sink.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastErrorView {
    pub at: String,
    pub status: Option<u16>,
    /// Redacted.
    pub message: String,
    /// True when the attempt ended in a dead letter, false when it is retried.
    pub dead: bool,
    /// `"live"`: seen by the dispatcher since this process started; `"dead_letters"`: the
    /// newest dead letter in the store (nothing failed since the start).
    pub source: String,
}

/// `GET /admin/sinks/history`: each active sink's last hour in this relay process, a minute
/// per entry, oldest first (on PostgreSQL each relay answers with its own deliveries).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryView {
    /// When the answer was made (RFC 3339).
    pub now: String,
    /// The start of the first minute of every list (RFC 3339).
    pub start: String,
    /// The length of one entry: 60.
    pub step_seconds: u32,
    pub sinks: Vec<SinkHistoryView>,
}

/// One sink's last hour: attempts by outcome, and the median and 99th percentile delivery
/// time (milliseconds, null in a minute without attempts), one entry per minute.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SinkHistoryView {
    pub sink: String,
    pub delivered: Vec<u32>,
    pub retried: Vec<u32>,
    pub dead: Vec<u32>,
    pub skipped: Vec<u32>,
    pub p50_ms: Vec<Option<f64>>,
    pub p99_ms: Vec<Option<f64>>,
}

// ---------------------------------------------------------------------------------------------
// Time, as the admin API writes and reads it.

/// A `since` that is not a time [`parse_since`] reads; it says why (the server answers it as a
/// 400, the CLI as a usage error).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadSince(String);

/// Milliseconds since the epoch as RFC 3339 in UTC with milliseconds.
pub fn rfc3339(at: Millis) -> String {
    let at = UNIX_EPOCH + Duration::from_millis(u64::try_from(at).unwrap_or(0));
    humantime::format_rfc3339_millis(at).to_string()
}

/// A point in time as an operator writes it: milliseconds since the epoch (`1717171717000`), a
/// duration ago (`90s`, `1h`, `3d`), or an RFC 3339 time (`2025-01-31T12:00:00Z`, an offset
/// such as `+02:00` allowed).
pub fn parse_since(text: &str, now: Millis) -> Result<Millis, BadSince> {
    let text = text.trim();
    if !text.is_empty() && text.bytes().all(|byte| byte.is_ascii_digit()) {
        return text
            .parse::<Millis>()
            .map_err(|_| BadSince(format!("since: `{text}` is too large")));
    }
    if let Ok(ago) = humantime::parse_duration(text) {
        return Ok(now.saturating_sub(millis(ago)));
    }
    parse_rfc3339(text).ok_or_else(|| {
        BadSince(format!(
            "since: `{text}` is not a duration (\"1h\"), an RFC 3339 time (\"2025-01-31T12:00:00Z\") or milliseconds"
        ))
    })
}

/// RFC 3339 with `Z` or a numeric offset (`T` and `Z` in either case, as RFC 3339 allows).
fn parse_rfc3339(text: &str) -> Option<Millis> {
    let text = &text.to_ascii_uppercase();
    let to_millis = |time: SystemTime| {
        time.duration_since(UNIX_EPOCH)
            .ok()
            .and_then(|elapsed| Millis::try_from(elapsed.as_millis()).ok())
    };
    if let Ok(time) = humantime::parse_rfc3339(text) {
        return to_millis(time);
    }
    // `…+02:00` / `…-05:30`: parse the local time as UTC, then remove the offset.
    let split = text
        .len()
        .checked_sub(6)
        .filter(|split| text.is_char_boundary(*split))?;
    let (local, offset) = text.split_at(split);
    let sign = match offset.as_bytes().first() {
        Some(b'+') => 1,
        Some(b'-') => -1,
        _ => return None,
    };
    let (hours, minutes) = offset.get(1..)?.split_once(':')?;
    let two_digits = |part: &str| part.len() == 2 && part.bytes().all(|byte| byte.is_ascii_digit());
    if !two_digits(hours) || !two_digits(minutes) {
        return None;
    }
    let (hours, minutes): (i64, i64) = (hours.parse().ok()?, minutes.parse().ok()?);
    if hours > 23 || minutes > 59 {
        return None;
    }
    let local = to_millis(humantime::parse_rfc3339(&format!("{local}Z")).ok()?)?;
    Some(local - sign * (hours * 3600 + minutes * 60) * 1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_rfc3339_in_either_case_and_refuses_signed_offset_hours() {
        let now = 1_700_000_000_000;
        assert_eq!(
            parse_since("2024-01-01t00:00:00z", now).ok(),
            Some(1_704_067_200_000)
        );
        assert_eq!(
            parse_since("2024-01-01T02:00:00+02:00", now).ok(),
            Some(1_704_067_200_000)
        );
        for bad in [
            "2024-01-01T00:00:00+-1:00",
            "2024-01-01T00:00:00++1:00",
            "2024-01-01T00:00:00+1:000",
        ] {
            assert!(parse_since(bad, now).is_err(), "{bad}");
        }
    }

    #[test]
    fn since_takes_durations_rfc3339_and_millis() -> Result<(), BadSince> {
        let now = 1_700_000_000_000;
        assert_eq!(parse_since("1h", now)?, now - 3_600_000);
        assert_eq!(parse_since("90s", now)?, now - 90_000);
        assert_eq!(parse_since("1717171717000", now)?, 1_717_171_717_000);
        assert_eq!(parse_since("2024-01-01T00:00:00Z", now)?, 1_704_067_200_000);
        assert_eq!(
            parse_since("2024-01-01T00:00:00.250Z", now)?,
            1_704_067_200_250
        );
        assert_eq!(
            parse_since("2024-01-01T02:00:00+02:00", now)?,
            1_704_067_200_000
        );
        assert_eq!(
            parse_since("2023-12-31T19:00:00-05:00", now)?,
            1_704_067_200_000
        );
        for bad in [
            "",
            "yesterday",
            "2024-01-01",
            "2024-01-01T00:00:00+25:00",
            "1h ago",
        ] {
            assert!(parse_since(bad, now).is_err(), "{bad}");
        }
        Ok(())
    }

    #[test]
    fn times_are_written_as_rfc3339_utc_with_millis() {
        assert_eq!(rfc3339(1_704_067_200_250), "2024-01-01T00:00:00.250Z");
        assert_eq!(rfc3339(-5), "1970-01-01T00:00:00.000Z");
    }

    #[test]
    fn replay_requests_refuse_unknown_fields() {
        let parsed: Result<ReplayRequest, _> = serde_json::from_str(r#"{"user_id": "1"}"#);
        assert!(
            parsed.is_err(),
            "a typo must not widen the replay to every dead letter"
        );
        let parsed: Result<ReplayRequest, _> =
            serde_json::from_str(r#"{"since": 5, "ids": [1, 2]}"#);
        assert_eq!(
            parsed.ok(),
            Some(ReplayRequest {
                since: Some(Since::Millis(5)),
                ids: Some(vec![1, 2]),
                ..ReplayRequest::default()
            })
        );
    }
}
