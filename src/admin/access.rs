//! Who may use `/admin`: the bearer `admin.token` when one is set; without one, only a client
//! on this machine ([`AdminPeer`]) that is neither behind a proxy nor a web page in a browser,
//! but the admin listener's own status page (same origin, by address: no DNS rebinding).

use super::{AdminError, AdminState};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, header};
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
            // But the status page (`GET /`) is a web page too: its own calls are let through.
            let from_the_status_page = request
                .extensions()
                .get::<ConnectInfo<AdminPeer>>()
                .is_some_and(|ConnectInfo(peer)| same_origin(peer, request.headers()));
            if !local || forwarded || (from_a_web_page && !from_the_status_page) {
                return AdminError::TokenRequired.into_response();
            }
        }
    }
    next.run(request).await
}

/// Whether a browser sent this request for a page of the admin listener itself: `Host` names
/// the address the client connected to (an IP address and port, which no DNS record can point
/// elsewhere: a rebinding name such as `evil.example:9091` does not match), and the browser
/// says the page is of that same origin: `Origin: http://<that address>` when it sends one (it
/// does for a POST), and `Sec-Fetch-Site: same-origin` when it sends that (for a GET, browsers
/// send no `Origin` but this, which together with `Host` says the same). A page of any other
/// origin (another port, another scheme, `null`) does not match; nor does a browser that
/// says `cross-site` or `same-site`.
fn same_origin(peer: &AdminPeer, headers: &HeaderMap) -> bool {
    let Some(listener) = peer.local else {
        return false;
    };
    let names_the_listener = |authority: &str| {
        let address = authority.parse::<SocketAddr>().ok().or_else(|| {
            // Port 80 goes without one.
            let ip = authority.trim_start_matches('[').trim_end_matches(']');
            ip.parse().ok().map(|ip| SocketAddr::new(ip, 80))
        });
        address.is_some_and(|address| {
            address.port() == listener.port()
                && address.ip().to_canonical() == listener.ip().to_canonical()
        })
    };
    let text = |name: header::HeaderName| headers.get(name).map(|value| value.to_str().ok());
    let host = text(header::HOST);
    let origin = text(header::ORIGIN);
    let site = headers
        .get("sec-fetch-site")
        .map(|value| value.to_str().ok());
    let host_matches = matches!(host, Some(Some(host)) if names_the_listener(host));
    let origin_matches = match origin {
        None => matches!(site, Some(Some("same-origin"))),
        Some(origin) => origin
            .and_then(|origin| origin.strip_prefix("http://"))
            .is_some_and(names_the_listener),
    };
    let site_matches = match site {
        None => true,
        Some(site) => site == Some("same-origin"),
    };
    host_matches && origin_matches && site_matches
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
        send_from(router, request, peer, "10.0.0.5:9091").await
    }

    /// The status of `request` from `peer`, made to the listener at `local`.
    async fn send_from(
        router: &Router,
        request: axum::http::request::Builder,
        peer: &str,
        local: &str,
    ) -> Result<u16, Box<dyn std::error::Error>> {
        let mut request = request.body(axum::body::Body::empty())?;
        request.extensions_mut().insert(ConnectInfo(AdminPeer {
            remote: peer.parse()?,
            local: Some(local.parse()?),
        }));
        Ok(router.clone().oneshot(request).await?.status().as_u16())
    }

    /// Without a token, the status page's own calls pass: a browser's request whose `Host`
    /// names the address the client connected to, from a page of that same origin. A page of
    /// another origin, a rebinding host name, a cross-site or same-site request do not.
    #[tokio::test]
    async fn without_a_token_only_the_status_pages_own_origin_passes()
    -> Result<(), Box<dyn std::error::Error>> {
        let open = admin_router(None)?;
        // (listener, host, origin, sec-fetch-site, method, status)
        type Case<'a> = (
            &'a str,
            &'a str,
            Option<&'a str>,
            Option<&'a str>,
            &'a str,
            u16,
        );
        let cases: &[Case] = &[
            // The page's GET: no Origin, `same-origin`.
            (
                "127.0.0.1:9091",
                "127.0.0.1:9091",
                None,
                Some("same-origin"),
                "GET",
                200,
            ),
            // Its POST: Origin and `same-origin`.
            (
                "127.0.0.1:9091",
                "127.0.0.1:9091",
                Some("http://127.0.0.1:9091"),
                Some("same-origin"),
                "POST",
                200,
            ),
            // A browser without Fetch Metadata sends the Origin alone.
            (
                "127.0.0.1:9091",
                "127.0.0.1:9091",
                Some("http://127.0.0.1:9091"),
                None,
                "POST",
                200,
            ),
            // IPv6, and IPv4 on a dual-stack socket.
            (
                "[::1]:9091",
                "[::1]:9091",
                Some("http://[::1]:9091"),
                Some("same-origin"),
                "POST",
                200,
            ),
            (
                "[::ffff:127.0.0.1]:9091",
                "127.0.0.1:9091",
                Some("http://127.0.0.1:9091"),
                Some("same-origin"),
                "POST",
                200,
            ),
            (
                "127.0.0.1:80",
                "127.0.0.1",
                Some("http://127.0.0.1"),
                Some("same-origin"),
                "POST",
                200,
            ),
            // Another origin on this machine: another port, another scheme, an opaque origin.
            (
                "127.0.0.1:9091",
                "127.0.0.1:9091",
                Some("http://127.0.0.1:8080"),
                Some("same-site"),
                "POST",
                403,
            ),
            (
                "127.0.0.1:9091",
                "127.0.0.1:9091",
                Some("https://127.0.0.1:9091"),
                Some("same-origin"),
                "POST",
                403,
            ),
            (
                "127.0.0.1:9091",
                "127.0.0.1:9091",
                Some("null"),
                Some("cross-site"),
                "POST",
                403,
            ),
            // Another web site.
            (
                "127.0.0.1:9091",
                "127.0.0.1:9091",
                Some("https://evil.example"),
                Some("cross-site"),
                "POST",
                403,
            ),
            (
                "127.0.0.1:9091",
                "127.0.0.1:9091",
                None,
                Some("cross-site"),
                "GET",
                403,
            ),
            (
                "127.0.0.1:9091",
                "127.0.0.1:9091",
                None,
                Some("same-site"),
                "GET",
                403,
            ),
            // A same-origin claim that contradicts the Origin.
            (
                "127.0.0.1:9091",
                "127.0.0.1:9091",
                Some("https://evil.example"),
                Some("same-origin"),
                "POST",
                403,
            ),
            // DNS rebinding: evil.example now resolves to 127.0.0.1; to the browser it is the
            // page's own origin, but the Host names evil.example.
            (
                "127.0.0.1:9091",
                "evil.example:9091",
                None,
                Some("same-origin"),
                "GET",
                403,
            ),
            (
                "127.0.0.1:9091",
                "evil.example:9091",
                Some("http://evil.example:9091"),
                Some("same-origin"),
                "POST",
                403,
            ),
            (
                "127.0.0.1:9091",
                "localhost:9091",
                Some("http://localhost:9091"),
                Some("same-origin"),
                "POST",
                403,
            ),
            // The right origin for another listener of this machine.
            (
                "127.0.0.1:9091",
                "127.0.0.2:9091",
                Some("http://127.0.0.2:9091"),
                Some("same-origin"),
                "POST",
                403,
            ),
        ];
        for (listener, host, origin, site, method, status) in cases {
            let path = if *method == "GET" {
                "/admin/paused"
            } else {
                "/admin/users/u1/pause"
            };
            let mut request = Request::builder()
                .method(*method)
                .uri(path)
                .header("host", *host);
            if let Some(origin) = origin {
                request = request.header("origin", *origin);
            }
            if let Some(site) = site {
                request = request.header("sec-fetch-site", *site);
            }
            let remote = if listener.starts_with("[::1]") {
                "[::1]:5000"
            } else {
                "127.0.0.1:5000"
            };
            assert_eq!(
                send_from(&open, request, remote, listener).await?,
                *status,
                "{method} to {listener}, Host {host}, Origin {origin:?}, Sec-Fetch-Site {site:?}"
            );
        }
        // Same origin, but through a proxy or from another machine: still refused.
        let proxied = Request::get("/admin/paused")
            .header("host", "10.0.0.5:9091")
            .header("sec-fetch-site", "same-origin")
            .header("x-forwarded-for", "203.0.113.9");
        assert_eq!(
            send_from(&open, proxied, "127.0.0.1:5000", "10.0.0.5:9091").await?,
            403
        );
        let remote = Request::get("/admin/paused")
            .header("host", "10.0.0.5:9091")
            .header("sec-fetch-site", "same-origin");
        assert_eq!(
            send_from(&open, remote, "10.0.0.7:5000", "10.0.0.5:9091").await?,
            403
        );
        // The page itself needs nothing.
        for path in ["/", "/ui/app.js", "/ui/style.css"] {
            let page = Request::get(path)
                .header("host", "evil.example:9091")
                .header("sec-fetch-site", "cross-site");
            assert_eq!(
                send_from(&open, page, "10.0.0.7:5000", "10.0.0.5:9091").await?,
                200,
                "{path}"
            );
        }
        Ok(())
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
