//! The config validation toolkit, shared by `config` and the sinks' own tables: [`Checker`]
//! (turns raw values into typed ones and collects every [`Problem`] by key), the raw value
//! types ([`Count`], [`StringList`]), secrets, and what every sink table has in common: the
//! delivery keys, `kinds` and `names` ([`SinkTable`]) and the [`DeliveryPolicy`] they give.
//!
//! It sits below both `config` and `sinks` (which `config` composes), so that neither imports
//! the other's validation.

use crate::event::EventKind;
use secrecy::SecretString;
use serde::de::{DeserializeSeed, Deserializer, IntoDeserializer, MapAccess, Visitor};
use serde::{Deserialize, forward_to_deserialize_any};
use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::time::Duration;
use url::Url;

/// One thing wrong with the config, named by its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// Collects problems while turning raw values into typed ones.
#[derive(Debug, Default)]
pub struct Checker {
    pub problems: Vec<Problem>,
}

impl Checker {
    pub fn problem(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            key: key.into(),
            message: message.into(),
        });
    }

    pub fn duration(&mut self, key: &str, raw: Option<&str>, default: Duration) -> Duration {
        match raw {
            None => default,
            Some(text) => match humantime::parse_duration(text.trim()) {
                Ok(duration) => duration,
                Err(error) => {
                    self.problem(
                        key,
                        format!("`{text}` is not a duration like \"250ms\", \"30s\", \"15m\", \"3d\" ({error})"),
                    );
                    default
                }
            },
        }
    }

    pub fn socket_addr(&mut self, key: &str, raw: Option<&str>, default: &str) -> SocketAddr {
        let text = raw.unwrap_or(default);
        match text.parse() {
            Ok(address) => address,
            Err(_) => {
                self.problem(
                    key,
                    format!("`{text}` is not an address like \"0.0.0.0:8080\""),
                );
                SocketAddr::from(([127, 0, 0, 1], 0))
            }
        }
    }

    /// An http(s) URL. A problem quotes the text without its userinfo (`user:password@`).
    pub fn url(&mut self, key: &str, raw: Option<&str>, default: Option<&str>) -> Option<Url> {
        let text = raw.or(default)?;
        match Url::parse(text) {
            Ok(url) if matches!(url.scheme(), "http" | "https") => Some(url),
            Ok(_) => {
                let text = without_userinfo(text);
                self.problem(key, format!("`{text}` is not an http(s) URL"));
                None
            }
            Err(error) => {
                let text = without_userinfo(text);
                self.problem(key, format!("`{text}` is not a URL ({error})"));
                None
            }
        }
    }
}

/// `text` with the userinfo of its authority (`user:password@`) masked, found by the text alone
/// because it may not parse as a URL: everything between `://` and the last `@` before the path.
pub fn without_userinfo(text: &str) -> String {
    let Some(scheme_end) = text.find("://").map(|at| at + 3) else {
        return text.to_owned();
    };
    let authority_end = text[scheme_end..]
        .find(['/', '?', '#'])
        .map_or(text.len(), |at| scheme_end + at);
    match text[scheme_end..authority_end].rfind('@') {
        Some(at) => format!(
            "{}{}@{}",
            &text[..scheme_end],
            crate::redact::MASK,
            &text[scheme_end + at + 1..]
        ),
        None => text.to_owned(),
    }
}

/// An empty string counts as unset, so that `BOTRELAY__X__TOKEN=` clears a token.
pub fn secret(raw: Option<String>) -> Option<SecretString> {
    raw.filter(|value| !value.is_empty())
        .map(SecretString::from)
}

/// A whole number (bytes, attempts, workers): a TOML integer, or digits from the environment.
/// A fraction (`1.5`) or a negative number is refused, where the `config` crate would round it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Count(pub u64);

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Count, D::Error> {
        use serde::de::{Error, Unexpected};
        struct CountVisitor;
        impl Visitor<'_> for CountVisitor {
            type Value = Count;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a whole number")
            }
            fn visit_u64<E: Error>(self, value: u64) -> Result<Count, E> {
                Ok(Count(value))
            }
            fn visit_i64<E: Error>(self, value: i64) -> Result<Count, E> {
                u64::try_from(value)
                    .map(Count)
                    .map_err(|_| E::invalid_value(Unexpected::Signed(value), &self))
            }
            fn visit_f64<E: Error>(self, value: f64) -> Result<Count, E> {
                Err(E::invalid_type(Unexpected::Float(value), &self))
            }
            fn visit_str<E: Error>(self, value: &str) -> Result<Count, E> {
                value
                    .trim()
                    .parse()
                    .map(Count)
                    .map_err(|_| E::invalid_value(Unexpected::Str(value), &self))
            }
        }
        deserializer.deserialize_any(CountVisitor)
    }
}

