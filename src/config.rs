//! Configuration: TOML plus `BOTRELAY__SECTION__KEY` environment overrides, read by the `config`
//! crate into raw serde structs, then validated into the typed [`Config`] the rest of the crate
//! uses (addresses, URLs, durations, secrets, enabled sinks).
//!
//! Validation collects every problem and names its key (`server.listen: ...`), so that
//! `botrelay check-config` can print them all at once. Secrets are [`SecretString`]s: their
//! `Debug` prints nothing of them.

use crate::event::EventKind;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use url::Url;

/// The default config path, relative to the working directory.
pub const DEFAULT_PATH: &str = "config/botrelay.toml";

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

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config: {0}")]
    Load(#[from] config::ConfigError),
    /// The TOML does not parse. The parser's own report quotes the line, which may hold a
    /// secret (an unclosed `app_secret = "…`), so only its position and message are kept.
    #[error("cannot read config: TOML syntax error at line {line}, column {column}: {message}")]
    Syntax {
        line: usize,
        column: usize,
        message: String,
    },
    #[error("invalid config:\n{}", format_problems(.0))]
    Invalid(Vec<Problem>),
}

/// Parses `toml_text` only to report a syntax error without quoting the text (the relay's and
/// the client commands' one way to read a config file's syntax).
pub fn check_syntax(toml_text: &str) -> Result<(), ConfigError> {
    let Err(error) = toml::from_str::<toml::Table>(toml_text) else {
        return Ok(());
    };
    let offset = error
        .span()
        .map_or(0, |span| span.start)
        .min(toml_text.len());
    let before = toml_text.get(..offset).unwrap_or(toml_text);
    let line = before.matches('\n').count() + 1;
    let column = before
        .rsplit('\n')
        .next()
        .map_or(0, |last| last.chars().count())
        + 1;
    Err(ConfigError::Syntax {
        line,
        column,
        message: error.message().trim().to_owned(),
    })
}

fn format_problems(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|problem| format!("  - {problem}"))
        .collect::<Vec<_>>()
        .join("\n")
}

// ---------------------------------------------------------------------------------------------
// Raw: exactly what the file and the environment say.

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    messenger: RawMessenger,
    #[serde(default)]
    ingest: RawIngest,
    #[serde(default)]
    graph: RawGraph,
    #[serde(default)]
    dashbot: RawDashbot,
    #[serde(default)]
    store: RawStore,
    bot: Option<RawSink>,
    #[serde(default)]
    sinks: RawSinks,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<String>,
    max_body_bytes: Option<Count>,
    shutdown_grace: Option<String>,
    read_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: Option<String>,
    token: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    format: Option<String>,
    level: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMessenger {
    app_id: Option<String>,
    app_secret: Option<String>,
    verify_token: Option<String>,
    accept_sha1: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIngest {
    token: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGraph {
    base_url: Option<String>,
    timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDashbot {
    secret: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    path: Option<String>,
    url: Option<String>,
    pool_size: Option<Count>,
    lease: Option<String>,
    dedupe_window: Option<String>,
    retention: Option<String>,
    dead_letter_retention: Option<String>,
    max_bytes: Option<Count>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSinks {
    kochava: Option<RawSink>,
    dashbot: Option<RawSink>,
    page_activities: Option<RawSink>,
    conversions: Option<RawSink>,
}

/// The union of every sink table's keys; each sink accepts only its own (see `SinkName::keys`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSink {
    // Delivery keys, valid in every sink.
    concurrency: Option<Count>,
    timeout: Option<String>,
    max_attempts: Option<Count>,
    backoff: Option<String>,
    max_backoff: Option<String>,
    ttl: Option<String>,
    kinds: Option<StringList>,
    names: Option<BTreeMap<String, String>>,
    // Per-sink keys.
    url: Option<String>,
    app_id: Option<String>,
    include_text: Option<bool>,
    impression_url: Option<String>,
    click_url: Option<String>,
    smartlink_prefix: Option<String>,
    click_payloads: Option<StringList>,
    api_key: Option<String>,
    api_version: Option<String>,
    page_tokens: Option<BTreeMap<String, String>>,
    logging_target: Option<String>,
    dataset_id: Option<String>,
    dataset_ids: Option<BTreeMap<String, String>>,
    access_token: Option<String>,
    partner_agent: Option<String>,
}

/// A whole number (bytes, attempts, workers): a TOML integer, or digits from the environment.
/// A fraction (`1.5`) or a negative number is refused, where the `config` crate would round it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Count(u64);

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Count, D::Error> {
        use serde::de::{Error, Unexpected};
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
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
        deserializer.deserialize_any(Visitor)
    }
}

/// A list given as a TOML array or, from the environment, as a comma-separated string.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum StringList {
    List(Vec<String>),
    Joined(String),
}

impl StringList {
    fn into_vec(self) -> Vec<String> {
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
// Typed: what the rest of the crate reads.

#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub admin: AdminConfig,
    pub log: LogConfig,
    pub messenger: MessengerConfig,
    pub ingest: IngestConfig,
    pub graph: GraphConfig,
    pub dashbot: DashbotConfig,
    pub store: StoreConfig,
    /// The enabled sinks, the bot first.
    pub sinks: Vec<SinkConfig>,
    /// Sinks that have a table but lack credentials, with the reason (logged once at start).
    pub disabled_sinks: Vec<(SinkName, String)>,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub max_body_bytes: usize,
    pub shutdown_grace: Duration,
    /// How long a client may take to send a request's headers, and then its body (both
    /// listeners). Slower clients are cut off, so that none can hold a connection open.
    pub read_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    pub token: Option<SecretString>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    /// `None`: pretty on a terminal, JSON otherwise.
    pub format: Option<LogFormat>,
    pub level: String,
}

#[derive(Debug, Clone)]
pub struct MessengerConfig {
    pub app_id: Option<String>,
    pub app_secret: SecretString,
    pub verify_token: SecretString,
    pub accept_sha1: bool,
}

#[derive(Debug, Clone)]
pub struct IngestConfig {
    pub token: Option<SecretString>,
}

#[derive(Debug, Clone)]
pub struct GraphConfig {
    pub base_url: Url,
    pub timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct DashbotConfig {
    pub secret: Option<SecretString>,
}

#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub path: PathBuf,
    /// `postgres://…`: the PostgreSQL store (several relays on one database) instead of `path`.
    pub url: Option<SecretString>,
    /// The most connections this relay opens to PostgreSQL.
    pub pool_size: usize,
    /// How long a PostgreSQL claim is leased (renewed while its attempt runs): how soon
    /// another relay takes over the deliveries of a relay that died.
    pub lease: Duration,
    pub dedupe_window: Duration,
    pub retention: Duration,
    pub dead_letter_retention: Duration,
    /// Upper bound of the database file; past it ingest answers 503 (Meta retries).
    pub max_bytes: Option<u64>,
}

/// The keys every sink table takes: its delivery policy and the kinds it receives.
const DELIVERY_KEYS: [&str; 7] = [
    "concurrency",
    "timeout",
    "max_attempts",
    "backoff",
    "max_backoff",
    "ttl",
    "kinds",
];

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

    /// The sink-specific keys its table accepts (the `DELIVERY_KEYS` are accepted everywhere).
    fn own_keys(self) -> &'static [&'static str] {
        match self {
            SinkName::Bot => &["url"],
            SinkName::Kochava | SinkName::KochavaSmartlink => &[
                "url",
                "app_id",
                "include_text",
                "impression_url",
                "click_url",
                "smartlink_prefix",
                "click_payloads",
                "names",
            ],
            SinkName::Dashbot => &["url", "api_key", "names"],
            SinkName::PageActivities => &[
                "app_id",
                "api_version",
                "page_tokens",
                "logging_target",
                "names",
            ],
            SinkName::Conversions => &[
                "api_version",
                "dataset_id",
                "dataset_ids",
                "access_token",
                "page_tokens",
                "partner_agent",
                "names",
            ],
        }
    }

    /// The kinds a sink receives when its table has no `kinds` (SPEC §4).
    pub fn default_kinds(self) -> Vec<EventKind> {
        use EventKind::*;
        match self {
            SinkName::Bot => EventKind::WEBHOOK.to_vec(),
            SinkName::Kochava => vec![
                Message, Outgoing, Postback, Referral, Optin, Custom, Revenue, Share, PageLaunch,
                Lead,
            ],
            SinkName::KochavaSmartlink => vec![Outgoing, Postback, Referral, Message],
            SinkName::Dashbot => vec![
                Message, Postback, Referral, Optin, Reaction, Outgoing, Custom, Revenue, Share,
                PageLaunch, Lead,
            ],
            SinkName::PageActivities | SinkName::Conversions => vec![Revenue, Lead, Custom],
        }
    }
}

