//! Who may use `/admin`: the bearer `admin.token` when one is set; without one, only a client
//! on this machine ([`AdminPeer`]) that is neither behind a proxy nor a web page in a browser.

use super::{AdminError, AdminState};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::net::SocketAddr;

/// Both ends of an admin connection, for the rule that without a token only this machine may
/// use `/admin` (the listener puts it in each request's extensions as `ConnectInfo`).
#[derive(Debug, Clone, Copy)]
pub struct AdminPeer {
    remote: SocketAddr,
    /// The address the client connected to (not the listener's `0.0.0.0`).
    local: Option<SocketAddr>,
}

impl AdminPeer {
    /// The peer `remote` of a connection made to `local`.
    pub fn new(remote: SocketAddr, local: Option<SocketAddr>) -> AdminPeer {
        AdminPeer { remote, local }
    }

    /// A client on this machine: a loopback address, or this host's own address (a client
    /// that connects to the listener's private address comes from that address).
    fn is_this_machine(&self) -> bool {
        let remote = self.remote.ip().to_canonical();
        remote.is_loopback()
            || self
                .local
                .is_some_and(|local| local.ip().to_canonical() == remote)
    }
}

/// Refuses `/admin` and everything under it without the right bearer token (when one is set),
/// unknown paths included, so that nothing about the API is learnt without it. Without a
/// token, `/admin` answers only clients on this machine, and not through a proxy nor from a web
/// page in a browser on this machine: a listener on every interface (as in the container image)
/// must not let the network, or any web site, pause users or replay.
pub(super) async fn require_token(
    State(state): State<AdminState>,
    request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path();
    let protected = path == "/admin" || path.starts_with("/admin/");
    if !protected {
        return next.run(request).await;
    }
    match state.config.admin.token.as_ref() {
        Some(token) if !crate::signing::bearer_matches(token, request.headers()) => {
            return AdminError::Unauthorized.into_response();
        }
        Some(_) => {}
        None => {
            let local = request
                .extensions()
                .get::<ConnectInfo<AdminPeer>>()
                .is_some_and(|ConnectInfo(peer)| peer.is_this_machine());
            // A proxy on this machine makes every client look local; it says who they are.
            let forwarded = ["forwarded", "x-forwarded-for", "x-real-ip"]
                .iter()
                .any(|name| request.headers().contains_key(*name));
            // So does a browser on this machine, for any web page it shows (a cross-site POST
            // with a `text/plain` body needs no preflight); it says where the request comes
            // from. The CLI and curl send neither header; an address typed in the address bar
            // comes with `Sec-Fetch-Site: none`.
            let from_a_web_page = request.headers().contains_key(header::ORIGIN)
                || request
                    .headers()
                    .get("sec-fetch-site")
                    .is_some_and(|site| site != "none");
            if !local || forwarded || from_a_web_page {
                return AdminError::TokenRequired.into_response();
            }
        }
    }
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::router;
    use crate::config::Config;
    use crate::redact::Redactor;
    use crate::store::Store;
    use crate::telemetry;
    use axum::Router;
    use std::collections::HashMap;
    use std::sync::Arc;
    use tower::ServiceExt;

    /// The admin router on the discarding store, with `admin.token` set or not.
    fn admin_router(token: Option<&str>) -> Result<Router, Box<dyn std::error::Error>> {
        let token = token.map_or(String::new(), |token| {
            format!("[admin]\ntoken = \"{token}\"\n")
        });
        let config = Config::from_sources(
            &format!("{token}[messenger]\napp_secret = \"s\"\nverify_token = \"v\"\n"),
            HashMap::new(),
        )?;
        Ok(router(AdminState {
            config: Arc::new(config),
            store: Store::discarding(),
            active: Vec::new(),
            redactor: Redactor::new(Vec::new()),
            status: telemetry::SinkStatus::default(),
        }))
    }

    /// The status of `GET path` from `peer`, with `headers`.
    async fn status_from(
        router: &Router,
        path: &str,
        peer: &str,
        headers: &[(&str, &str)],
    ) -> Result<u16, Box<dyn std::error::Error>> {
        let mut request = Request::get(path);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let mut request = request.body(axum::body::Body::empty())?;
        request.extensions_mut().insert(ConnectInfo(AdminPeer {
            remote: peer.parse()?,
            local: Some("10.0.0.5:9091".parse()?),
        }));
        Ok(router.clone().oneshot(request).await?.status().as_u16())
    }

    /// Without `admin.token`, `/admin` answers only this machine: loopback peers (IPv4, IPv6,
    /// and IPv4 on an IPv6 socket) and a peer at the address it connected to (the listener's
    /// own private address, here 10.0.0.5); `/metrics` and `/healthz` answer everyone. With a
    /// token, the token decides wherever the client is.
    #[tokio::test]
    async fn without_a_token_the_admin_api_answers_only_this_machine()
    -> Result<(), Box<dyn std::error::Error>> {
        let open = admin_router(None)?;
        for peer in [
            "127.0.0.1:5000",
            "[::1]:5000",
            "[::ffff:127.0.0.1]:5000",
            "10.0.0.5:5000",
        ] {
            assert_eq!(
                status_from(&open, "/admin/paused", peer, &[]).await?,
                200,
                "{peer}"
            );
        }
        for peer in [
            "10.0.0.7:5000",
            "[fd00::7]:5000",
            "[::ffff:172.17.0.1]:5000",
        ] {
            for (path, status) in [
                ("/admin/paused", 403),
                ("/admin/nothing", 403),
                ("/metrics", 200),
                ("/healthz", 200),
            ] {
                assert_eq!(
                    status_from(&open, path, peer, &[]).await?,
                    status,
                    "{peer} {path}"
                );
            }
        }
        // A proxy on this machine: the client it names is not this machine.
        for forwarded in [
            ("x-forwarded-for", "203.0.113.9"),
            ("forwarded", "for=203.0.113.9"),
            ("x-real-ip", "203.0.113.9"),
        ] {
            assert_eq!(
                status_from(&open, "/admin/paused", "127.0.0.1:5000", &[forwarded]).await?,
                403,
                "{forwarded:?}"
            );
        }
        let closed = admin_router(Some("t0ken"))?;
        for peer in ["127.0.0.1:5000", "10.0.0.7:5000"] {
            assert_eq!(
                status_from(&closed, "/admin/paused", peer, &[]).await?,
                401,
                "{peer}"
            );
            assert_eq!(
                status_from(
                    &closed,
                    "/admin/paused",
                    peer,
                    &[("authorization", "Bearer t0ken")]
                )
                .await?,
                200,
                "{peer}"
            );
        }
        Ok(())
    }
}
