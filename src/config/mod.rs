//! Configuration: TOML plus `BOTRELAY__SECTION__KEY` environment overrides, read by the `config`
//! crate into raw serde structs, then validated into the typed [`Config`] the rest of the crate
//! uses (addresses, URLs, durations, secrets, enabled sinks).
//!
//! Validation collects every problem and names its key (`server.listen: ...`), so that
//! `botrelay check-config` can print them all at once. Secrets are [`SecretString`]s: their
//! `Debug` prints nothing of them. Here: the core sections and [`Config::from_sources`]; the
//! toolkit is `check.rs`, the error reports `report.rs`, and the sink tables, which each sink's
//! module reads and validates itself, compose in `sinks.rs`.

mod report;
mod sinks;

pub use report::{ConfigError, check_syntax};

use crate::check::{Checker, Count, SinkTable, secret};
use crate::sink_name::SinkName;
use crate::sinks::{Context, Route};
use report::{deserialize_every_key, lookup, origin_note};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use url::Url;

/// The default config path, relative to the working directory.
pub const DEFAULT_PATH: &str = "config/botrelay.toml";

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
    bot: Option<SinkTable<crate::sinks::bot::Table>>,
    #[serde(default)]
    sinks: sinks::RawSinks,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<String>,
    max_body_bytes: Option<Count>,
    shutdown_grace: Option<String>,
    read_timeout: Option<String>,
    max_connections: Option<Count>,
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
    /// The enabled sinks, the bot first, each with its validated settings.
    pub sinks: Vec<Route>,
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
    /// Connections served at once on each listener; more wait in the kernel's accept queue.
    pub max_connections: usize,
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
    /// Pooled PostgreSQL connections (claims, reads, admin); the enqueue batcher, the settle
    /// batcher and LISTEN hold one more each.
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
        // Each sink table is read with its own keys only: the others come out first.
        let mut own_keys = tree.clone();
        let stray = sinks::take_stray_keys(&mut own_keys);
        let (raw, mut problems) = deserialize_every_key(own_keys, stray.unknown)?;
        match validate(raw, &stray.foreign) {
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

    pub fn sink(&self, name: SinkName) -> Option<&Route> {
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
            secrets.extend(sink.secrets());
        }
        secrets.retain(|secret| !secret.is_empty());
        secrets
    }
}

fn validate(raw: RawConfig, foreign: &BTreeSet<String>) -> Result<Config, ConfigError> {
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
        max_connections: match raw.server.max_connections {
            None => 1024,
            Some(Count(0)) => {
                check.problem("server.max_connections", "must be at least 1");
                1024
            }
            Some(Count(count)) => usize::try_from(count).unwrap_or(usize::MAX),
        },
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

    let context = Context {
        app_secret: &messenger.app_secret,
        app_id: messenger.app_id.as_deref(),
        graph_base_url: graph_base_url.as_ref(),
    };
    let sinks = sinks::validate(&mut check, raw.bot, raw.sinks, foreign, &context);

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
        sinks: sinks.enabled,
        disabled_sinks: sinks.disabled,
    })
}

/// Whether `text` is a PostgreSQL URL the store can use; a problem names what is wrong
/// without quoting the URL's `user:password@`.
fn postgres_url(check: &mut Checker, text: &str) -> bool {
    let shown = crate::check::without_userinfo(text);
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

#[cfg(test)]
mod testing {
    //! What the config's tests share: an environment, the smallest valid file, and the
    //! problems a config has, as text.

    use super::{Config, ConfigError};
    use std::collections::HashMap;

    pub fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
            .collect()
    }

    pub const MINIMAL: &str = "[messenger]\napp_secret = \"s\"\nverify_token = \"v\"\n";

    pub fn problems(text: &str, environment: &[(&str, &str)]) -> Vec<String> {
        match Config::from_sources(text, env(environment)) {
            Ok(_) => Vec::new(),
            Err(ConfigError::Invalid(problems)) => {
                problems.iter().map(ToString::to_string).collect()
            }
            Err(other) => vec![other.to_string()],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;
    use crate::event::EventKind;

    #[test]
    fn defaults_follow_the_spec() -> Result<(), ConfigError> {
        let config = Config::from_sources(MINIMAL, HashMap::new())?;
        assert_eq!(config.server.listen.to_string(), "0.0.0.0:8080");
        assert_eq!(config.server.max_body_bytes, 1024 * 1024);
        assert_eq!(config.server.shutdown_grace, Duration::from_secs(10));
        assert_eq!(config.server.read_timeout, Duration::from_secs(30));
        assert_eq!(config.server.max_connections, 1024);
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
        let text = include_str!("../../config/botrelay.example.toml");
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
        let found = problems(&format!("{MINIMAL}[server]\nmax_connections = 0\n"), &[]);
        assert_eq!(found, ["server.max_connections: must be at least 1"]);
        Ok(())
    }
}
