//! The closed set of sink names: what the store, the metrics, the admin API and the config call
//! each delivery target. A leaf: it knows names and tables only, nothing of what a sink does.

use std::fmt;

/// The closed set of sinks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SinkName {
    Bot,
    Kochava,
    /// Kochava SmartLink impression and click pings: configured in `[sinks.kochava]`, queued
    /// on their own so that a ping and the `track/json` event are retried independently.
    KochavaSmartlink,
    Dashbot,
    PageActivities,
    Conversions,
}

impl SinkName {
    pub const ALL: [SinkName; 6] = [
        SinkName::Bot,
        SinkName::Kochava,
        SinkName::KochavaSmartlink,
        SinkName::Dashbot,
        SinkName::PageActivities,
        SinkName::Conversions,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SinkName::Bot => "bot",
            SinkName::Kochava => "kochava",
            SinkName::KochavaSmartlink => "kochava_smartlink",
            SinkName::Dashbot => "dashbot",
            SinkName::PageActivities => "page_activities",
            SinkName::Conversions => "conversions",
        }
    }

    pub fn parse(name: &str) -> Option<SinkName> {
        SinkName::ALL.into_iter().find(|sink| sink.as_str() == name)
    }

    /// Where the sink's table lives in the config file.
    pub fn table(self) -> &'static str {
        match self {
            SinkName::Bot => "bot",
            SinkName::Kochava | SinkName::KochavaSmartlink => "sinks.kochava",
            SinkName::Dashbot => "sinks.dashbot",
            SinkName::PageActivities => "sinks.page_activities",
            SinkName::Conversions => "sinks.conversions",
        }
    }
}

impl fmt::Display for SinkName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
