//! The status page on the admin listener: `GET /` and its assets under `/ui/`, embedded in the
//! binary at build time (no CDN, nothing fetched from elsewhere; it works with no internet).
//! The page holds no data: it asks for `admin.token` when one is set (kept in the tab's
//! `sessionStorage`) and reads everything through `/admin/*`, polling every few seconds.
//! Served without the token; a strict Content-Security-Policy lets it load and call only its
//! own origin, and no other site may frame it.

use axum::extract::Path;
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

const INDEX: &str = include_str!("ui/index.html");
const SCRIPT: &str = include_str!("ui/app.js");
const STYLE: &str = include_str!("ui/style.css");
const ICON: &str = include_str!("ui/favicon.svg");

/// Only this origin: no inline script or style, no outside request, no framing.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'";

/// `GET /`: the page.
pub(super) async fn page() -> Response {
    serve(INDEX, "text/html; charset=utf-8")
}

/// `GET /ui/{asset}`: the page's script, style sheet and icon.
pub(super) async fn asset(Path(asset): Path<String>) -> Response {
    match asset.as_str() {
        "app.js" => serve(SCRIPT, "text/javascript; charset=utf-8"),
        "style.css" => serve(STYLE, "text/css; charset=utf-8"),
        "favicon.svg" => serve(ICON, "image/svg+xml"),
        _ => super::AdminError::NotFound.into_response(),
    }
}

fn serve(body: &'static str, content_type: &'static str) -> Response {
    let headers: [(HeaderName, HeaderValue); 6] = [
        (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
        (
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CSP),
        ),
        (
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ),
        (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
        (
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ),
        // A new binary may bring a new page: always ask (the page is small).
        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
    ];
    (StatusCode::OK, headers, body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Everything the page loads is its own: no `http(s)://` URL in any asset (but the SVG
    /// namespace), and the page stays small.
    #[test]
    fn the_page_loads_nothing_from_elsewhere_and_stays_small() {
        for (name, text) in [
            ("index.html", INDEX),
            ("app.js", SCRIPT),
            ("style.css", STYLE),
            ("favicon.svg", ICON),
        ] {
            let outside: Vec<&str> = text
                .match_indices("://")
                .map(|(at, _)| &text[at.saturating_sub(8)..(at + 30).min(text.len())])
                .filter(|url| !url.contains("http://www.w3.org/2000/svg"))
                .collect();
            assert!(outside.is_empty(), "{name} names another site: {outside:?}");
        }
        let weight = INDEX.len() + SCRIPT.len() + STYLE.len() + ICON.len();
        assert!(weight < 150 * 1024, "the page weighs {weight} bytes");
    }
}