impl fmt::Display for SinkName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How one sink's deliveries are retried (SPEC §4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryPolicy {
    pub concurrency: usize,
    pub timeout: Duration,
    pub max_attempts: u32,
    pub backoff: Duration,
    pub max_backoff: Duration,
    pub ttl: Duration,
}

/// One enabled sink: what it receives, how it is retried, and its own settings.
#[derive(Debug, Clone)]
pub struct SinkConfig {
    pub name: SinkName,
    pub kinds: Vec<EventKind>,
    /// Event name overrides per kind (`[sinks.<x>.names]`).
    pub names: BTreeMap<EventKind, String>,
    pub delivery: DeliveryPolicy,
    pub settings: SinkSettings,
}

#[derive(Debug, Clone)]
pub enum SinkSettings {
    Bot {
        url: Url,
    },
    Kochava {
        url: Url,
        app_id: SecretString,
        include_text: bool,
    },
    /// Derived from `[sinks.kochava]` when `impression_url` or `click_url` is set.
    KochavaSmartlink {
        /// GET on an outgoing message with a `web_url` button under `smartlink_prefix`.
        impression_url: Option<String>,
        /// GET on a postback whose payload is in `click_payloads`, or on a referral.
        click_url: Option<String>,
        smartlink_prefix: Option<String>,
        click_payloads: Vec<String>,
    },
    Dashbot {
        url: Url,
        api_key: SecretString,
    },
    PageActivities {
        app_id: String,
        api_version: String,
        page_tokens: BTreeMap<String, SecretString>,
        logging_target: String,
    },
    Conversions {
        api_version: String,
        dataset_id: Option<String>,
        dataset_ids: BTreeMap<String, String>,
        access_token: Option<SecretString>,
        page_tokens: BTreeMap<String, SecretString>,
        partner_agent: Option<String>,
    },
}

impl Config {
    /// Loads the file (when it exists, or always when `explicit`) and the `BOTRELAY__` environment.
    pub fn load(path: &Path, explicit: bool) -> Result<Config, ConfigError> {
        let environment: HashMap<String, String> = std::env::vars()
            .filter(|(name, _)| name.starts_with("BOTRELAY__"))
            .collect();
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(error) if explicit || error.kind() != std::io::ErrorKind::NotFound => {
                return Err(ConfigError::Load(config::ConfigError::Foreign(Box::new(
                    std::io::Error::new(error.kind(), format!("{}: {error}", path.display())),
                ))));
            }
            Err(_) => String::new(),
        };
        Config::from_sources(&text, environment)
    }

    /// Pure: TOML text plus an environment map (only `BOTRELAY__…` names are read).
    pub fn from_sources(
        toml_text: &str,
        environment: HashMap<String, String>,
    ) -> Result<Config, ConfigError> {
        check_syntax(toml_text)?;
        let merged = config::Config::builder()
            .add_source(config::File::from_str(toml_text, config::FileFormat::Toml))
            .add_source(
                config::Environment::with_prefix("BOTRELAY")
                    .prefix_separator("__")
                    .separator("__")
                    .source(Some(environment)),
            )
            .build()?;
        let tree = config::Source::collect(&merged)?;
        let (raw, mut problems) = deserialize_every_key(tree.clone())?;
        match validate(raw) {
            Ok(config) if problems.is_empty() => Ok(config),
            Ok(_) => Err(ConfigError::Invalid(problems)),
            Err(ConfigError::Invalid(more)) => {
                // A value from the environment wins over the file: say so, or the operator
                // looks for it in the file.
                problems.extend(more.into_iter().map(|mut problem| {
                    let origin = lookup(&tree, &problem.key).and_then(config::Value::origin);
                    problem.message.push_str(&origin_note(&problem.key, origin));
                    problem
                }));
                Err(ConfigError::Invalid(problems))
            }
            Err(other) => Err(other),
        }
    }

    pub fn sink(&self, name: SinkName) -> Option<&SinkConfig> {
        self.sinks.iter().find(|sink| sink.name == name)
    }

    /// Every secret value in the config, for the redaction of logs and stored errors.
    pub fn secrets(&self) -> Vec<String> {
        let mut secrets = vec![
            self.messenger.app_secret.expose_secret().to_owned(),
            self.messenger.verify_token.expose_secret().to_owned(),
        ];
        let optional = [&self.admin.token, &self.ingest.token, &self.dashbot.secret];
        // The database password, as written in the URL and decoded.
        if let Some(url) = &self.store.url
            && let Ok(url) = Url::parse(url.expose_secret())
            && let Some(password) = url.password()
        {
            secrets.push(password.to_owned());
            if let Ok(config) = url.as_str().parse::<tokio_postgres::Config>()
                && let Some(decoded) = config.get_password()
            {
                secrets.push(String::from_utf8_lossy(decoded).into_owned());
            }
        }
        secrets.extend(
            optional
                .into_iter()
                .flatten()
                .map(|secret| secret.expose_secret().to_owned()),
        );
        for sink in &self.sinks {
            match &sink.settings {
                // A password in a sink's URL (`https://user:password@bot.example/webhook`).
                SinkSettings::Bot { url } | SinkSettings::Kochava { url, .. } => {
                    secrets.extend(url.password().map(str::to_owned));
                }
                SinkSettings::KochavaSmartlink { .. } => {}
                SinkSettings::Dashbot { api_key, url } => {
                    secrets.extend(url.password().map(str::to_owned));
                    secrets.push(api_key.expose_secret().to_owned())
                }
                SinkSettings::PageActivities { page_tokens, .. } => secrets.extend(
                    page_tokens
                        .values()
                        .map(|token| token.expose_secret().to_owned()),
                ),
                SinkSettings::Conversions {
                    access_token,
                    page_tokens,
                    ..
                } => {
                    secrets.extend(
                        access_token
                            .iter()
                            .chain(page_tokens.values())
                            .map(|token| token.expose_secret().to_owned()),
                    );
                }
            }
        }
        secrets.retain(|secret| !secret.is_empty());
        secrets
    }
}

