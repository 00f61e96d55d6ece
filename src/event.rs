//! The internal event model: what every input becomes and what every sink encodes from.
//!
//! This file knows no wire format. Messenger's JSON lives in `ingest/messenger.rs`, the Send API
//! and Dashbot-outgoing JSON in `ingest/outgoing.rs`, each vendor's JSON in `sinks/<x>.rs`. The
//! serde derives here are the store's own encoding, nothing more. The one exception is the raw
//! webhook item, kept verbatim as `Box<RawValue>` so that the bot sink can forward (and sign) the
//! exact bytes Meta sent.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};
use std::fmt;
use std::str::FromStr;

/// Where an event came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// `POST /webhook`, signed by Meta.
    Webhook,
    /// A send by the bot: `POST /outgoing`, the Send API proxy, or an echo.
    Outgoing,
    /// `POST /events`.
    Custom,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Webhook => "webhook",
            Source::Outgoing => "outgoing",
            Source::Custom => "custom",
        }
    }
}

/// Whether a message attachment of this type shares a post: Messenger's `share`, and
/// Instagram's `ig_post`, which replaced it (SPEC §3: "`ig_post` counts as a share").
pub fn is_share_attachment(attachment_type: &str) -> bool {
    matches!(attachment_type, "share" | "ig_post")
}

/// The closed set of event kinds (SPEC §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Message,
    Echo,
    Postback,
    Referral,
    Optin,
    Delivery,
    Read,
    Reaction,
    Handover,
    AccountLinking,
    PolicyEnforcement,
    /// An edit of a message the user sent earlier (`message_edits`): same `mid`, `num_edit` 1–5.
    MessageEdit,
    /// The user's thumbs up or down on one of the bot's messages (`response_feedback`).
    ResponseFeedback,
    Outgoing,
    Custom,
    Revenue,
    Share,
    PageLaunch,
    Lead,
    Other,
}

impl EventKind {
    pub const ALL: [EventKind; 20] = [
        EventKind::Message,
        EventKind::Echo,
        EventKind::Postback,
        EventKind::Referral,
        EventKind::Optin,
        EventKind::Delivery,
        EventKind::Read,
        EventKind::Reaction,
        EventKind::Handover,
        EventKind::AccountLinking,
        EventKind::PolicyEnforcement,
        EventKind::MessageEdit,
        EventKind::ResponseFeedback,
        EventKind::Outgoing,
        EventKind::Custom,
        EventKind::Revenue,
        EventKind::Share,
        EventKind::PageLaunch,
        EventKind::Lead,
        EventKind::Other,
    ];

    /// The kinds that arrive on `POST /webhook` (what the bot sink receives by default).
    pub const WEBHOOK: [EventKind; 14] = [
        EventKind::Message,
        EventKind::Echo,
        EventKind::Postback,
        EventKind::Referral,
        EventKind::Optin,
        EventKind::Delivery,
        EventKind::Read,
        EventKind::Reaction,
        EventKind::Handover,
        EventKind::AccountLinking,
        EventKind::PolicyEnforcement,
        EventKind::MessageEdit,
        EventKind::ResponseFeedback,
        EventKind::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Message => "message",
            EventKind::Echo => "echo",
            EventKind::Postback => "postback",
            EventKind::Referral => "referral",
            EventKind::Optin => "optin",
            EventKind::Delivery => "delivery",
            EventKind::Read => "read",
            EventKind::Reaction => "reaction",
            EventKind::Handover => "handover",
            EventKind::AccountLinking => "account_linking",
            EventKind::PolicyEnforcement => "policy_enforcement",
            EventKind::MessageEdit => "message_edit",
            EventKind::ResponseFeedback => "response_feedback",
            EventKind::Outgoing => "outgoing",
            EventKind::Custom => "custom",
            EventKind::Revenue => "revenue",
            EventKind::Share => "share",
            EventKind::PageLaunch => "page_launch",
            EventKind::Lead => "lead",
            EventKind::Other => "other",
        }
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error for an unknown kind name (in config `kinds` lists).
#[derive(Debug, thiserror::Error)]
#[error("unknown event kind `{0}`")]
pub struct UnknownKind(pub String);

impl FromStr for EventKind {
    type Err = UnknownKind;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        EventKind::ALL
            .into_iter()
            .find(|kind| kind.as_str() == name)
            .ok_or_else(|| UnknownKind(name.to_owned()))
    }
}

