//! The `botrelay` binary: parses the command line, loads the config, and runs the relay, a
//! one-shot command (`check-config`, `healthcheck`, `sign`), or a command against a running
//! relay's admin API (`dead-letters`, `pause`, `unpause`, `paused`, `sinks`), whose requests
//! are `botrelay::admin::client`'s and whose output is printed here.
//! Exit codes: 0 success, 1 runtime failure, 2 invalid config or usage.

use botrelay::admin::api::{MAX_LIMIT, parse_since};
use botrelay::admin::client::{self, AdminClient, ClientConfig, ClientError, Selection};
use botrelay::config::{Config, ConfigError, DEFAULT_PATH};
use botrelay::sink_name::SinkName;
use clap::{Args, Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

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
    /// Load and validate the config; print every problem and exit 2, or the active sinks (and
    /// any warning about them) and exit 0.
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

impl From<ClientError> for CliError {
    fn from(error: ClientError) -> CliError {
        match error {
            ClientError::Usage(message) => CliError::Usage(message),
            ClientError::Runtime(message) => CliError::Runtime(message),
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
    // Warnings leave the exit code alone: the config is valid.
    for sink in &config.sinks {
        for warning in sink.warnings() {
            println!("  warning: {}: {warning}", sink.name.as_str());
        }
    }
    if config.sinks.is_empty() {
        println!("  no sink is active: events will be stored and acknowledged, and go nowhere");
    }
    ExitCode::SUCCESS
}

fn serve(config: Config) -> ExitCode {
    let redactor = botrelay::redact::Redactor::new(config.secrets());
    let log = botrelay::telemetry::init(&config.log, redactor);
    let code = serve_logged(config);
    // What is still queued goes out, unless stdout stays stalled.
    log.flush(std::time::Duration::from_secs(2));
    code
}

fn serve_logged(config: Config) -> ExitCode {
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
        let bind = |key: &'static str, address: std::net::SocketAddr| {
            listen(address)
                .map_err(|error| anyhow::anyhow!("cannot listen on {key} {address}: {error}"))
        };
        let public = bind("server.listen", config.server.listen)?;
        let admin = bind("admin.listen", config.admin.listen)?;
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

/// The kernel's accept queue of each listener: the clients beyond `server.max_connections`
/// wait here (the kernel caps it at `net.core.somaxconn`). The standard library's 128 would
/// turn a burst away sooner.
const LISTEN_BACKLOG: u32 = 4096;

/// Binds a listener as `TcpListener::bind` does (`SO_REUSEADDR`), with [`LISTEN_BACKLOG`].
fn listen(address: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if address.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    #[cfg(unix)]
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    socket.listen(LISTEN_BACKLOG)
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
// The admin commands: `dead-letters`, `pause`, `unpause`, `paused`, `sinks` (the requests are
// `botrelay::admin::client`'s; what they print is here).

enum ClientCommand {
    DeadLetters(DeadLetters),
    Pause(String, bool, AdminArgs),
    Paused(AdminArgs),
    Sinks(AdminArgs),
}

fn client_command(path: &Path, explicit: bool, command: ClientCommand) -> Result<(), CliError> {
    let config = ClientConfig::load(path, explicit)?;
    let runtime = client::runtime()?;
    runtime.block_on(async move {
        match command {
            ClientCommand::DeadLetters(DeadLetters::List {
                filter,
                limit,
                admin,
            }) => {
                let client = AdminClient::new(&config, admin.admin_url.as_deref())?;
                list_dead_letters(&client, &filter, limit, admin.json).await
            }
            ClientCommand::DeadLetters(DeadLetters::Replay {
                filter,
                ids,
                all,
                chunk,
                admin,
            }) => {
                let client = AdminClient::new(&config, admin.admin_url.as_deref())?;
                replay(&client, &filter, ids, all, chunk, admin.json).await
            }
            ClientCommand::Pause(psid, paused, admin) => {
                let client = AdminClient::new(&config, admin.admin_url.as_deref())?;
                let state = client.set_paused(&psid, paused).await?;
                if admin.json {
                    print_json(&state)
                } else {
                    let done = if state.paused { "paused" } else { "unpaused" };
                    println!("{done} {}", state.user);
                    Ok(())
                }
            }
            ClientCommand::Paused(admin) => {
                let client = AdminClient::new(&config, admin.admin_url.as_deref())?;
                let users = client.paused().await?;
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
                let client = AdminClient::new(&config, admin.admin_url.as_deref())?;
                let sinks = client.sinks().await?;
                if admin.json {
                    return print_json(&sinks);
                }
                if sinks.is_empty() {
                    println!("no sinks: the relay's config enables none, and the store holds no deliveries");
                    return Ok(());
                }
                let dash = || "-".to_owned();
                let warnings: Vec<String> = sinks
                    .iter()
                    .flat_map(|sink| {
                        // A disabled sink's first warning is its reason, shown in its row.
                        let shown = usize::from(!sink.enabled);
                        sink.warnings
                            .iter()
                            .skip(shown)
                            .map(|warning| format!("{}: {warning}", sink.sink))
                    })
                    .collect();
                let rows = sinks
                    .into_iter()
                    .map(|sink| {
                        vec![
                            sink.sink,
                            if sink.enabled {
                                "yes".into()
                            } else {
                                format!(
                                    "no ({})",
                                    sink.warnings.first().map_or("", String::as_str)
                                )
                            },
                            match sink.outage_since {
                                Some(since) => format!("{} since {since}", sink.state),
                                None => sink.state,
                            },
                            sink.queue_depth.to_string(),
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
                        "STATE",
                        "QUEUE DEPTH",
                        "IN FLIGHT",
                        "DEAD",
                        "LAST SUCCESS",
                        "LAST ERROR",
                    ],
                    rows,
                );
                for warning in warnings {
                    println!("warning: {warning}");
                }
                Ok(())
            }
        }
    })
}

/// The dead letters the filter flags name, with `--since` resolved once to absolute epoch ms,
/// so that every request of a command agrees.
fn selection(filter: &FilterArgs) -> Result<Selection, CliError> {
    let since = filter
        .since
        .as_deref()
        .map(|since| parse_since(since, botrelay::clock::now_ms()))
        .transpose()
        .map_err(|error| CliError::Usage(error.to_string()))?;
    Ok(Selection {
        sink: filter.sink.clone(),
        user: filter.user.clone(),
        since,
    })
}

async fn list_dead_letters(
    client: &AdminClient,
    filter: &FilterArgs,
    limit: u32,
    json: bool,
) -> Result<(), CliError> {
    let selection = selection(filter)?;
    let letters = client.dead_letters(&selection, None, limit).await?;
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
/// chunk (see `AdminClient::replay_dead_letters`), then the totals.
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
    let selection = selection(filter)?;
    let mut progress = |replayed: usize, total: usize| {
        if !json {
            eprintln!("replayed {replayed}/{total}");
        }
    };
    let totals = client
        .replay_dead_letters(&selection, ids, chunk, &mut progress)
        .await?;
    if json {
        return print_json(&totals);
    }
    let plural = |count: usize| if count == 1 { "" } else { "s" };
    println!(
        "replayed {} dead letter{}",
        totals.replayed,
        plural(totals.replayed)
    );
    for (sink, count) in totals.left_dead {
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
// `healthcheck` and `sign`: one-shot commands against the relay's public listener.

/// `GET {url}/readyz` within a few seconds: prints `ready`, or why not (exit 1).
fn healthcheck(config_path: &Path, explicit: bool, url: Option<String>) -> Result<(), CliError> {
    let base = match url {
        Some(url) => url,
        None => client::public_url(config_path, explicit)?,
    };
    let runtime = client::runtime()?;
    runtime.block_on(client::ready(&base))?;
    println!("ready");
    Ok(())
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
        None => format!("{}/webhook", client::public_url(config_path, explicit)?),
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