/// The most unknown or mistyped keys reported before giving up.
const MAX_KEY_PROBLEMS: usize = 100;

/// Deserializes the merged file and environment into [`RawConfig`], reporting every unknown or
/// mistyped key rather than the first: serde stops at the first, so each one found is recorded
/// and taken out of the tree, and the rest is tried again. What is left is validated as usual,
/// so `check-config` lists every problem at once. (The tree keeps the `config` crate's own
/// values, so that environment strings still convert to numbers and booleans as they would.)
fn deserialize_every_key(
    mut tree: config::Map<String, config::Value>,
) -> Result<(RawConfig, Vec<Problem>), ConfigError> {
    let mut problems: Vec<Problem> = Vec::new();
    loop {
        let whole = config::Value::new(None, config::ValueKind::Table(tree.clone()));
        let error = match whole.try_deserialize::<RawConfig>() {
            Ok(raw) => {
                // serde meets the keys in the order of a hash map: sort for a stable report.
                problems.sort_by(|a, b| a.key.cmp(&b.key));
                return Ok((raw, problems));
            }
            Err(error) => error,
        };
        let Some(problem) = key_problem(&error, &tree).map(hide_secret_value) else {
            return Err(ConfigError::Load(error));
        };
        let removed = remove_key(&mut tree, &problem.key);
        problems.push(problem);
        if !removed || problems.len() >= MAX_KEY_PROBLEMS {
            return Err(ConfigError::Invalid(problems));
        }
    }
}

/// The key a deserialization error is about, and what is wrong with it; `None` for an error
/// that is not about one key.
fn key_problem(
    error: &config::ConfigError,
    tree: &config::Map<String, config::Value>,
) -> Option<Problem> {
    match error {
        config::ConfigError::Type {
            origin,
            unexpected,
            expected,
            key: Some(key),
        } => Some(Problem {
            key: key.clone(),
            message: format!(
                "expected {}, found {unexpected}{}",
                plain_expected(expected),
                origin_note(key, origin.as_deref())
            ),
        }),
        config::ConfigError::At { error, key, .. } => {
            let Some(table) = key.as_deref().filter(|key| !key.is_empty()) else {
                return key_problem(error, tree);
            };
            let mut inner = key_problem(error, tree)?;
            // The sink tables share one raw struct: name the keys this table takes.
            if let Some(sink) = SinkName::ALL.into_iter().find(|sink| sink.table() == table)
                && inner.message.starts_with("unknown key")
            {
                let keys: Vec<String> = DELIVERY_KEYS
                    .iter()
                    .chain(sink.own_keys())
                    .map(|key| format!("`{key}`"))
                    .collect();
                inner.message = format!("unknown key; [{table}] takes {}", keys.join(", "));
            }
            let key = if inner.key.is_empty() {
                table.to_owned()
            } else {
                format!("{table}.{}", inner.key)
            };
            let origin = lookup(tree, &key).and_then(config::Value::origin);
            Some(Problem {
                message: format!("{}{}", inner.message, origin_note(&key, origin)),
                key,
            })
        }
        config::ConfigError::Message(message) => Some(message_problem(message)),
        _ => None,
    }
}

/// Config keys whose values are secrets (page tokens are a table of them; Kochava's app id is
/// treated as a credential too).
const SECRET_KEYS: [&str; 8] = [
    "messenger.app_secret",
    "messenger.verify_token",
    "admin.token",
    "ingest.token",
    "dashbot.secret",
    "sinks.kochava.app_id",
    "sinks.dashbot.api_key",
    "sinks.conversions.access_token",
];

/// A problem with a secret's key, or with a table that holds one, does not quote the value it
/// found (a token set in the wrong place, or as a string where a table was expected, such as
/// `messenger = "…"`, would be printed otherwise).
fn hide_secret_value(problem: Problem) -> Problem {
    let key = problem.key.split('[').next().unwrap_or(&problem.key);
    let secret = SECRET_KEYS
        .iter()
        .chain(&["sinks.page_activities.page_tokens"])
        .any(|secret| {
            secret
                .strip_prefix(key)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
        })
        || key.split('.').any(|segment| segment == "page_tokens");
    match problem.message.split_once(", found ") {
        Some((expected, found)) if secret => {
            let origin = found
                .rfind(" (from BOTRELAY__")
                .map(|at| &found[at..])
                .unwrap_or_default();
            Problem {
                message: format!("{expected}; the value is not shown, it is a secret{origin}"),
                key: problem.key,
            }
        }
        // `bot = "https://user:password@…"` (a URL where the table belongs).
        _ => Problem {
            message: without_userinfo(&problem.message),
            key: problem.key,
        },
    }
}

/// serde's own messages, which name no key: an unknown field names itself; any other message is
/// about the key the caller adds (`key` is empty then).
fn message_problem(message: &str) -> Problem {
    if let Some(rest) = message.strip_prefix("unknown field `")
        && let Some((name, expected)) = rest.split_once('`')
    {
        let expected = expected.trim_start_matches(',').trim();
        let message = if expected.starts_with("expected") {
            format!("unknown key; {expected}")
        } else {
            "unknown key".to_owned()
        };
        return Problem {
            key: name.to_owned(),
            message,
        };
    }
    let message = if message.contains("untagged enum StringList") {
        "expected a list of strings, or one comma-separated string".to_owned()
    } else if let Some((found, expected)) = message
        .strip_prefix("invalid type: ")
        .or_else(|| message.strip_prefix("invalid value: "))
        .and_then(|rest| rest.split_once(", expected "))
    {
        format!("expected {}, found {found}", plain_expected(expected))
    } else {
        message.to_owned()
    };
    Problem {
        key: String::new(),
        message,
    }
}

/// What serde expected, in the config's words: our raw structs are tables
/// (`struct RawMessenger` → `a table`).
fn plain_expected(expected: &str) -> &str {
    if expected.starts_with("struct ") {
        "a table"
    } else {
        expected
    }
}

/// ` (from BOTRELAY__SERVER__LISTEN)` when the value came from the environment.
fn origin_note(key: &str, origin: Option<&str>) -> String {
    match origin {
        Some("the environment") => {
            let key = key.split('[').next().unwrap_or(key);
            format!(
                " (from BOTRELAY__{})",
                key.replace('.', "__").to_uppercase()
            )
        }
        _ => String::new(),
    }
}

/// The names along a dotted key (`server.listen` → `server`, `listen`); a `[n]` index counts
/// as its array. A name may itself contain dots (`page_tokens = { "1.2" = … }`): at each level
/// the longest name that is there wins. `None` when the tree has no such value.
fn key_path<'k>(tree: &config::Map<String, config::Value>, key: &'k str) -> Option<Vec<&'k str>> {
    let key = key.split('[').next().unwrap_or(key);
    if tree.contains_key(key) {
        return Some(vec![key]);
    }
    key.match_indices('.').rev().find_map(|(dot, _)| {
        let config::ValueKind::Table(inner) = &tree.get(&key[..dot])?.kind else {
            return None;
        };
        let mut path = key_path(inner, &key[dot + 1..])?;
        path.insert(0, &key[..dot]);
        Some(path)
    })
}