/// A deterministic event id: the first 128 bits of SHA-256 over the identifying parts, in hex.
///
/// Deterministic so that Meta's retries and echo/outgoing double reports collapse on one id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct EventId(String);

impl EventId {
    /// Hashes the parts, separated by NUL so that `("ab", "c")` and `("a", "bc")` differ.
    pub fn derive(parts: &[&[u8]]) -> EventId {
        let mut hasher = Sha256::new();
        for part in parts {
            hasher.update((part.len() as u64).to_be_bytes());
            hasher.update(part);
        }
        let digest = hasher.finalize();
        EventId(hex::encode(&digest[..16]))
    }

    /// The id of an outgoing send, shared by the send's report and its echo.
    pub fn outgoing(message_id: &str) -> EventId {
        EventId::derive(&[b"outgoing", message_id.as_bytes()])
    }

    /// Wraps an id read back from the store.
    pub fn from_stored(id: String) -> EventId {
        EventId(id)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Which array of a webhook entry an item came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Channel {
    Messaging,
    Standby,
}

impl Channel {
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Messaging => "messaging",
            Channel::Standby => "standby",
        }
    }
}

/// Everything needed to rebuild a single-item webhook body for the bot (SPEC §4.1).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WebhookOrigin {
    /// `object` of the batch: `page` or `instagram`.
    pub object: String,
    /// `entry[].id` exactly as received (a string or a number).
    pub entry_id: Box<RawValue>,
    /// `entry[].time` exactly as received, when present.
    pub entry_time: Option<Box<RawValue>>,
    pub channel: Channel,
    /// The messaging item, byte for byte as Meta sent it.
    pub item: Box<RawValue>,
}

/// A referral: from `messaging_referrals`, or carried by a postback or a first message.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Referral {
    pub source: Option<String>,
    /// `type` on the wire; not renamed here, where `type` tags `EventData`.
    pub referral_type: Option<String>,
    #[serde(rename = "ref")]
    pub ref_param: Option<String>,
    pub ad_id: Option<String>,
    pub referer_uri: Option<String>,
}

/// The fields of each kind that sinks need. The raw item keeps everything else.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventData {
    Message {
        mid: Option<String>,
        /// The text; logged only at `trace`, sent to analytics only when a sink opts in.
        text: Option<String>,
        quick_reply_payload: Option<String>,
        attachment_types: Vec<String>,
        reply_to_mid: Option<String>,
        referral: Option<Referral>,
    },
    Echo {
        mid: Option<String>,
        app_id: Option<String>,
        metadata: Option<String>,
    },
    Postback {
        mid: Option<String>,
        title: Option<String>,
        payload: Option<String>,
        referral: Option<Referral>,
    },
    Referral(Referral),
    Optin {
        #[serde(rename = "ref")]
        ref_param: Option<String>,
        optin_type: Option<String>,
        payload: Option<String>,
        user_ref: Option<String>,
    },
    Delivery {
        watermark: Option<i64>,
        mids: Vec<String>,
    },
    Read {
        watermark: Option<i64>,
    },
    Reaction {
        mid: Option<String>,
        reaction: Option<String>,
        emoji: Option<String>,
        action: Option<String>,
    },
    Handover {
        /// `pass_thread_control`, `take_thread_control`, `request_thread_control` or `app_roles`.
        action: String,
        new_owner_app_id: Option<String>,
        previous_owner_app_id: Option<String>,
        requested_owner_app_id: Option<String>,
        metadata: Option<String>,
    },
    AccountLinking {
        status: Option<String>,
    },
    PolicyEnforcement {
        action: Option<String>,
        reason: Option<String>,
    },
    MessageEdit {
        /// The original message's `mid`.
        mid: Option<String>,
        num_edit: Option<i64>,
        /// The new text; like a message's text, logged only at `trace`.
        text: Option<String>,
    },
    ResponseFeedback {
        /// The bot's message the feedback is about.
        mid: Option<String>,
        feedback: Option<String>,
    },
    Outgoing(Outgoing),
    Custom(Custom),
    Other {
        /// The first key of the item that is not `sender`, `recipient` or `timestamp`.
        key: Option<String>,
    },
}