/// A list given as a TOML array or, from the environment, as a comma-separated string.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum StringList {
    List(Vec<String>),
    Joined(String),
}

impl StringList {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            StringList::List(items) => items,
            StringList::Joined(joined) => joined
                .split(',')
                .map(str::trim)
                .filter(|item| !item.is_empty())
                .map(str::to_owned)
                .collect(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// What every sink table has in common.

/// The keys every sink table takes: its delivery policy and the kinds it receives.
pub const DELIVERY_KEYS: [&str; 7] = [
    "concurrency",
    "timeout",
    "max_attempts",
    "backoff",
    "max_backoff",
    "ttl",
    "kinds",
];

/// How one sink's deliveries are retried (SPEC §4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryPolicy {
    pub concurrency: usize,
    pub timeout: Duration,
    /// Counted failures before a delivery is dead; 0: no limit (the `ttl` decides).
    pub max_attempts: u32,
    pub backoff: Duration,
    pub max_backoff: Duration,
    pub ttl: Duration,
}

impl DeliveryPolicy {
    /// A sink's policy when its table sets none of the keys (a sink may change a default).
    pub const DEFAULT: DeliveryPolicy = DeliveryPolicy {
        concurrency: 32,
        timeout: Duration::from_secs(10),
        max_attempts: 0,
        backoff: Duration::from_secs(1),
        max_backoff: Duration::from_secs(600),
        ttl: Duration::from_secs(3 * 24 * 3600),
    };
}

/// One sink table as read: the keys every sink table takes (the [`DELIVERY_KEYS`] and `names`,
/// read here), and `T`, the sink's own keys (its module's `Table`, which refuses any other).
///
/// Which of the shared keys a table really takes, and which keys of other sinks it must not
/// hold, is the config's to check: it takes unknown keys out before the table is read.
#[derive(Debug)]
pub struct SinkTable<T> {
    pub concurrency: Option<Count>,
    pub timeout: Option<String>,
    pub max_attempts: Option<Count>,
    pub backoff: Option<String>,
    pub max_backoff: Option<String>,
    pub ttl: Option<String>,
    pub kinds: Option<StringList>,
    /// `[<table>.names]`: event names per kind.
    pub names: Option<BTreeMap<String, String>>,
    pub own: T,
}

impl<T> SinkTable<T> {
    /// Reads the value of `key` if it is one of the shared keys; `false` when it is not.
    fn take_shared<'de, A: MapAccess<'de>>(
        &mut self,
        key: &str,
        map: &mut A,
    ) -> Result<bool, A::Error> {
        match key {
            "concurrency" => self.concurrency = map.next_value()?,
            "timeout" => self.timeout = map.next_value()?,
            "max_attempts" => self.max_attempts = map.next_value()?,
            "backoff" => self.backoff = map.next_value()?,
            "max_backoff" => self.max_backoff = map.next_value()?,
            "ttl" => self.ttl = map.next_value()?,
            "kinds" => self.kinds = map.next_value()?,
            "names" => self.names = map.next_value()?,
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// The validated delivery policy, kinds and names of the table at `table`.
    pub fn shared(
        &self,
        check: &mut Checker,
        table: &str,
        defaults: &DeliveryPolicy,
        default_kinds: &[EventKind],
    ) -> Shared {
        let key = |field: &str| format!("{table}.{field}");
        let delivery = DeliveryPolicy {
            concurrency: match self.concurrency.map(|Count(count)| count) {
                None => defaults.concurrency,
                Some(0) => {
                    check.problem(key("concurrency"), "must be at least 1");
                    1
                }
                Some(value) => usize::try_from(value.min(10_000)).unwrap_or(10_000),
            },
            timeout: check.duration(&key("timeout"), self.timeout.as_deref(), defaults.timeout),
            max_attempts: match self.max_attempts.map(|Count(count)| count) {
                None => defaults.max_attempts,
                Some(value) => u32::try_from(value).unwrap_or(u32::MAX),
            },
            backoff: check.duration(&key("backoff"), self.backoff.as_deref(), defaults.backoff),
            max_backoff: check.duration(
                &key("max_backoff"),
                self.max_backoff.as_deref(),
                defaults.max_backoff,
            ),
            ttl: check.duration(&key("ttl"), self.ttl.as_deref(), defaults.ttl),
        };
        if delivery.max_backoff < delivery.backoff {
            check.problem(key("max_backoff"), "must not be shorter than backoff");
        }
        if delivery.timeout.is_zero() {
            check.problem(key("timeout"), "must be greater than 0");
        }

        let kinds = match &self.kinds {
            None => default_kinds.to_vec(),
            Some(list) => {
                let mut kinds = Vec::new();
                for kind in list.clone().into_vec() {
                    match kind.parse::<EventKind>() {
                        Ok(kind) => kinds.push(kind),
                        Err(error) => check.problem(key("kinds"), error.to_string()),
                    }
                }
                kinds
            }
        };
        let mut names = BTreeMap::new();
        for (kind, event_name) in self.names.iter().flatten() {
            match kind.parse::<EventKind>() {
                Ok(kind) if !event_name.is_empty() => {
                    names.insert(kind, event_name.clone());
                }
                Ok(_) => check.problem(key(&format!("names.{kind}")), "must not be empty"),
                Err(error) => check.problem(key("names"), error.to_string()),
            }
        }
        Shared {
            delivery,
            kinds,
            names,
        }
    }
}

/// The validated keys every sink table has in common.
#[derive(Debug, Clone)]
pub struct Shared {
    pub delivery: DeliveryPolicy,
    pub kinds: Vec<EventKind>,
    /// Event name overrides per kind (`[<table>.names]`).
    pub names: BTreeMap<EventKind, String>,
}

/// Reads the shared keys itself and hands every other key, with its value, to `T`, in one pass
/// over the table: the `config` crate's own deserializer reads every value, so environment
/// strings convert to numbers and booleans, and a problem names its key, as in any other table.
impl<'de, T: Deserialize<'de>> Deserialize<'de> for SinkTable<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<SinkTable<T>, D::Error> {
        struct TableVisitor<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for TableVisitor<T> {
            type Value = SinkTable<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                // "struct …", like any derived table, so a problem says "expected a table".
                f.write_str("struct SinkTable")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<SinkTable<T>, A::Error> {
                let mut shared = SinkTable {
                    concurrency: None,
                    timeout: None,
                    max_attempts: None,
                    backoff: None,
                    max_backoff: None,
                    ttl: None,
                    kinds: None,
                    names: None,
                    own: (),
                };
                let own = T::deserialize(OwnKeys {
                    map,
                    shared: &mut shared,
                })?;
                Ok(SinkTable {
                    concurrency: shared.concurrency,
                    timeout: shared.timeout,
                    max_attempts: shared.max_attempts,
                    backoff: shared.backoff,
                    max_backoff: shared.max_backoff,
                    ttl: shared.ttl,
                    kinds: shared.kinds,
                    names: shared.names,
                    own,
                })
            }
        }
        deserializer.deserialize_struct("SinkTable", &[], TableVisitor(PhantomData))
    }
}

/// The table's entries minus the shared keys, which it reads into `shared` on the way.
struct OwnKeys<'s, A> {
    map: A,
    shared: &'s mut SinkTable<()>,
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for OwnKeys<'_, A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, A::Error> {
        while let Some(key) = self.map.next_key::<String>()? {
            if !self.shared.take_shared(&key, &mut self.map)? {
                return seed.deserialize(key.into_deserializer()).map(Some);
            }
        }
        Ok(None)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, A::Error> {
        self.map.next_value_seed(seed)
    }
}

impl<'de, A: MapAccess<'de>> Deserializer<'de> for OwnKeys<'_, A> {
    type Error = A::Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, A::Error> {
        visitor.visit_map(self)
    }

    forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map struct enum
        identifier ignored_any
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn userinfo_is_masked_by_the_text_alone() {
        for (text, masked) in [
            ("https://u:p@host/a@b", "https://[redacted]@host/a@b"),
            ("https://u:p@x@host?q=@", "https://[redacted]@host?q=@"),
            ("https://host/path@x", "https://host/path@x"),
            ("no url here: a@b", "no url here: a@b"),
            (
                "found string \"http://u:p@h\"",
                "found string \"http://[redacted]@h\"",
            ),
        ] {
            assert_eq!(without_userinfo(text), masked, "{text}");
        }
    }
}
