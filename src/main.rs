//! The `botrelay` binary: parses the command line, loads the config, and runs the relay, a
//! one-shot command (`check-config`, `sign`), or a client of a running relay's admin API
//! (`dead-letters`, `pause`, `unpause`, `paused`, `sinks`).
//! Exit codes: 0 success, 1 runtime failure, 2 invalid config or usage.

use botrelay::admin::{
    DeadLetterView, ErrorBody, MAX_LIMIT, PauseState, PausedUser, ReplayRequest, Replayed, Since,
    SinkView,
};
use botrelay::config::{Config, ConfigError, DEFAULT_PATH};
use botrelay::sink_name::SinkName;
use clap::{Args, Parser, Subcommand};
use secrecy::{ExposeSecret, SecretString};
use serde::de::DeserializeOwned;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

/// mimalloc rather than the system allocator: the relay allocates and frees small buffers on
/// one thread and frees them on another (request bodies, store jobs), which glibc's malloc
/// handles with arena locks; `benches/` measured the difference.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "botrelay",
    version,
    about = "A durable webhook relay for Messenger bots"
)]
struct Cli {
    /// Config file (TOML). Every key can be overridden by BOTRELAY__SECTION__KEY.
    #[arg(long, global = true, env = "BOTRELAY_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the relay (the default).
    Serve,
    /// Load and validate the config; print every problem and exit 2, or the active sinks and exit 0.
    CheckConfig,
    /// List or replay the dead letters of a running relay (through its admin API).
    #[command(subcommand)]
    DeadLetters(DeadLetters),
    /// Stop forwarding a user's events to the bot (analytics sinks still receive them).
    Pause {
        /// The user's page-scoped id (PSID).
        psid: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Forward a paused user's events to the bot again.
    Unpause {
        /// The user's page-scoped id (PSID).
        psid: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// List the paused users.
    Paused {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Show each sink: enabled, queue depth, in flight, dead letters, last success, last error.
    Sinks {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Exit 0 when the relay on this machine is ready (GET /readyz on server.listen), else 1:
    /// for a container HEALTHCHECK, which has no curl.
    Healthcheck {
        /// The relay's public base URL [default: http://<server.listen> from the config].
        #[arg(long)]
        url: Option<String>,
    },
    /// Print a curl command that POSTs a webhook body file with a valid X-Hub-Signature-256.
    Sign {
        /// The webhook body (JSON), sent byte for byte.
        file: PathBuf,
        /// The environment variable that holds the app secret.
        #[arg(long, default_value = "BOTRELAY__MESSENGER__APP_SECRET")]
        secret_env: String,
        /// Where to POST [default: http://<server.listen>/webhook from the config].
        #[arg(long)]
        url: Option<String>,
        /// Print only the `X-Hub-Signature-256: sha256=…` header.
        #[arg(long)]
        header_only: bool,
    },
}

#[derive(Subcommand)]
enum DeadLetters {
    /// List dead letters, oldest first.
    List {
        #[command(flatten)]
        filter: FilterArgs,
        /// At most this many (1 to 10000).
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Requeue dead letters: each rejoins its user's lane and is delivered again.
    Replay {
        #[command(flatten)]
        filter: FilterArgs,
        /// Only this delivery id (repeatable).
        #[arg(long = "id", value_name = "ID")]
        ids: Vec<i64>,
        /// Replay every dead letter (required when no filter is given).
        #[arg(long)]
        all: bool,
        /// Dead letters per replay request.
        #[arg(long, default_value_t = 500, hide = true)]
        chunk: usize,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(Args)]
struct FilterArgs {
    /// Only this sink (bot, kochava, kochava_smartlink, dashbot, page_activities, conversions).
    #[arg(long)]
    sink: Option<String>,
    /// Only this user (PSID).
    #[arg(long)]
    user: Option<String>,
    /// Only letters dead since: a duration ago ("1h", "3d"), an RFC 3339 time, or epoch ms.
    #[arg(long)]
    since: Option<String>,
}

#[derive(Args)]
struct AdminArgs {
    /// The admin listener's base URL [default: http://<admin.listen> from the config].
    #[arg(long, env = "BOTRELAY_ADMIN_URL")]
    admin_url: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// Why a command failed; the variant decides the exit code.
#[derive(Debug, thiserror::Error)]
enum CliError {
    /// Bad arguments, config, token or request (exit 2).
    #[error("{0}")]
    Usage(String),
    /// The relay is unreachable or failed (exit 1).
    #[error("{0}")]
    Runtime(String),
}

impl CliError {
    fn exit_code(&self) -> ExitCode {
        match self {
            CliError::Usage(_) => ExitCode::from(2),
            CliError::Runtime(_) => ExitCode::FAILURE,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let explicit = cli.config.is_some();
    let path = cli.config.unwrap_or_else(|| PathBuf::from(DEFAULT_PATH));
    let result = match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => return load_config(&path, explicit).map_or_else(|code| code, serve),
        Command::CheckConfig => {
            return load_config(&path, explicit)
                .map_or_else(|code| code, |config| check_config(&config, &path));
        }
        Command::Sign {
            file,
            secret_env,
            url,
            header_only,
        } => sign(&path, explicit, &file, &secret_env, url, header_only),
        Command::DeadLetters(command) => {
            client_command(&path, explicit, ClientCommand::DeadLetters(command))
        }
        Command::Pause { psid, admin } => {
            client_command(&path, explicit, ClientCommand::Pause(psid, true, admin))
        }
        Command::Unpause { psid, admin } => {
            client_command(&path, explicit, ClientCommand::Pause(psid, false, admin))
        }
        Command::Paused { admin } => client_command(&path, explicit, ClientCommand::Paused(admin)),
        Command::Sinks { admin } => client_command(&path, explicit, ClientCommand::Sinks(admin)),
        // Docker's HEALTHCHECK reserves exit code 2: every failure is 1 ("unhealthy").
        Command::Healthcheck { url } => {
            return match healthcheck(&path, explicit, url) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("botrelay: {error}");
                    ExitCode::FAILURE
                }
            };
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("botrelay: {error}");
            error.exit_code()
        }
    }
}

/// The full, validated config (for `serve` and `check-config`), or exit 2.
fn load_config(path: &Path, explicit: bool) -> Result<Config, ExitCode> {
    Config::load(path, explicit).map_err(|error| {
        eprintln!("botrelay: {error}");
        if matches!(error, ConfigError::Invalid(_) | ConfigError::Syntax { .. }) {
            eprintln!(
                "(config file: {}; see config/botrelay.example.toml)",
                path.display()
            );
        }
        ExitCode::from(2)
    })
}

fn check_config(config: &Config, path: &std::path::Path) -> ExitCode {
    if path.exists() {
        println!("config OK ({})", path.display());
    } else {
        println!(
            "config OK (no file at {}; environment only)",
            path.display()
        );
    }
    // The kinds and the reasons line up in one column, after the longest sink name.
    let width = SinkName::ALL
        .iter()
        .map(|name| name.as_str().len())
        .max()
        .unwrap_or(0)
        + 1;
    let active_width = width + "disabled".len() - "active".len();
    for sink in &config.sinks {
        let kinds: Vec<&str> = sink.kinds.iter().map(|kind| kind.as_str()).collect();
        println!(
            "  active sink {:<active_width$}kinds: {}",
            sink.name.as_str(),
            kinds.join(", ")
        );
    }
    for (name, reason) in &config.disabled_sinks {
        println!("  disabled sink {:<width$}{reason}", name.as_str());
    }
    if config.sinks.is_empty() {
        println!("  no sink is active: events will be stored and acknowledged, and go nowhere");
    }
    ExitCode::SUCCESS
}

fn serve(config: Config) -> ExitCode {
    let redactor = botrelay::redact::Redactor::new(config.secrets());
    botrelay::telemetry::init(&config.log, redactor);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("botrelay: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        let bind = |key: &'static str, address: std::net::SocketAddr| async move {
            tokio::net::TcpListener::bind(address)
                .await
                .map_err(|error| anyhow::anyhow!("cannot listen on {key} {address}: {error}"))
        };
        let public = bind("server.listen", config.server.listen).await?;
        let admin = bind("admin.listen", config.admin.listen).await?;
        botrelay::run(
            config,
            botrelay::Listeners { public, admin },
            shutdown_signal(),
        )
        .await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            eprintln!("botrelay: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let terminate = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut signal) => {
                    signal.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = interrupt => {}
            () = terminate => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}

// ---------------------------------------------------------------------------------------------
// The admin client: `dead-letters`, `pause`, `unpause`, `paused`, `sinks`.

enum ClientCommand {
    DeadLetters(DeadLetters),
    Pause(String, bool, AdminArgs),
    Paused(AdminArgs),
    Sinks(AdminArgs),
}

/// The few config keys the client commands read. They need neither the app secret nor a valid
/// sink table, so an operator's shell without the relay's secrets can still use them.
struct ClientConfig {
    admin_listen: Option<String>,
    admin_token: Option<SecretString>,
    server_listen: Option<String>,
}

impl ClientConfig {
    /// The file (when it exists, or always when `explicit`) plus `BOTRELAY__…` overrides.
    fn load(path: &Path, explicit: bool) -> Result<ClientConfig, CliError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(error) if explicit || error.kind() != std::io::ErrorKind::NotFound => {
                return Err(CliError::Usage(format!(
                    "cannot read config {}: {error}",
                    path.display()
                )));
            }
            Err(_) => String::new(),
        };
        botrelay::config::check_syntax(&text).map_err(|error| {
            CliError::Usage(format!("{error} (config file: {})", path.display()))
        })?;
        let settings = config::Config::builder()
            .add_source(config::File::from_str(&text, config::FileFormat::Toml))
            .add_source(
                config::Environment::with_prefix("BOTRELAY")
                    .prefix_separator("__")
                    .separator("__"),
            )
            .build()
            .map_err(|error| {
                CliError::Usage(format!("cannot read config {}: {error}", path.display()))
            })?;
        let text_at = |key: &str| {
            settings
                .get_string(key)
                .ok()
                .filter(|value| !value.is_empty())
        };
        Ok(ClientConfig {
            admin_listen: text_at("admin.listen"),
            admin_token: text_at("admin.token").map(SecretString::from),
            server_listen: text_at("server.listen"),
        })
    }
}

/// The relay's public listener (`server.listen`) as a URL to connect to.
fn public_url(config_path: &Path, explicit: bool) -> Result<String, CliError> {
    let config = ClientConfig::load(config_path, explicit)?;
    connect_url(
        config.server_listen.as_deref().unwrap_or("0.0.0.0:8080"),
        "0.0.0.0:8080",
    )
}

/// The runtime of a client command: one thread is plenty.
fn cli_runtime() -> Result<tokio::runtime::Runtime, CliError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|error| CliError::Runtime(format!("cannot start the runtime: {error}")))
}

/// A listen address as a URL to connect to: `0.0.0.0` and `::` become the loopback address.
fn connect_url(listen: &str, default: &str) -> Result<String, CliError> {
    let mut address: SocketAddr = listen
        .parse()
        .map_err(|_| CliError::Usage(format!("`{listen}` is not an address like \"{default}\"")))?;
    if address.ip().is_unspecified() {
        address.set_ip(match address.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        });
    }
    Ok(format!("http://{address}"))
}

fn client_command(path: &Path, explicit: bool, command: ClientCommand) -> Result<(), CliError> {
    let config = ClientConfig::load(path, explicit)?;
    let runtime = cli_runtime()?;
    runtime.block_on(async move {
        match command {
            ClientCommand::DeadLetters(DeadLetters::List {
                filter,
                limit,
                admin,
            }) => {
                let client = AdminClient::new(&config, &admin)?;
                list_dead_letters(&client, &filter, limit, admin.json).await
            }
            ClientCommand::DeadLetters(DeadLetters::Replay {
                filter,
                ids,
                all,
                chunk,
                admin,
            }) => {
                let client = AdminClient::new(&config, &admin)?;
                replay(&client, &filter, ids, all, chunk, admin.json).await
            }
            ClientCommand::Pause(psid, paused, admin) => {
                let client = AdminClient::new(&config, &admin)?;
                let action = if paused { "pause" } else { "unpause" };
                let path = format!("/admin/users/{}/{action}", encode_path_segment(&psid));
                let state: PauseState = client.send(client.http.post(client.url(&path))).await?;
                if admin.json {
                    print_json(&state)
                } else {
                    let done = if state.paused { "paused" } else { "unpaused" };
                    println!("{done} {}", state.user);
                    Ok(())
                }
            }
            ClientCommand::Paused(admin) => {
                let client = AdminClient::new(&config, &admin)?;
                let users: Vec<PausedUser> = client
                    .send(client.http.get(client.url("/admin/paused")))
                    .await?;
                if admin.json {
                    return print_json(&users);
                }
                if users.is_empty() {
                    println!("no paused users");
                }
                let rows = users
                    .into_iter()
                    .map(|user| vec![user.user, user.paused_at])
                    .collect();
                print_table(&["USER", "PAUSED AT"], rows);
                Ok(())
            }
            ClientCommand::Sinks(admin) => {
                let client = AdminClient::new(&config, &admin)?;
                let sinks: Vec<SinkView> = client
                    .send(client.http.get(client.url("/admin/sinks")))
                    .await?;
                if admin.json {
                    return print_json(&sinks);
                }
                if sinks.is_empty() {
                    println!("no sinks: the relay's config enables none, and the store holds no deliveries");
                    return Ok(());
                }
                let dash = || "-".to_owned();
                let rows = sinks
                    .into_iter()
                    .map(|sink| {
                        vec![
                            sink.sink,
                            if sink.enabled {
                                "yes".into()
                            } else {
                                format!("no ({})", sink.disabled_reason.unwrap_or_default())
                            },
                            sink.queued.to_string(),
                            sink.in_flight.to_string(),
                            sink.dead.to_string(),
                            sink.last_success_at.unwrap_or_else(dash),
                            sink.last_error
                                .map(|error| {
                                    format!("{} {}", error.at, one_line(&error.message, 60))
                                })
                                .unwrap_or_else(dash),
                        ]
                    })
                    .collect();
                print_table(
                    &[
                        "SINK",
                        "ENABLED",
                        "QUEUED",
                        "IN FLIGHT",
                        "DEAD",
                        "LAST SUCCESS",
                        "LAST ERROR",
                    ],
                    rows,
                );
                Ok(())
            }
        }
    })
}

/// An HTTP client of the admin API, with the bearer token when one is configured.
struct AdminClient {
    http: reqwest::Client,
    base: String,
    token: Option<SecretString>,
}

impl AdminClient {
    fn new(config: &ClientConfig, args: &AdminArgs) -> Result<AdminClient, CliError> {
        let base = match &args.admin_url {
            Some(url) => url.trim_end_matches('/').to_owned(),
            None => connect_url(
                config.admin_listen.as_deref().unwrap_or("127.0.0.1:9091"),
                "127.0.0.1:9091",
            )?,
        };
        let mut http = reqwest::Client::builder().timeout(Duration::from_secs(60));
        // admin.listen is this machine's own listener: an HTTP_PROXY must not be asked for it
        // (with --admin-url the operator chose the way, proxy included).
        if args.admin_url.is_none() {
            http = http.no_proxy();
        }
        let http = http.build().map_err(|error| {
            CliError::Runtime(format!("cannot create the HTTP client: {error}"))
        })?;
        Ok(AdminClient {
            http,
            base,
            token: config.admin_token.clone(),
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Sends, and reads the JSON answer; maps every failure to a message and an exit code.
    async fn send<T: DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<T, CliError> {
        let request = match &self.token {
            Some(token) => request.bearer_auth(token.expose_secret()),
            None => request,
        };
        let response = request.send().await.map_err(|error| {
            CliError::Runtime(format!(
                "cannot reach the admin API at {}: {error} (is the relay running? see admin.listen or --admin-url)",
                self.base
            ))
        })?;
        let status = response.status();
        let body = response.bytes().await.map_err(|error| {
            CliError::Runtime(format!("cannot read the admin API's answer: {error}"))
        })?;
        if status.is_success() {
            return serde_json::from_slice(&body).map_err(|error| {
                CliError::Runtime(format!("unexpected answer from the admin API: {error}"))
            });
        }
        let message = serde_json::from_slice::<ErrorBody>(&body)
            .map(|body| body.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(&body).trim().to_owned());
        Err(match status.as_u16() {
            401 => CliError::Usage(format!(
                "the admin API refused the token ({message}): set admin.token in the config or BOTRELAY__ADMIN__TOKEN"
            )),
            400..=499 => CliError::Usage(format!("the admin API answered {status}: {message}")),
            _ => CliError::Runtime(format!("the admin API answered {status}: {message}")),
        })
    }

    async fn dead_letters(
        &self,
        filter: &FilterArgs,
        since: Option<i64>,
        after: Option<i64>,
        limit: u32,
    ) -> Result<Vec<DeadLetterView>, CliError> {
        let mut query: Vec<(&str, String)> = vec![("limit", limit.to_string())];
        query.extend(filter.sink.clone().map(|sink| ("sink", sink)));
        query.extend(filter.user.clone().map(|user| ("user", user)));
        query.extend(since.map(|since| ("since", since.to_string())));
        query.extend(after.map(|after| ("after", after.to_string())));
        self.send(self.http.get(self.url("/admin/dead-letters")).query(&query))
            .await
    }
}

/// `since` as absolute epoch ms, resolved once so that every request of a command agrees.
fn resolve_since(filter: &FilterArgs) -> Result<Option<i64>, CliError> {
    filter
        .since
        .as_deref()
        .map(|since| botrelay::admin::parse_since(since, botrelay::clock::now_ms()))
        .transpose()
        .map_err(|error| CliError::Usage(error.to_string()))
}

async fn list_dead_letters(
    client: &AdminClient,
    filter: &FilterArgs,
    limit: u32,
    json: bool,
) -> Result<(), CliError> {
    let since = resolve_since(filter)?;
    let letters = client.dead_letters(filter, since, None, limit).await?;
    if json {
        return print_json(&letters);
    }
    if letters.is_empty() {
        println!("no dead letters");
        return Ok(());
    }
    let count = letters.len();
    let dash = || "-".to_owned();
    let rows = letters
        .into_iter()
        .map(|letter| {
            vec![
                letter.id.to_string(),
                letter.sink,
                letter.kind,
                letter.user.unwrap_or_else(dash),
                letter.attempts.to_string(),
                letter
                    .last_status
                    .map(|status| status.to_string())
                    .unwrap_or_else(dash),
                letter.last_attempt_at.unwrap_or_else(dash),
                letter
                    .last_error
                    .map(|error| one_line(&error, 70))
                    .unwrap_or_else(dash),
            ]
        })
        .collect();
    print_table(
        &[
            "ID",
            "SINK",
            "KIND",
            "USER",
            "ATTEMPTS",
            "STATUS",
            "LAST ATTEMPT",
            "LAST ERROR",
        ],
        rows,
    );
    if count == limit as usize {
        println!("({count} shown; there may be more: raise --limit or narrow the filter)");
    }
    Ok(())
}

/// Replays in chunks of ids, printing `replayed N/TOTAL` as it goes when there is more than one
/// chunk. Without `--id`, lists the matching letters first (up to 10000 at a time), sink by
/// sink: only the enabled sinks' letters are listed for replay (a letter of a sink that is not
/// enabled stays dead, so listing it again would return the same page forever), and the
/// others are counted.
async fn replay(
    client: &AdminClient,
    filter: &FilterArgs,
    ids: Vec<i64>,
    all: bool,
    chunk: usize,
    json: bool,
) -> Result<(), CliError> {
    // `--user "$PSID"` with the variable unset must not turn into "every dead letter".
    for (flag, value) in [
        ("--sink", &filter.sink),
        ("--user", &filter.user),
        ("--since", &filter.since),
    ] {
        if value
            .as_deref()
            .is_some_and(|value| value.trim().is_empty())
        {
            return Err(CliError::Usage(format!(
                "{flag} is empty: name what to replay, or pass --all for every dead letter"
            )));
        }
    }
    let filtered =
        filter.sink.is_some() || filter.user.is_some() || filter.since.is_some() || !ids.is_empty();
    if !filtered && !all {
        return Err(CliError::Usage(
            "choose what to replay with --sink, --user, --since or --id, or pass --all for every dead letter".into(),
        ));
    }
    let since = resolve_since(filter)?;
    let mut run = ReplayRun {
        client,
        since,
        chunk: chunk.max(1),
        json,
        replayed: 0,
        total: 0,
        left_dead: BTreeMap::new(),
    };
    if !ids.is_empty() {
        run.replay_ids(filter, ids, false).await?;
    } else {
        let sinks: Vec<SinkView> = client
            .send(client.http.get(client.url("/admin/sinks")))
            .await?;
        let enabled = |name: &str| sinks.iter().any(|sink| sink.sink == name && sink.enabled);
        let names: Vec<String> = match &filter.sink {
            // Not enabled: the relay refuses the replay, and says why.
            Some(name) if !enabled(name) => {
                let request = ReplayRequest {
                    sink: Some(name.clone()),
                    user: filter.user.clone(),
                    since: since.map(Since::Millis),
                    ids: None,
                };
                let _: Replayed = client
                    .send(
                        client
                            .http
                            .post(client.url("/admin/dead-letters/replay"))
                            .json(&request),
                    )
                    .await?;
                Vec::new()
            }
            Some(name) => vec![name.clone()],
            None => sinks
                .iter()
                .filter(|sink| sink.enabled)
                .map(|sink| sink.sink.clone())
                .collect(),
        };
        for name in names {
            let one_sink = FilterArgs {
                sink: Some(name),
                user: filter.user.clone(),
                since: filter.since.clone(),
            };
            run.replay_listed(&one_sink).await?;
        }
        if filter.sink.is_none() {
            for sink in sinks.iter().filter(|sink| !sink.enabled && sink.dead > 0) {
                let one_sink = FilterArgs {
                    sink: Some(sink.sink.clone()),
                    user: filter.user.clone(),
                    since: filter.since.clone(),
                };
                let left = client
                    .dead_letters(&one_sink, since, None, MAX_LIMIT)
                    .await?
                    .len();
                if left > 0 {
                    run.left_dead.insert(sink.sink.clone(), left);
                }
            }
        }
    }
    run.finish()
}

/// One `dead-letters replay` command's requests and its running totals.
struct ReplayRun<'a> {
    client: &'a AdminClient,
    since: Option<i64>,
    chunk: usize,
    json: bool,
    replayed: usize,
    total: usize,
    left_dead: BTreeMap<String, usize>,
}

impl ReplayRun<'_> {
    /// Lists the letters that match `filter` a page at a time, oldest first, and replays each
    /// page. The next page starts after the last id of this one: a replayed letter that fails
    /// again is dead again with the same id, and must neither be replayed twice by one command
    /// nor hide the letters behind it.
    async fn replay_listed(&mut self, filter: &FilterArgs) -> Result<(), CliError> {
        let mut after = None;
        loop {
            let letters = self
                .client
                .dead_letters(filter, self.since, after, MAX_LIMIT)
                .await?;
            let Some(last) = letters.last() else {
                return Ok(());
            };
            after = Some(last.id);
            let full = letters.len() == MAX_LIMIT as usize;
            self.replay_ids(
                filter,
                letters.iter().map(|letter| letter.id).collect(),
                full,
            )
            .await?;
            if !full {
                return Ok(());
            }
        }
    }

    /// Replays `ids` (narrowed by `filter`) in chunks; `more` when further rounds may follow.
    async fn replay_ids(
        &mut self,
        filter: &FilterArgs,
        ids: Vec<i64>,
        more: bool,
    ) -> Result<(), CliError> {
        self.total += ids.len();
        let chunks = ids.chunks(self.chunk).count();
        for ids in ids.chunks(self.chunk) {
            let request = ReplayRequest {
                sink: filter.sink.clone(),
                user: filter.user.clone(),
                since: self.since.map(Since::Millis),
                ids: Some(ids.to_vec()),
            };
            let answer: Replayed = self
                .client
                .send(
                    self.client
                        .http
                        .post(self.client.url("/admin/dead-letters/replay"))
                        .json(&request),
                )
                .await?;
            self.replayed += answer.replayed;
            for (sink, count) in answer.left_dead {
                *self.left_dead.entry(sink).or_default() += count;
            }
            if !self.json && (chunks > 1 || more) {
                eprintln!("replayed {}/{}", self.replayed, self.total);
            }
        }
        Ok(())
    }

    fn finish(self) -> Result<(), CliError> {
        if self.json {
            return print_json(&Replayed {
                replayed: self.replayed,
                left_dead: self.left_dead,
            });
        }
        let plural = |count: usize| if count == 1 { "" } else { "s" };
        println!(
            "replayed {} dead letter{}",
            self.replayed,
            plural(self.replayed)
        );
        for (sink, count) in self.left_dead {
            let count_text = if count >= MAX_LIMIT as usize {
                format!("{count} or more")
            } else {
                count.to_string()
            };
            println!(
                "left {count_text} dead letter{} of sink {sink} dead: it is not enabled in the relay's config",
                plural(count)
            );
        }
        Ok(())
    }
}

/// Percent-encodes a PSID for a path segment (PSIDs are digits; `user_ref`s may be anything).
fn encode_path_segment(segment: &str) -> String {
    let mut encoded = String::with_capacity(segment.len());
    for byte in segment.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

fn print_json<T: serde::Serialize>(value: &T) -> Result<(), CliError> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|error| CliError::Runtime(error.to_string()))?;
    println!("{text}");
    Ok(())
}

/// Columns padded to their widest cell; the last column is not padded.
fn print_table(headers: &[&str], rows: Vec<Vec<String>>) {
    if rows.is_empty() {
        return;
    }
    let mut widths: Vec<usize> = headers
        .iter()
        .map(|header| header.chars().count())
        .collect();
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let last = cells.len().saturating_sub(1);
        let padded: Vec<String> = cells
            .into_iter()
            .enumerate()
            .map(|(index, cell)| {
                if index == last {
                    cell
                } else {
                    format!("{cell:<width$}", width = widths[index])
                }
            })
            .collect();
        padded.join("  ")
    };
    println!(
        "{}",
        line(headers.iter().map(|header| (*header).to_owned()).collect())
    );
    for row in rows {
        println!("{}", line(row));
    }
}

/// The first `max` characters of `text` on one line.
fn one_line(text: &str, max: usize) -> String {
    let flat: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if flat.chars().count() <= max {
        flat
    } else {
        let cut: String = flat.chars().take(max.saturating_sub(1)).collect();
        format!("{cut}…")
    }
}

// ---------------------------------------------------------------------------------------------
// `sign`: a signed test webhook for a new user.

/// `GET {url}/readyz` within a few seconds: prints `ready`, or why not (exit 1).
fn healthcheck(config_path: &Path, explicit: bool, url: Option<String>) -> Result<(), CliError> {
    let base = match url {
        Some(url) => url,
        None => public_url(config_path, explicit)?,
    };
    let url = format!("{}/readyz", base.trim_end_matches('/'));
    let runtime = cli_runtime()?;
    runtime.block_on(async move {
        // The relay is on this machine: an HTTP_PROXY (an egress proxy) must not be asked.
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .no_proxy()
            .build()
            .map_err(|error| CliError::Runtime(format!("cannot build the HTTP client: {error}")))?;
        let response = http.get(&url).send().await.map_err(|error| {
            CliError::Runtime(format!(
                "not ready: {error} (is the relay running? see server.listen or --url)"
            ))
        })?;
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        if status == reqwest::StatusCode::OK {
            println!("ready");
            Ok(())
        } else {
            Err(CliError::Runtime(format!(
                "not ready: {url} answered {status}: {}",
                body.trim()
            )))
        }
    })
}

fn sign(
    config_path: &Path,
    explicit: bool,
    file: &Path,
    secret_env: &str,
    url: Option<String>,
    header_only: bool,
) -> Result<(), CliError> {
    let secret = std::env::var(secret_env)
        .ok()
        .filter(|secret| !secret.is_empty())
        .ok_or_else(|| {
            CliError::Usage(format!(
                "set {secret_env} to the app secret (App Dashboard > Settings > Basic), or name another variable with --secret-env"
            ))
        })?;
    let body = std::fs::read(file)
        .map_err(|error| CliError::Usage(format!("cannot read {}: {error}", file.display())))?;
    let signature = botrelay::signing::sign_sha256(secret.as_bytes(), &body);
    if header_only {
        println!("X-Hub-Signature-256: {signature}");
        return Ok(());
    }
    let url = match url {
        Some(url) => url,
        None => format!("{}/webhook", public_url(config_path, explicit)?),
    };
    println!("curl -sS -X POST {} \\", shell_quote(&url));
    println!("  -H 'Content-Type: application/json' \\");
    println!("  -H 'X-Hub-Signature-256: {signature}' \\");
    println!(
        "  --data-binary @{}",
        shell_quote(&file.display().to_string())
    );
    Ok(())
}

/// Single-quotes `text` for a POSIX shell.
fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}
