//! The HTTP client of a running relay, as the CLI uses it: the admin API (`dead-letters`,
//! `pause`, `unpause`, `paused`, `sinks`) and `GET /readyz` (`healthcheck`). Where the relay
//! listens and its token come from the config; one method per endpoint, paging with `after`,
//! replays in chunks; every failure is a message of one of two kinds. It prints nothing.

use super::api::{
    DeadLetterView, ErrorBody, MAX_LIMIT, PauseState, PausedUser, ReplayRequest, Replayed, Since,
    SinkView,
};
use crate::clock::Millis;
use secrecy::{ExposeSecret, SecretString};
use serde::de::DeserializeOwned;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Bad arguments, config, token or request: the caller's to fix.
    #[error("{0}")]
    Usage(String),
    /// The relay is unreachable or failed.
    #[error("{0}")]
    Runtime(String),
}

/// The few config keys the client reads. They need neither the app secret nor a valid sink
/// table, so an operator's shell without the relay's secrets can still use them.
pub struct ClientConfig {
    admin_listen: Option<String>,
    admin_token: Option<SecretString>,
    server_listen: Option<String>,
}

impl ClientConfig {
    /// The file (when it exists, or always when `explicit`) plus `BOTRELAY__…` overrides.
    pub fn load(path: &Path, explicit: bool) -> Result<ClientConfig, ClientError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(error) if explicit || error.kind() != std::io::ErrorKind::NotFound => {
                return Err(ClientError::Usage(format!(
                    "cannot read config {}: {error}",
                    path.display()
                )));
            }
            Err(_) => String::new(),
        };
        crate::config::check_syntax(&text).map_err(|error| {
            ClientError::Usage(format!("{error} (config file: {})", path.display()))
        })?;
        let settings = ::config::Config::builder()
            .add_source(::config::File::from_str(&text, ::config::FileFormat::Toml))
            .add_source(
                ::config::Environment::with_prefix("BOTRELAY")
                    .prefix_separator("__")
                    .separator("__"),
            )
            .build()
            .map_err(|error| {
                ClientError::Usage(format!("cannot read config {}: {error}", path.display()))
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
pub fn public_url(config_path: &Path, explicit: bool) -> Result<String, ClientError> {
    let config = ClientConfig::load(config_path, explicit)?;
    connect_url(
        config.server_listen.as_deref().unwrap_or("0.0.0.0:8080"),
        "0.0.0.0:8080",
    )
}

/// The runtime of a client command: one thread is plenty.
pub fn runtime() -> Result<tokio::runtime::Runtime, ClientError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|error| ClientError::Runtime(format!("cannot start the runtime: {error}")))
}

/// A listen address as a URL to connect to: `0.0.0.0` and `::` become the loopback address.
fn connect_url(listen: &str, default: &str) -> Result<String, ClientError> {
    let mut address: SocketAddr = listen.parse().map_err(|_| {
        ClientError::Usage(format!("`{listen}` is not an address like \"{default}\""))
    })?;
    if address.ip().is_unspecified() {
        address.set_ip(match address.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        });
    }
    Ok(format!("http://{address}"))
}

/// `GET {base}/readyz` within a few seconds: `Ok` when the relay answers 200, else why not.
pub async fn ready(base: &str) -> Result<(), ClientError> {
    let url = format!("{}/readyz", base.trim_end_matches('/'));
    // The relay is on this machine: an HTTP_PROXY (an egress proxy) must not be asked.
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .no_proxy()
        .build()
        .map_err(|error| ClientError::Runtime(format!("cannot build the HTTP client: {error}")))?;
    let response = http.get(&url).send().await.map_err(|error| {
        ClientError::Runtime(format!(
            "not ready: {error} (is the relay running? see server.listen or --url)"
        ))
    })?;
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    if status == reqwest::StatusCode::OK {
        Ok(())
    } else {
        Err(ClientError::Runtime(format!(
            "not ready: {url} answered {status}: {}",
            body.trim()
        )))
    }
}

/// The dead letters a command acts on. `since` is resolved to epoch ms once, so that every
/// request of a command agrees.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    pub sink: Option<String>,
    pub user: Option<String>,
    pub since: Option<Millis>,
}

/// An HTTP client of the admin API, with the bearer token when one is configured.
pub struct AdminClient {
    http: reqwest::Client,
    base: String,
    token: Option<SecretString>,
}

