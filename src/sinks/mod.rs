//! The sinks: one closed enum, one pure encoder module per sink. A sink turns an [`Event`] into
//! a [`Request`] (or declines it) and may read a failed response itself (Graph's error codes).
//!
//! No IO here and below: no client, no clock, no async. `dispatch` sends what these return.

pub mod bot;

use crate::config::{Config, DeliveryPolicy, SinkConfig, SinkName, SinkSettings};
use crate::delivery::{Classify, Request};
use crate::event::{Event, EventData, EventKind};
use std::sync::Arc;

/// Why an encoder produced no request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// Nothing for this sink to send (not an error; the delivery is marked skipped).
    #[error("skipped: {0}")]
    Skip(String),
    /// The event can never be sent to this sink: dead-lettered at once.
    #[error("{0}")]
    Invalid(String),
}

/// One sink, with the settings its encoder needs.
#[derive(Debug, Clone)]
pub enum Sink {
    Bot(bot::Bot),
}

impl Sink {
    fn encode(&self, event: &Event) -> Result<Request, EncodeError> {
        match self {
            Sink::Bot(bot) => bot.encode(event),
        }
    }

    fn classifier(&self) -> Classify {
        match self {
            Sink::Bot(_) => |_| None,
        }
    }
}

/// An enabled sink: what it receives, how it is retried, how it encodes.
#[derive(Debug)]
pub struct Route {
    pub name: SinkName,
    pub kinds: Vec<EventKind>,
    pub delivery: DeliveryPolicy,
    sink: Sink,
}

impl Route {
    /// Whether this sink gets a delivery row for `event` at all.
    pub fn accepts(&self, event: &Event) -> bool {
        if !self.kinds.contains(&event.kind) {
            return false;
        }
        // A send that Graph refused is recorded, never fanned out.
        !matches!(&event.data, EventData::Outgoing(outgoing) if !outgoing.succeeded)
    }

    pub fn encode(&self, event: &Event) -> Result<Request, EncodeError> {
        self.sink.encode(event)
    }

    pub fn classifier(&self) -> Classify {
        self.sink.classifier()
    }
}

/// The enabled sinks, in config order (the bot first).
#[derive(Debug, Clone, Default)]
pub struct Sinks {
    routes: Vec<Arc<Route>>,
}

impl Sinks {
    pub fn from_config(config: &Config) -> Sinks {
        let routes = config
            .sinks
            .iter()
            .filter_map(|sink_config| route(config, sink_config))
            .map(Arc::new)
            .collect();
        Sinks { routes }
    }

    pub fn routes(&self) -> &[Arc<Route>] {
        &self.routes
    }

    pub fn get(&self, name: SinkName) -> Option<&Arc<Route>> {
        self.routes.iter().find(|route| route.name == name)
    }

    /// The sinks that should receive `event`.
    pub fn targets(&self, event: &Event) -> Vec<SinkName> {
        self.routes
            .iter()
            .filter(|route| route.accepts(event))
            .map(|route| route.name)
            .collect()
    }
}

fn route(config: &Config, sink_config: &SinkConfig) -> Option<Route> {
    let sink = match &sink_config.settings {
        SinkSettings::Bot { url } => Sink::Bot(bot::Bot {
            url: url.clone(),
            app_secret: config.messenger.app_secret.clone(),
        }),
        // FIXME(analytics sinks): encoders arrive with the analytics-sinks issue.
        _ => return None,
    };
    Some(Route {
        name: sink_config.name,
        kinds: sink_config.kinds.clone(),
        delivery: sink_config.delivery.clone(),
        sink,
    })
}
