//! What the two Graph sinks (`page_activities`, `conversions`) share on the way out: their
//! `api_version` and `page_tokens` keys, the page an event is for, and the Graph URL with its
//! token and `appsecret_proof`. How Graph's answers are read is `graph_error.rs`.

use crate::check::Checker;
use crate::event::Event;
use crate::signing::appsecret_proof;
use crate::sinks::EncodeError;
use secrecy::{ExposeSecret, SecretString};
use std::collections::BTreeMap;
use url::Url;

/// `api_version`, or `default`: a problem unless it reads like `v20.0`.
pub(crate) fn api_version(
    check: &mut Checker,
    key: &str,
    raw: Option<String>,
    default: &str,
) -> String {
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

/// `page_tokens = { "<page_id>" = "<token>" }`, without the pages whose token is empty.
pub(crate) fn page_tokens(raw: Option<BTreeMap<String, String>>) -> BTreeMap<String, SecretString> {
    raw.unwrap_or_default()
        .into_iter()
        .filter(|(_, token)| !token.is_empty())
        .map(|(page, token)| (page, SecretString::from(token)))
        .collect()
}

/// The page an event belongs to; when it names none (a custom event posted without `pageId`)
/// and the sink knows exactly one page, that page.
pub(crate) fn page_of<'a, V>(
    event: &'a Event,
    pages: &'a BTreeMap<String, V>,
) -> Result<&'a str, EncodeError> {
    if let Some(page) = event.page_id.as_deref().filter(|page| !page.is_empty()) {
        return Ok(page);
    }
    match pages.keys().next() {
        Some(only) if pages.len() == 1 => Ok(only),
        Some(_) => Err(EncodeError::Invalid(format!(
            "{} event has no page id and the sink serves several pages",
            event.kind
        ))),
        None => Err(EncodeError::Invalid(format!(
            "{} event has no page id",
            event.kind
        ))),
    }
}

/// `{base_url}/{segments…}?access_token=<token>[&appsecret_proof=<proof>]` for a Graph call.
/// Errors never contain the token.
pub(crate) fn graph_url(
    base_url: &Url,
    segments: &[&str],
    access_token: &SecretString,
    app_secret: &SecretString,
) -> Result<Url, EncodeError> {
    let mut url = base_url.clone();
    url.path_segments_mut()
        .map_err(|()| {
            EncodeError::Invalid(format!("graph.base_url `{base_url}` cannot take a path"))
        })?
        .pop_if_empty()
        .extend(segments);
    let token = access_token.expose_secret();
    let secret = app_secret.expose_secret();
    {
        let mut query = url.query_pairs_mut();
        query.append_pair("access_token", token);
        if !secret.is_empty() {
            query.append_pair(
                "appsecret_proof",
                &appsecret_proof(secret.as_bytes(), token),
            );
        }
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    #[test]
    fn graph_urls_carry_the_token_and_its_proof() -> TestResult {
        let url = graph_url(
            &Url::parse("https://graph.facebook.com")?,
            &["v20.0", "42", "page_activities"],
            &SecretString::from("tok en"),
            &SecretString::from("test_app_secret"),
        )?;
        let proof = appsecret_proof(b"test_app_secret", "tok en");
        assert_eq!(
            url.as_str(),
            format!(
                "https://graph.facebook.com/v20.0/42/page_activities?access_token=tok+en&appsecret_proof={proof}"
            )
        );
        let without = graph_url(
            &Url::parse("http://127.0.0.1:9/")?,
            &["v23.0", "7", "events"],
            &SecretString::from("t"),
            &SecretString::from(""),
        )?;
        assert_eq!(
            without.as_str(),
            "http://127.0.0.1:9/v23.0/7/events?access_token=t"
        );
        Ok(())
    }
}
