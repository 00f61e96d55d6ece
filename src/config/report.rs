//! How the config reports what is wrong with it: [`ConfigError`], a syntax error by line and
//! column, and every unknown or mistyped key (serde stops at the first) named by its dotted
//! key and, when the value came from there, by its `BOTRELAY__…` variable. No report quotes a
//! secret: not a line of the file, not a mistyped secret, not a table that holds one, not the
//! password of a URL.

use super::RawConfig;
use crate::check::{Problem, without_userinfo};

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

/// The most unknown or mistyped keys reported before giving up.
const MAX_KEY_PROBLEMS: usize = 100;

/// Deserializes the merged file and environment into [`RawConfig`], reporting every unknown or
/// mistyped key rather than the first: serde stops at the first, so each one found is recorded
/// and taken out of the tree, and the rest is tried again. What is left is validated as usual,
/// so `check-config` lists every problem at once. (The tree keeps the `config` crate's own
/// values, so that environment strings still convert to numbers and booleans as they would.)
/// `problems` are those found before (the sink tables' unknown keys); they are sorted in.
pub(super) fn deserialize_every_key(
    mut tree: config::Map<String, config::Value>,
    mut problems: Vec<Problem>,
) -> Result<(RawConfig, Vec<Problem>), ConfigError> {
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
            let inner = key_problem(error, tree)?;
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

/// Keys of the core sections whose values are secrets (the sink tables name their own).
const SECRET_KEYS: [&str; 5] = [
    "messenger.app_secret",
    "messenger.verify_token",
    "admin.token",
    "ingest.token",
    "dashbot.secret",
];

/// A problem with a secret's key, with a table that holds one, or with a value inside a table of
/// secrets (a page token), does not quote the value it found (a token set in the wrong place,
/// or as a string where a table was expected, such as `messenger = "…"`, would be printed
/// otherwise).
fn hide_secret_value(problem: Problem) -> Problem {
    let key = problem.key.split('[').next().unwrap_or(&problem.key);
    let below = |outer: &str, inner: &str| {
        inner
            .strip_prefix(outer)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
    };
    let secret = SECRET_KEYS
        .iter()
        .map(|secret| (*secret).to_owned())
        .chain(super::sinks::secret_keys())
        .any(|secret| below(key, &secret) || below(&secret, key));
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
pub(super) fn origin_note(key: &str, origin: Option<&str>) -> String {
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
pub(super) fn lookup<'a>(
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

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use crate::config::Config;
    use std::collections::HashMap;

    #[test]
    fn unknown_keys_are_rejected_with_their_name() {
        let found = problems(&format!("{MINIMAL}[server]\nlisen = \"x\"\n"), &[]);
        assert_eq!(
            found,
            [
                "server.lisen: unknown key; expected one of `listen`, `max_body_bytes`, `shutdown_grace`, `read_timeout`, `max_connections`"
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
                "server.lisen: unknown key; expected one of `listen`, `max_body_bytes`, `shutdown_grace`, `read_timeout`, `max_connections`",
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
}