/// The value at a dotted key (see [`key_path`]).
fn lookup<'a>(
    tree: &'a config::Map<String, config::Value>,
    key: &str,
) -> Option<&'a config::Value> {
    let path = key_path(tree, key)?;
    let (last, parents) = path.split_last()?;
    let mut table = tree;
    for name in parents {
        let config::ValueKind::Table(inner) = &table.get(*name)?.kind else {
            return None;
        };
        table = inner;
    }
    table.get(*last)
}

/// Takes the value at a dotted key (see [`key_path`]) out of the tree; false when there is none.
fn remove_key(tree: &mut config::Map<String, config::Value>, key: &str) -> bool {
    let Some(path) = key_path(tree, key) else {
        return false;
    };
    let Some((last, parents)) = path.split_last() else {
        return false;
    };
    let mut table = tree;
    for name in parents {
        match table.get_mut(*name).map(|value| &mut value.kind) {
            Some(config::ValueKind::Table(inner)) => table = inner,
            _ => return false,
        }
    }
    table.remove(*last).is_some()
}

/// Collects problems while turning raw values into typed ones.
#[derive(Default)]
struct Checker {
    problems: Vec<Problem>,
}

impl Checker {
    fn problem(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            key: key.into(),
            message: message.into(),
        });
    }

    fn duration(&mut self, key: &str, raw: Option<&str>, default: Duration) -> Duration {
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

    fn socket_addr(&mut self, key: &str, raw: Option<&str>, default: &str) -> SocketAddr {
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
    fn url(&mut self, key: &str, raw: Option<&str>, default: Option<&str>) -> Option<Url> {
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
fn without_userinfo(text: &str) -> String {
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
/// Whether `text` is a PostgreSQL URL the store can use; a problem names what is wrong
/// without quoting the URL's `user:password@`.
fn postgres_url(check: &mut Checker, text: &str) -> bool {
    let shown = without_userinfo(text);
    let problem = match Url::parse(text) {
        Ok(url) if matches!(url.scheme(), "postgres" | "postgresql") => {
            match text.parse::<tokio_postgres::Config>() {
                Ok(_) if url.host_str().is_some_and(|host| !host.is_empty()) => return true,
                Ok(_) => format!("`{shown}` names no host"),
                Err(_) => format!(
                    "`{shown}` has an option this relay does not know (sslmode may be disable, prefer or require)"
                ),
            }
        }
        Ok(_) | Err(_) => format!("`{shown}` is not a postgres://user@host:port/database URL"),
    };
    check.problem("store.url", problem);
    false
}

fn secret(raw: Option<String>) -> Option<SecretString> {
    raw.filter(|value| !value.is_empty())
        .map(SecretString::from)
}

fn validate(raw: RawConfig) -> Result<Config, ConfigError> {
    let mut check = Checker::default();

    let server = ServerConfig {
        listen: check.socket_addr(
            "server.listen",
            raw.server.listen.as_deref(),
            "0.0.0.0:8080",
        ),
        max_body_bytes: match raw.server.max_body_bytes.map(|Count(bytes)| bytes) {
            None => 1024 * 1024,
            Some(0) => {
                check.problem("server.max_body_bytes", "must be greater than 0");
                1
            }
            Some(bytes) => usize::try_from(bytes).unwrap_or(usize::MAX),
        },
        shutdown_grace: check.duration(
            "server.shutdown_grace",
            raw.server.shutdown_grace.as_deref(),
            Duration::from_secs(10),
        ),
        read_timeout: check.duration(
            "server.read_timeout",
            raw.server.read_timeout.as_deref(),
            Duration::from_secs(30),
        ),
    };
    if server.read_timeout.is_zero() {
        check.problem("server.read_timeout", "must be greater than 0");
    }

    let admin = AdminConfig {
        listen: check.socket_addr(
            "admin.listen",
            raw.admin.listen.as_deref(),
            "127.0.0.1:9091",
        ),
        token: secret(raw.admin.token),
    };

    let log = LogConfig {
        format: match raw.log.format.as_deref() {
            None => None,
            Some("pretty") => Some(LogFormat::Pretty),
            Some("json") => Some(LogFormat::Json),
            Some(other) => {
                check.problem(
                    "log.format",
                    format!("`{other}` is neither \"pretty\" nor \"json\""),
                );
                None
            }
        },
        level: match raw.log.level {
            None => "info".to_owned(),
            Some(level) => {
                if tracing_subscriber::EnvFilter::try_new(&level).is_err() {
                    check.problem(
                        "log.level",
                        format!(
                            "`{level}` is not a level or filter like \"info\" or \"botrelay=debug\""
                        ),
                    );
                }
                level
            }
        },
    };

    let app_secret = secret(raw.messenger.app_secret);
    if app_secret.is_none() {
        check.problem(
            "messenger.app_secret",
            "is required: the App Secret from the Meta App Dashboard (Settings > Basic); set it in \
             the file or as BOTRELAY__MESSENGER__APP_SECRET",
        );
    }
    let verify_token = secret(raw.messenger.verify_token);
    if verify_token.is_none() {
        check.problem(
            "messenger.verify_token",
            "is required: the Verify Token you enter in the Meta App Dashboard webhook setup; set \
             it in the file or as BOTRELAY__MESSENGER__VERIFY_TOKEN",
        );
    }
    let messenger = MessengerConfig {
        app_id: raw.messenger.app_id.filter(|id| !id.is_empty()),
        app_secret: app_secret.unwrap_or_else(|| SecretString::from(String::new())),
        verify_token: verify_token.unwrap_or_else(|| SecretString::from(String::new())),
        accept_sha1: raw.messenger.accept_sha1.unwrap_or(false),
    };

    let graph_base_url = check.url(
        "graph.base_url",
        raw.graph.base_url.as_deref(),
        Some("https://graph.facebook.com"),
    );
    let graph_timeout = check.duration(
        "graph.timeout",
        raw.graph.timeout.as_deref(),
        Duration::from_secs(30),
    );

    let store_url =
        secret(raw.store.url).filter(|url| postgres_url(&mut check, url.expose_secret()));
    let pool_size = match raw.store.pool_size {
        None => 16,
        Some(Count(0)) => {
            check.problem("store.pool_size", "must be at least 1");
            16
        }
        Some(Count(size)) => usize::try_from(size).unwrap_or(usize::MAX),
    };
    let lease = check.duration(
        "store.lease",
        raw.store.lease.as_deref(),
        Duration::from_secs(30),
    );
    if lease.is_zero() {
        check.problem("store.lease", "must be longer than 0");
    }
    let day = Duration::from_secs(24 * 3600);
    let store = StoreConfig {
        path: PathBuf::from(
            raw.store
                .path
                .unwrap_or_else(|| "data/botrelay.db".to_owned()),
        ),
        url: store_url,
        pool_size,
        lease,
        dedupe_window: check.duration(
            "store.dedupe_window",
            raw.store.dedupe_window.as_deref(),
            7 * day,
        ),
        retention: check.duration("store.retention", raw.store.retention.as_deref(), 7 * day),
        dead_letter_retention: check.duration(
            "store.dead_letter_retention",
            raw.store.dead_letter_retention.as_deref(),
            30 * day,
        ),
        max_bytes: raw.store.max_bytes.map(|Count(bytes)| bytes),
    };

    let mut sinks = Vec::new();
    let mut disabled_sinks = Vec::new();
    let tables = [
        (SinkName::Bot, raw.bot),
        (SinkName::Kochava, raw.sinks.kochava),
        (SinkName::Dashbot, raw.sinks.dashbot),
        (SinkName::PageActivities, raw.sinks.page_activities),
        (SinkName::Conversions, raw.sinks.conversions),
    ];
    for (name, table) in tables {
        let Some(table) = table else { continue };
        match sink(&mut check, name, table, &messenger) {
            Ok(Some((sink, smartlink))) => {
                sinks.push(sink);
                sinks.extend(smartlink);
            }
            Ok(None) => {}
            Err(reason) => disabled_sinks.push((name, reason)),
        }
    }

    // A URL that failed validation recorded a problem, so `None` here means "invalid".
    let (Some(base_url), true) = (graph_base_url, check.problems.is_empty()) else {
        return Err(ConfigError::Invalid(check.problems));
    };
    let graph = GraphConfig {
        base_url,
        timeout: graph_timeout,
    };
    Ok(Config {
        server,
        admin,
        log,
        messenger,
        ingest: IngestConfig {
            token: secret(raw.ingest.token),
        },
        graph,
        dashbot: DashbotConfig {
            secret: secret(raw.dashbot.secret),
        },
        store,
        sinks,
        disabled_sinks,
    })
}

/// Validates one sink table: `Ok(Some)` enabled (with the SmartLink pings Kochava's table may
/// add), `Ok(None)` invalid (problems recorded), `Err(reason)` disabled for lack of credentials.
fn sink(
    check: &mut Checker,
    name: SinkName,
    table: RawSink,
    messenger: &MessengerConfig,
) -> Result<Option<(SinkConfig, Option<SinkConfig>)>, String> {
    let prefix = name.table();
    let key = |field: &str| format!("{prefix}.{field}");

    for (field, present) in sink_fields_present(&table) {
        if present && !name.own_keys().contains(&field) {
            check.problem(key(field), format!("is not a key of [{prefix}]"));
        }
    }

    let defaults = DeliveryPolicy {
        concurrency: 32,
        timeout: Duration::from_secs(10),
        max_attempts: 12,
        backoff: Duration::from_secs(1),
        max_backoff: Duration::from_secs(600),
        ttl: if name == SinkName::Bot {
            Duration::from_secs(3600)
        } else {
            Duration::from_secs(3 * 24 * 3600)
        },
    };
    let delivery = DeliveryPolicy {
        concurrency: match table.concurrency.map(|Count(count)| count) {
            None => defaults.concurrency,
            Some(0) => {
                check.problem(key("concurrency"), "must be at least 1");
                1
            }
            Some(value) => usize::try_from(value.min(10_000)).unwrap_or(10_000),
        },
        timeout: check.duration(&key("timeout"), table.timeout.as_deref(), defaults.timeout),
        max_attempts: match table.max_attempts.map(|Count(count)| count) {
            None => defaults.max_attempts,
            Some(0) => {
                check.problem(key("max_attempts"), "must be at least 1");
                1
            }
            Some(value) => u32::try_from(value).unwrap_or(u32::MAX),
        },
        backoff: check.duration(&key("backoff"), table.backoff.as_deref(), defaults.backoff),
        max_backoff: check.duration(
            &key("max_backoff"),
            table.max_backoff.as_deref(),
            defaults.max_backoff,
        ),
        ttl: check.duration(&key("ttl"), table.ttl.as_deref(), defaults.ttl),
    };
    if delivery.max_backoff < delivery.backoff {
        check.problem(key("max_backoff"), "must not be shorter than backoff");
    }
    if delivery.timeout.is_zero() {
        check.problem(key("timeout"), "must be greater than 0");
    }

    let kinds = match table.kinds {
        None => name.default_kinds(),
        Some(list) => {
            let mut kinds = Vec::new();
            for kind in list.into_vec() {
                match kind.parse::<EventKind>() {
                    Ok(kind) => kinds.push(kind),
                    Err(error) => check.problem(key("kinds"), error.to_string()),
                }
            }
            kinds
        }
    };
    let mut names = BTreeMap::new();
    for (kind, event_name) in table.names.unwrap_or_default() {
        match kind.parse::<EventKind>() {
            Ok(kind) if !event_name.is_empty() => {
                names.insert(kind, event_name);
            }
            Ok(_) => check.problem(key(&format!("names.{kind}")), "must not be empty"),
            Err(error) => check.problem(key("names"), error.to_string()),
        }
    }

    let mut smartlink = None;
    let settings = match name {
        SinkName::Bot => {
            let Some(url) = check.url(&key("url"), table.url.as_deref(), None) else {
                if table.url.is_none() {
                    return Err("bot.url is not set".to_owned());
                }
                return Ok(None);
            };
            SinkSettings::Bot { url }
        }
        SinkName::Kochava => {
            let url = check.url(
                &key("url"),
                table.url.as_deref(),
                Some("https://control.kochava.com/track/json"),
            );
            let app_id = secret(table.app_id).ok_or("sinks.kochava.app_id is not set")?;
            for (field, template) in [
                ("impression_url", &table.impression_url),
                ("click_url", &table.click_url),
            ] {
                if let Some(template) = template {
                    if !template.contains("{fb_user_id}") {
                        check.problem(key(field), "must contain the placeholder {fb_user_id}");
                    }
                    check.url(
                        &key(field),
                        Some(&template.replace("{fb_user_id}", "x")),
                        None,
                    );
                }
            }
            let Some(url) = url else { return Ok(None) };
            if table.impression_url.is_some() || table.click_url.is_some() {
                smartlink = Some(SinkConfig {
                    name: SinkName::KochavaSmartlink,
                    kinds: SinkName::KochavaSmartlink.default_kinds(),
                    names: BTreeMap::new(),
                    delivery: delivery.clone(),
                    settings: SinkSettings::KochavaSmartlink {
                        impression_url: table.impression_url,
                        click_url: table.click_url,
                        smartlink_prefix: table.smartlink_prefix,
                        click_payloads: table
                            .click_payloads
                            .map(StringList::into_vec)
                            .unwrap_or_default(),
                    },
                });
            }
            SinkSettings::Kochava {
                url,
                app_id,
                include_text: table.include_text.unwrap_or(false),
            }
        }
        SinkName::Dashbot => {
            let url = check.url(
                &key("url"),
                table.url.as_deref(),
                Some("https://tracker.dashbot.io/track"),
            );
            let api_key = secret(table.api_key).ok_or("sinks.dashbot.api_key is not set")?;
            let Some(url) = url else { return Ok(None) };
            SinkSettings::Dashbot { url, api_key }
        }
        // Never a table of its own: derived from [sinks.kochava] above.
        SinkName::KochavaSmartlink => return Ok(None),
        SinkName::PageActivities => {
            let app_id = table
                .app_id
                .filter(|id| !id.is_empty())
                .or_else(|| messenger.app_id.clone())
                .ok_or("sinks.page_activities.app_id (or messenger.app_id) is not set")?;
            let page_tokens: BTreeMap<String, SecretString> = table
                .page_tokens
                .unwrap_or_default()
                .into_iter()
                .filter(|(_, token)| !token.is_empty())
                .map(|(page, token)| (page, SecretString::from(token)))
                .collect();
            if page_tokens.is_empty() {
                return Err("sinks.page_activities.page_tokens is empty".to_owned());
            }
            let logging_target = table.logging_target.unwrap_or_else(|| "page".to_owned());
            if !matches!(
                logging_target.to_ascii_lowercase().as_str(),
                "page" | "app" | "app_and_page"
            ) {
                check.problem(
                    key("logging_target"),
                    "must be \"page\", \"app\" or \"app_and_page\"",
                );
            }
            SinkSettings::PageActivities {
                app_id,
                api_version: api_version(check, &key("api_version"), table.api_version, "v20.0"),
                page_tokens,
                logging_target,
            }
        }
        SinkName::Conversions => {
            let dataset_ids = table.dataset_ids.unwrap_or_default();
            let page_tokens: BTreeMap<String, SecretString> = table
                .page_tokens
                .unwrap_or_default()
                .into_iter()
                .filter(|(_, token)| !token.is_empty())
                .map(|(page, token)| (page, SecretString::from(token)))
                .collect();
            let access_token = secret(table.access_token);
            let dataset_id = table.dataset_id.filter(|id| !id.is_empty());
            if dataset_id.is_none() && dataset_ids.is_empty() {
                return Err("sinks.conversions.dataset_id (or dataset_ids) is not set".to_owned());
            }
            if access_token.is_none() && page_tokens.is_empty() {
                return Err("sinks.conversions.access_token (or page_tokens) is not set".to_owned());
            }
            SinkSettings::Conversions {
                api_version: api_version(check, &key("api_version"), table.api_version, "v23.0"),
                dataset_id,
                dataset_ids,
                access_token,
                page_tokens,
                partner_agent: table.partner_agent.filter(|agent| !agent.is_empty()),
            }
        }
    };
    Ok(Some((
        SinkConfig {
            name,
            kinds,
            names,
            delivery,
            settings,
        },
        smartlink,
    )))
}

fn api_version(check: &mut Checker, key: &str, raw: Option<String>, default: &str) -> String {
    let version = raw.unwrap_or_else(|| default.to_owned());
    let valid = version
        .strip_prefix('v')
        .and_then(|rest| rest.split_once('.'))
        .is_some_and(|(major, minor)| {
            !major.is_empty()
                && !minor.is_empty()
                && major.chars().all(|c| c.is_ascii_digit())
                && minor.chars().all(|c| c.is_ascii_digit())
        });
    if !valid {
        check.problem(
            key,
            format!("`{version}` is not a Graph API version like \"v20.0\""),
        );
    }
    version
}

fn sink_fields_present(table: &RawSink) -> [(&'static str, bool); 16] {
    [
        ("url", table.url.is_some()),
        ("app_id", table.app_id.is_some()),
        ("include_text", table.include_text.is_some()),
        ("impression_url", table.impression_url.is_some()),
        ("click_url", table.click_url.is_some()),
        ("smartlink_prefix", table.smartlink_prefix.is_some()),
        ("click_payloads", table.click_payloads.is_some()),
        ("api_key", table.api_key.is_some()),
        ("api_version", table.api_version.is_some()),
        ("page_tokens", table.page_tokens.is_some()),
        ("logging_target", table.logging_target.is_some()),
        ("dataset_id", table.dataset_id.is_some()),
        ("dataset_ids", table.dataset_ids.is_some()),
        ("access_token", table.access_token.is_some()),
        ("partner_agent", table.partner_agent.is_some()),
        ("names", table.names.is_some()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
            .collect()
    }

    const MINIMAL: &str = "[messenger]\napp_secret = \"s\"\nverify_token = \"v\"\n";

    fn problems(text: &str, environment: &[(&str, &str)]) -> Vec<String> {
        match Config::from_sources(text, env(environment)) {
            Ok(_) => Vec::new(),
            Err(ConfigError::Invalid(problems)) => {
                problems.iter().map(ToString::to_string).collect()
            }
            Err(other) => vec![other.to_string()],
        }
    }

    #[test]
    fn defaults_follow_the_spec() -> Result<(), ConfigError> {
        let config = Config::from_sources(MINIMAL, HashMap::new())?;
        assert_eq!(config.server.listen.to_string(), "0.0.0.0:8080");
        assert_eq!(config.server.max_body_bytes, 1024 * 1024);
        assert_eq!(config.server.shutdown_grace, Duration::from_secs(10));
        assert_eq!(config.server.read_timeout, Duration::from_secs(30));
        assert_eq!(config.admin.listen.to_string(), "127.0.0.1:9091");
        assert_eq!(
            config.graph.base_url.as_str(),
            "https://graph.facebook.com/"
        );
        assert_eq!(config.graph.timeout, Duration::from_secs(30));
        assert_eq!(config.store.path, PathBuf::from("data/botrelay.db"));
        assert_eq!(config.store.dedupe_window, Duration::from_secs(7 * 86400));
        assert_eq!(
            config.store.dead_letter_retention,
            Duration::from_secs(30 * 86400)
        );
        assert!(!config.messenger.accept_sha1);
        assert!(config.sinks.is_empty());
        Ok(())
    }

    #[test]
    fn missing_app_secret_is_named() {
        let found = problems("", &[("BOTRELAY__MESSENGER__VERIFY_TOKEN", "v")]);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].starts_with("messenger.app_secret: is required"),
            "{found:?}"
        );
    }

    #[test]
    fn environment_overrides_the_file_with_double_underscores() -> Result<(), ConfigError> {
        let config = Config::from_sources(
            "[server]\nlisten = \"127.0.0.1:1\"\n[bot]\nurl = \"http://bot.invalid/hook\"\n",
            env(&[
                ("BOTRELAY__MESSENGER__APP_SECRET", "from-env"),
                ("BOTRELAY__MESSENGER__VERIFY_TOKEN", "0042"),
                ("BOTRELAY__SERVER__LISTEN", "127.0.0.1:2"),
                ("BOTRELAY__SERVER__MAX_BODY_BYTES", "2048"),
                ("BOTRELAY__BOT__MAX_ATTEMPTS", "3"),
                ("BOTRELAY__BOT__KINDS", "message, postback"),
                ("BOTRELAY__MESSENGER__ACCEPT_SHA1", "true"),
            ]),
        )?;
        assert_eq!(config.server.listen.to_string(), "127.0.0.1:2");
        assert_eq!(config.server.max_body_bytes, 2048);
        assert_eq!(config.messenger.app_secret.expose_secret(), "from-env");
        assert_eq!(config.messenger.verify_token.expose_secret(), "0042");
        assert!(config.messenger.accept_sha1);
        let bot = config
            .sink(SinkName::Bot)
            .ok_or_else(|| ConfigError::Invalid(vec![]))?;
        assert_eq!(bot.delivery.max_attempts, 3);
        assert_eq!(bot.delivery.ttl, Duration::from_secs(3600));
        assert_eq!(bot.kinds, vec![EventKind::Message, EventKind::Postback]);
        Ok(())
    }

    #[test]
    fn every_problem_is_reported_with_its_key() {
        let found = problems(
            "[server]\nlisten = \"nope\"\nshutdown_grace = \"soon\"\n[log]\nformat = \"xml\"\n\
             [bot]\nurl = \"ftp://x\"\nbackoff = \"10s\"\nmax_backoff = \"1s\"\nkinds = [\"message\", \"gossip\"]\n\
             api_key = \"k\"\n",
            &[
                ("BOTRELAY__MESSENGER__APP_SECRET", "s"),
                ("BOTRELAY__MESSENGER__VERIFY_TOKEN", "v"),
            ],
        );
        let keys: Vec<&str> = found.iter().filter_map(|p| p.split(':').next()).collect();
        for expected in [
            "server.listen",
            "server.shutdown_grace",
            "log.format",
            "bot.url",
            "bot.max_backoff",
            "bot.kinds",
            "bot.api_key",
        ] {
            assert!(
                keys.contains(&expected),
                "{expected} missing from {found:?}"
            );
        }
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_name() {
        let found = problems(&format!("{MINIMAL}[server]\nlisen = \"x\"\n"), &[]);
        assert_eq!(
            found,
            [
                "server.lisen: unknown key; expected one of `listen`, `max_body_bytes`, `shutdown_grace`, `read_timeout`"
            ]
        );
    }

    #[test]
    fn every_unknown_or_mistyped_key_is_reported_with_the_other_problems() {
        let found = problems(
            &format!(
                "logs = 1\n{MINIMAL}[server]\nlisen = \"x\"\nmax_body_bytes = \"lots\"\n\
                 [store]\nretension = \"3d\"\n[bot]\nurl = \"http://127.0.0.1:1/\"\n\
                 concurrency = \"many\"\nkinds = 5\nbackoff = \"soon\"\nretries = 3\n[sinks.nope]\nx = 1\n"
            ),
            &[
                ("BOTRELAY__ADMIN__LISTEN_ON", "127.0.0.1:1"),
                ("BOTRELAY__MESSENGER__ACCEPT_SHA1", "maybe"),
            ],
        );
        assert_eq!(
            found,
            [
                "admin.listen_on: unknown key; expected `listen` or `token` (from BOTRELAY__ADMIN__LISTEN_ON)",
                "bot.concurrency: expected a whole number, found string \"many\"",
                "bot.kinds: expected a list of strings, or one comma-separated string",
                "bot.retries: unknown key; [bot] takes `concurrency`, `timeout`, `max_attempts`, `backoff`, `max_backoff`, `ttl`, `kinds`, `url`",
                "logs: unknown key; expected one of `server`, `admin`, `log`, `messenger`, `ingest`, `graph`, `dashbot`, `store`, `bot`, `sinks`",
                "messenger.accept_sha1: expected a boolean, found string \"maybe\" (from BOTRELAY__MESSENGER__ACCEPT_SHA1)",
                "server.lisen: unknown key; expected one of `listen`, `max_body_bytes`, `shutdown_grace`, `read_timeout`",
                "server.max_body_bytes: expected a whole number, found string \"lots\"",
                "sinks.nope: unknown key; expected one of `kochava`, `dashbot`, `page_activities`, `conversions`",
                "store.retension: unknown key; expected one of `path`, `url`, `pool_size`, `lease`, `dedupe_window`, `retention`, `dead_letter_retention`, `max_bytes`",
                "bot.backoff: `soon` is not a duration like \"250ms\", \"30s\", \"15m\", \"3d\" (expected number at 0)",
            ]
        );
    }

    /// A bad key whose own name has a dot is reported, taken out, and the rest still checked.
    #[test]
    fn a_bad_key_with_a_dot_in_its_name_hides_no_other_problem() {
        for (bad, key) in [
            (
                "[server]\n\"shutdown.grace\" = \"5s\"\n",
                "server.shutdown.grace: unknown key",
            ),
            (
                "[sinks.page_activities]\napp_id = \"1\"\npage_tokens = { \"1.2\" = [1] }\n",
                "sinks.page_activities.page_tokens.1.2: expected a string",
            ),
        ] {
            let found = problems(&format!("[messenger]\napp_secret = \"s\"\n{bad}"), &[]);
            assert!(
                found.iter().any(|problem| problem.starts_with(key)),
                "{found:?}"
            );
            assert!(
                found
                    .iter()
                    .any(|problem| problem.starts_with("messenger.verify_token: is required")),
                "{found:?}"
            );
        }
    }

    /// The `config` crate would round `1.5` workers to 2: a count must be a whole number.
    #[test]
    fn counts_are_whole_numbers_not_rounded() {
        let found = problems(
            &format!(
                "{MINIMAL}[bot]\nurl = \"http://127.0.0.1:1/\"\nconcurrency = 1.5\nmax_attempts = -2\n"
            ),
            &[("BOTRELAY__STORE__MAX_BYTES", "1e9")],
        );
        assert_eq!(
            found,
            [
                "bot.concurrency: expected a whole number, found floating point `1.5`",
                "bot.max_attempts: expected a whole number, found integer `-2`",
                "store.max_bytes: expected a whole number, found string \"1e9\" (from BOTRELAY__STORE__MAX_BYTES)",
            ]
        );
    }

    /// A token in the wrong shape is reported by key, without the token.
    #[test]
    fn a_mistyped_secret_is_reported_without_its_value() {
        let found = problems(
            &format!(
                "{MINIMAL}[sinks.page_activities]\napp_id = \"1\"\n[sinks.conversions]\naccess_token = [\"EAAlisted\"]\n"
            ),
            &[(
                "BOTRELAY__SINKS__PAGE_ACTIVITIES__PAGE_TOKENS",
                "EAAenvPageToken",
            )],
        );
        assert_eq!(
            found,
            [
                "sinks.conversions.access_token: expected a string; the value is not shown, it is a secret",
                "sinks.page_activities.page_tokens: expected a map; the value is not shown, it is a secret (from BOTRELAY__SINKS__PAGE_ACTIVITIES__PAGE_TOKENS)",
            ]
        );
    }

    /// A table that holds a secret, given a plain value instead (`messenger = "…"`), is
    /// reported without the value: it is most likely the secret itself.
    #[test]
    fn a_secret_given_in_place_of_its_table_is_not_quoted() {
        for (text, environment, key) in [
            ("messenger = \"topsecretVALUE\"\n", vec![], "messenger"),
            (
                MINIMAL,
                vec![("BOTRELAY__ADMIN", "topsecretVALUE")],
                "admin",
            ),
            (
                &format!("{MINIMAL}[sinks]\ndashbot = \"topsecretVALUE\"\n") as &str,
                vec![],
                "sinks.dashbot",
            ),
            (
                &format!("{MINIMAL}[sinks]\npage_activities = \"topsecretVALUE\"\n"),
                vec![],
                "sinks.page_activities",
            ),
        ] {
            let found = problems(text, &environment);
            assert!(
                found
                    .iter()
                    .any(|problem| problem.starts_with(&format!("{key}: expected a table;"))),
                "{key}: {found:?}"
            );
            assert!(
                found
                    .iter()
                    .all(|problem| !problem.contains("topsecretVALUE")),
                "{found:?}"
            );
        }
        // Other keys still show what they found.
        let found = problems(&format!("server = \"0.0.0.0:80\"\n{MINIMAL}"), &[]);
        assert_eq!(
            found,
            ["server: expected a table, found string \"0.0.0.0:80\""]
        );
    }

    /// A sink URL's password is never quoted by a problem, and is redacted wherever it might
    /// be logged.
    #[test]
    fn a_password_in_a_url_is_not_quoted_and_is_redacted() -> Result<(), ConfigError> {
        for url in [
            "ftp://relay:hunter2pass@bot.example/webhook",
            "https://relay:hunter2pass@bot example/webhook",
        ] {
            let found = problems(&format!("{MINIMAL}[bot]\nurl = \"{url}\"\n"), &[]);
            assert_eq!(found.len(), 1, "{found:?}");
            assert!(
                found[0].starts_with("bot.url: `") && found[0].contains("://[redacted]@bot"),
                "{found:?}"
            );
            assert!(!found[0].contains("hunter2pass"), "{found:?}");
        }
        let found = problems(
            &format!("bot = \"https://relay:hunter2pass@bot.example\"\n{MINIMAL}"),
            &[],
        );
        assert!(
            found.len() == 1 && !found[0].contains("hunter2pass"),
            "{found:?}"
        );
        let config = Config::from_sources(
            &format!("{MINIMAL}[bot]\nurl = \"https://relay:hunter2pass@bot.example/webhook\"\n"),
            HashMap::new(),
        )?;
        assert!(
            config
                .secrets()
                .iter()
                .any(|secret| secret == "hunter2pass")
        );
        Ok(())
    }

    /// `store.url` selects PostgreSQL; `pool_size` and `lease` have their defaults and bounds;
    /// a bad URL is named without its password, and the password is a secret.
    #[test]
    fn store_url_selects_postgres_and_is_validated() -> Result<(), ConfigError> {
        let config = Config::from_sources(MINIMAL, HashMap::new())?;
        assert!(config.store.url.is_none());
        assert_eq!(config.store.pool_size, 16);
        assert_eq!(config.store.lease, Duration::from_secs(30));
        let config = Config::from_sources(
            &format!(
                "{MINIMAL}[store]\nurl = \"postgres://relay:pg-hunter2@db.example:5433/botrelay?sslmode=require\"\n\
                 pool_size = 4\nlease = \"5s\"\n"
            ),
            HashMap::new(),
        )?;
        assert!(config.store.url.is_some());
        assert_eq!(config.store.pool_size, 4);
        assert_eq!(config.store.lease, Duration::from_secs(5));
        assert!(config.secrets().iter().any(|secret| secret == "pg-hunter2"));
        // From the environment too, over a file that names a path.
        let config = Config::from_sources(
            &format!("{MINIMAL}[store]\npath = \"data/x.db\"\n"),
            env(&[("BOTRELAY__STORE__URL", "postgresql://db.example/botrelay")]),
        )?;
        assert!(config.store.url.is_some());
        for (store, expected) in [
            (
                "url = \"mysql://relay:pg-hunter2@db.example/x\"",
                "store.url: `mysql://[redacted]@db.example/x` is not a postgres://user@host:port/database URL",
            ),
            (
                "url = \"postgres://relay:pg-hunter2@db.example/x?sslmode=bogus\"",
                "store.url: `postgres://[redacted]@db.example/x?sslmode=bogus` has an option this relay does not know (sslmode may be disable, prefer or require)",
            ),
            ("pool_size = 0", "store.pool_size: must be at least 1"),
            ("lease = \"0s\"", "store.lease: must be longer than 0"),
        ] {
            let found = problems(&format!("{MINIMAL}[store]\n{store}\n"), &[]);
            assert_eq!(found, [expected]);
        }
        Ok(())
    }

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

    /// A bad value from the environment (which wins over the file) is reported with the
    /// variable it came from; one from the file without.
    #[test]
    fn a_bad_value_from_the_environment_names_its_variable() {
        let from_env = problems(MINIMAL, &[("BOTRELAY__SERVER__LISTEN", "8080")]);
        assert_eq!(from_env.len(), 1, "{from_env:?}");
        assert!(
            from_env[0].starts_with("server.listen: ")
                && from_env[0].ends_with(" (from BOTRELAY__SERVER__LISTEN)"),
            "{from_env:?}"
        );
        let from_file = problems(&format!("{MINIMAL}[server]\nlisten = \"8080\"\n"), &[]);
        assert_eq!(from_file.len(), 1, "{from_file:?}");
        assert!(!from_file[0].contains("(from "), "{from_file:?}");
    }

    /// A TOML syntax error is reported by line and column: the parser's own report quotes the
    /// line, and with it a secret whose quote was never closed.
    #[test]
    fn a_syntax_error_names_its_place_without_quoting_the_line() {
        for (text, line, column) in [
            ("[messenger]\napp_secret = \"topsecretFILE\n", 2, 28),
            ("[messenger]\napp_secret = topsecretFILE\n", 2, 14),
            (
                "[messenger]\napp_secret = \"topsecretFILE\"\napp_secret = \"topsecretFILE\"\n",
                3,
                1,
            ),
            ("[messenger\napp_secret = \"topsecretFILE\"\n", 1, 11),
        ] {
            let error = Config::from_sources(text, HashMap::new())
                .err()
                .map(|error| error.to_string())
                .unwrap_or_default();
            assert!(
                error.starts_with(&format!(
                    "cannot read config: TOML syntax error at line {line}, column {column}: "
                )),
                "{text:?}: {error}"
            );
            assert!(!error.contains("topsecret"), "{text:?}: {error}");
        }
    }

    #[test]
    fn environment_numbers_and_booleans_still_convert() -> Result<(), ConfigError> {
        let config = Config::from_sources(
            MINIMAL,
            env(&[
                ("BOTRELAY__SERVER__MAX_BODY_BYTES", "2048"),
                ("BOTRELAY__MESSENGER__ACCEPT_SHA1", "true"),
            ]),
        )?;
        assert_eq!(config.server.max_body_bytes, 2048);
        assert!(config.messenger.accept_sha1);
        Ok(())
    }

    #[test]
    fn sinks_without_credentials_are_disabled_with_a_reason() -> Result<(), ConfigError> {
        let config = Config::from_sources(
            &format!(
                "{MINIMAL}[sinks.kochava]\ninclude_text = true\n[sinks.dashbot]\napi_key = \"\"\n"
            ),
            HashMap::new(),
        )?;
        assert!(config.sinks.is_empty());
        let disabled: Vec<SinkName> = config
            .disabled_sinks
            .iter()
            .map(|(name, _)| *name)
            .collect();
        assert_eq!(disabled, vec![SinkName::Kochava, SinkName::Dashbot]);
        Ok(())
    }

    #[test]
    fn secrets_are_listed_for_redaction_and_hidden_from_debug() -> Result<(), ConfigError> {
        let config = Config::from_sources(
            &format!(
                "{MINIMAL}[sinks.dashbot]\napi_key = \"dash-key\"\n\
                 [sinks.page_activities]\napp_id = \"1\"\npage_tokens = {{ \"42\" = \"page-tok\" }}\n"
            ),
            HashMap::new(),
        )?;
        let secrets = config.secrets();
        for expected in ["s", "v", "dash-key", "page-tok"] {
            assert!(
                secrets.iter().any(|secret| secret == expected),
                "{expected}"
            );
        }
        let debug = format!("{config:?}");
        assert!(!debug.contains("dash-key") && !debug.contains("page-tok"));
        Ok(())
    }

    #[test]
    fn the_example_config_is_valid() -> Result<(), ConfigError> {
        let text = include_str!("../config/botrelay.example.toml");
        let config = Config::from_sources(
            text,
            env(&[
                ("BOTRELAY__MESSENGER__APP_SECRET", "s"),
                ("BOTRELAY__MESSENGER__VERIFY_TOKEN", "v"),
            ]),
        )?;
        assert_eq!(config.server.listen.to_string(), "0.0.0.0:8080");
        Ok(())
    }
}