impl AdminClient {
    /// A client of `admin_url`, or else of `admin.listen` from the config.
    pub fn new(config: &ClientConfig, admin_url: Option<&str>) -> Result<AdminClient, ClientError> {
        let base = match admin_url {
            Some(url) => url.trim_end_matches('/').to_owned(),
            None => connect_url(
                config.admin_listen.as_deref().unwrap_or("127.0.0.1:9091"),
                "127.0.0.1:9091",
            )?,
        };
        let mut http = reqwest::Client::builder().timeout(Duration::from_secs(60));
        // admin.listen is this machine's own listener: an HTTP_PROXY must not be asked for it
        // (with --admin-url the operator chose the way, proxy included).
        if admin_url.is_none() {
            http = http.no_proxy();
        }
        let http = http.build().map_err(|error| {
            ClientError::Runtime(format!("cannot create the HTTP client: {error}"))
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

    /// Sends, and reads the JSON answer; maps every failure to a message and its kind.
    async fn send<T: DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<T, ClientError> {
        let request = match &self.token {
            Some(token) => request.bearer_auth(token.expose_secret()),
            None => request,
        };
        let response = request.send().await.map_err(|error| {
            ClientError::Runtime(format!(
                "cannot reach the admin API at {}: {error} (is the relay running? see admin.listen or --admin-url)",
                self.base
            ))
        })?;
        let status = response.status();
        let body = response.bytes().await.map_err(|error| {
            ClientError::Runtime(format!("cannot read the admin API's answer: {error}"))
        })?;
        if status.is_success() {
            return serde_json::from_slice(&body).map_err(|error| {
                ClientError::Runtime(format!("unexpected answer from the admin API: {error}"))
            });
        }
        let message = serde_json::from_slice::<ErrorBody>(&body)
            .map(|body| body.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(&body).trim().to_owned());
        Err(match status.as_u16() {
            401 => ClientError::Usage(format!(
                "the admin API refused the token ({message}): set admin.token in the config or BOTRELAY__ADMIN__TOKEN"
            )),
            400..=499 => ClientError::Usage(format!("the admin API answered {status}: {message}")),
            _ => ClientError::Runtime(format!("the admin API answered {status}: {message}")),
        })
    }

    /// `GET /admin/dead-letters`: at most `limit` letters of `selection`, oldest first, those
    /// after the id `after` when given (the last id of the previous page).
    pub async fn dead_letters(
        &self,
        selection: &Selection,
        after: Option<i64>,
        limit: u32,
    ) -> Result<Vec<DeadLetterView>, ClientError> {
        let mut query: Vec<(&str, String)> = vec![("limit", limit.to_string())];
        query.extend(selection.sink.clone().map(|sink| ("sink", sink)));
        query.extend(selection.user.clone().map(|user| ("user", user)));
        query.extend(selection.since.map(|since| ("since", since.to_string())));
        query.extend(after.map(|after| ("after", after.to_string())));
        self.send(self.http.get(self.url("/admin/dead-letters")).query(&query))
            .await
    }

    /// `POST /admin/dead-letters/replay`.
    pub async fn replay(&self, request: &ReplayRequest) -> Result<Replayed, ClientError> {
        self.send(
            self.http
                .post(self.url("/admin/dead-letters/replay"))
                .json(request),
        )
        .await
    }

    /// `POST /admin/users/{user}/pause` (or `unpause`).
    pub async fn set_paused(&self, user: &str, paused: bool) -> Result<PauseState, ClientError> {
        let action = if paused { "pause" } else { "unpause" };
        let path = format!("/admin/users/{}/{action}", encode_path_segment(user));
        self.send(self.http.post(self.url(&path))).await
    }

    /// `GET /admin/paused`.
    pub async fn paused(&self) -> Result<Vec<PausedUser>, ClientError> {
        self.send(self.http.get(self.url("/admin/paused"))).await
    }

    /// `GET /admin/sinks`.
    pub async fn sinks(&self) -> Result<Vec<SinkView>, ClientError> {
        self.send(self.http.get(self.url("/admin/sinks"))).await
    }

    /// Replays the dead letters of `selection` (only `ids` of them when given) in requests of
    /// `chunk` ids, and answers the totals. `progress(replayed, total)` is called after each
    /// request when there is more than one. Without `ids`, lists the matching letters first (up
    /// to [`MAX_LIMIT`] at a time), sink by sink: only the enabled sinks' letters are listed for
    /// replay (a letter of a sink that is not enabled stays dead, so listing it again would
    /// return the same page forever), and the others are counted.
    pub async fn replay_dead_letters(
        &self,
        selection: &Selection,
        ids: Vec<i64>,
        chunk: usize,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Replayed, ClientError> {
        let mut run = ReplayRun {
            client: self,
            chunk: chunk.max(1),
            progress,
            replayed: 0,
            total: 0,
            left_dead: BTreeMap::new(),
        };
        if !ids.is_empty() {
            run.replay_ids(selection, ids, false).await?;
            return Ok(run.finish());
        }
        let sinks = self.sinks().await?;
        let enabled = |name: &str| sinks.iter().any(|sink| sink.sink == name && sink.enabled);
        let names: Vec<String> = match &selection.sink {
            // Not enabled: the relay refuses the replay, and says why.
            Some(name) if !enabled(name) => {
                let request = ReplayRequest {
                    sink: Some(name.clone()),
                    user: selection.user.clone(),
                    since: selection.since.map(Since::Millis),
                    ids: None,
                };
                let _: Replayed = self.replay(&request).await?;
                Vec::new()
            }
            Some(name) => vec![name.clone()],
            None => sinks
                .iter()
                .filter(|sink| sink.enabled)
                .map(|sink| sink.sink.clone())
                .collect(),
        };
        let of_sink = |sink: String| Selection {
            sink: Some(sink),
            ..selection.clone()
        };
        for name in names {
            run.replay_listed(&of_sink(name)).await?;
        }
        if selection.sink.is_none() {
            for sink in sinks.iter().filter(|sink| !sink.enabled && sink.dead > 0) {
                let left = self
                    .dead_letters(&of_sink(sink.sink.clone()), None, MAX_LIMIT)
                    .await?
                    .len();
                if left > 0 {
                    run.left_dead.insert(sink.sink.clone(), left);
                }
            }
        }
        Ok(run.finish())
    }
}

/// One replay's requests and its running totals.
struct ReplayRun<'a> {
    client: &'a AdminClient,
    chunk: usize,
    progress: &'a mut dyn FnMut(usize, usize),
    replayed: usize,
    total: usize,
    left_dead: BTreeMap<String, usize>,
}

impl ReplayRun<'_> {
    /// Lists the letters of `selection` a page at a time, oldest first, and replays each page.
    /// The next page starts after the last id of this one: a replayed letter that fails again
    /// is dead again with the same id, and must neither be replayed twice by one command nor
    /// hide the letters behind it.
    async fn replay_listed(&mut self, selection: &Selection) -> Result<(), ClientError> {
        let mut after = None;
        loop {
            let letters = self
                .client
                .dead_letters(selection, after, MAX_LIMIT)
                .await?;
            let Some(last) = letters.last() else {
                return Ok(());
            };
            after = Some(last.id);
            let full = letters.len() == MAX_LIMIT as usize;
            self.replay_ids(
                selection,
                letters.iter().map(|letter| letter.id).collect(),
                full,
            )
            .await?;
            if !full {
                return Ok(());
            }
        }
    }

    /// Replays `ids` (narrowed by `selection`) in chunks; `more` when further rounds may follow.
    async fn replay_ids(
        &mut self,
        selection: &Selection,
        ids: Vec<i64>,
        more: bool,
    ) -> Result<(), ClientError> {
        self.total += ids.len();
        let chunks = ids.chunks(self.chunk).count();
        for ids in ids.chunks(self.chunk) {
            let request = ReplayRequest {
                sink: selection.sink.clone(),
                user: selection.user.clone(),
                since: selection.since.map(Since::Millis),
                ids: Some(ids.to_vec()),
            };
            let answer = self.client.replay(&request).await?;
            self.replayed += answer.replayed;
            for (sink, count) in answer.left_dead {
                *self.left_dead.entry(sink).or_default() += count;
            }
            if chunks > 1 || more {
                (self.progress)(self.replayed, self.total);
            }
        }
        Ok(())
    }

    fn finish(self) -> Replayed {
        Replayed {
            replayed: self.replayed,
            left_dead: self.left_dead,
        }
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