/// A send by the bot (or, from an echo of another app, by a person in the Page inbox).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outgoing {
    /// `message_id` of the Send API response, or `mid` of the echo.
    pub message_id: Option<String>,
    pub recipient_id: Option<String>,
    /// The Send API request body, without any access token.
    pub request: serde_json::Value,
    /// The Send API response body (`{recipient_id, message_id}` or a Graph error).
    pub response: serde_json::Value,
    /// The app that sent it, for echoes.
    pub app_id: Option<String>,
    /// True when only an echo reported this send.
    pub from_echo: bool,
    /// False when Graph answered with an error: recorded, never fanned out.
    pub succeeded: bool,
    /// `web_url` button URLs in the message (for SmartLink impressions).
    pub web_urls: Vec<String>,
    pub intent: Option<serde_json::Value>,
    pub platform_user_json: Option<serde_json::Value>,
}

/// A custom event in Dashbot's event shape (`POST /events`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Custom {
    pub name: String,
    /// Dashbot's event `type`: `customEvent`, `revenueEvent`, `shareEvent`, `pageLaunchEvent`,
    /// `referralEvent`, or ours, `leadEvent`.
    pub event_type: String,
    pub conversation_id: Option<String>,
    pub amount: Option<f64>,
    pub currency: Option<String>,
    pub reference_number: Option<String>,
    /// The type's own fields as posted (`extraInfo`, `metadata`, `sharedMessage`, `ref`, ...).
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// One normalized event.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Event {
    pub id: EventId,
    pub source: Source,
    pub kind: EventKind,
    pub page_id: Option<String>,
    /// PSID, or `user_ref` for plugin users; `None` for page-level events.
    pub user_id: Option<String>,
    /// Milliseconds since the epoch: the platform's timestamp, or receipt time.
    pub timestamp_ms: i64,
    pub data: EventData,
    /// Present for events that came in on `POST /webhook`.
    pub webhook: Option<WebhookOrigin>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_deterministic_and_separate_their_parts() {
        let first = EventId::derive(&[b"message", b"mid.1"]);
        assert_eq!(first, EventId::derive(&[b"message", b"mid.1"]));
        assert_ne!(
            EventId::derive(&[b"ab", b"c"]),
            EventId::derive(&[b"a", b"bc"])
        );
        assert_eq!(first.as_str().len(), 32);
    }

    #[test]
    fn kinds_round_trip_through_their_names() {
        for kind in EventKind::ALL {
            assert_eq!(kind.as_str().parse::<EventKind>().ok(), Some(kind));
            let json = serde_json::to_string(&kind).ok();
            assert_eq!(json, Some(format!("\"{}\"", kind.as_str())));
        }
        assert!("bogus".parse::<EventKind>().is_err());
    }

    #[test]
    fn every_kind_of_data_round_trips_through_the_store_encoding() -> Result<(), serde_json::Error>
    {
        let referral = Referral {
            source: Some("ADS".into()),
            referral_type: Some("OPEN_THREAD".into()),
            ref_param: Some("r".into()),
            ad_id: Some("1".into()),
            referer_uri: None,
        };
        let samples = [
            EventData::Referral(referral.clone()),
            EventData::Postback {
                mid: None,
                title: None,
                payload: None,
                referral: Some(referral),
            },
            EventData::Delivery {
                watermark: Some(5),
                mids: vec!["m".into()],
            },
            EventData::Custom(Custom {
                name: "n".into(),
                event_type: "revenueEvent".into(),
                conversation_id: None,
                amount: Some(1.5),
                currency: Some("USD".into()),
                reference_number: None,
                extra: serde_json::Map::new(),
            }),
        ];
        for data in samples {
            let back: EventData = serde_json::from_str(&serde_json::to_string(&data)?)?;
            assert_eq!(back, data);
        }
        Ok(())
    }

    #[test]
    fn raw_item_survives_the_store_encoding_byte_for_byte() -> Result<(), serde_json::Error> {
        let item = r#"{"url":"https:\/\/x","emoji":"\u2764\ufe0f"}"#;
        let event = Event {
            id: EventId::derive(&[b"x"]),
            source: Source::Webhook,
            kind: EventKind::Other,
            page_id: Some("1".into()),
            user_id: None,
            timestamp_ms: 1,
            data: EventData::Other { key: None },
            webhook: Some(WebhookOrigin {
                object: "page".into(),
                entry_id: RawValue::from_string("1".into())?,
                entry_time: None,
                channel: Channel::Messaging,
                item: RawValue::from_string(item.into())?,
            }),
        };
        let stored = serde_json::to_string(&event)?;
        let back: Event = serde_json::from_str(&stored)?;
        assert_eq!(
            back.webhook.map(|w| w.item.get().to_owned()).as_deref(),
            Some(item)
        );
        Ok(())
    }
}
