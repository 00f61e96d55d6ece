//! The clock: [`Millis`] since the Unix epoch, the unit of every stored time (receipt, due,
//! lease, ttl). A leaf: callers read the time once and pass it down, so the code below them
//! (scheduling, the store) stays testable with fixed times.

use std::time::Duration;

/// Milliseconds since the Unix epoch, the store's unit of time.
pub type Millis = i64;

/// The current time in store units.
pub fn now_ms() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Converts a duration to store units, saturating.
pub fn millis(duration: Duration) -> Millis {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}
