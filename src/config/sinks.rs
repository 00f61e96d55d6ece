//! How the sink tables (`[bot]`, `[sinks.*]`) compose into the config. Each sink's module owns
//! its table: its keys and defaults (`SPEC`), the serde `Table` of its own keys, and
//! `from_table`, which validates it into the typed sink its encoder reads. This file only
//! knows which module owns which table; adding a sink adds one arm to [`spec`], one field to
//! [`RawSinks`] and one call in [`validate`].

use super::report::origin_note;
use crate::check::{Checker, DELIVERY_KEYS, Problem, Shared, SinkTable};
use crate::sink_name::SinkName;
use crate::sinks::{
    Context, Disabled, Route, Sink, TableSpec, bot, conversions, dashbot, kochava, page_activities,
};
use serde::Deserialize;
use std::collections::BTreeSet;

/// `[sinks]`: one table per analytics sink.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSinks {
    kochava: Option<SinkTable<kochava::Table>>,
    dashbot: Option<SinkTable<dashbot::Table>>,
    page_activities: Option<SinkTable<page_activities::Table>>,
    conversions: Option<SinkTable<conversions::Table>>,
}

/// The keys, secrets and defaults of a sink's table, as its module declares them.
fn spec(name: SinkName) -> &'static TableSpec {
    match name {
        SinkName::Bot => &bot::SPEC,
        SinkName::Kochava | SinkName::KochavaSmartlink => &kochava::SPEC,
        SinkName::Dashbot => &dashbot::SPEC,
        SinkName::PageActivities => &page_activities::SPEC,
        SinkName::Conversions => &conversions::SPEC,
    }
}

/// Each sink table once (SmartLink shares Kochava's), in config order.
fn tables() -> impl Iterator<Item = SinkName> {
    SinkName::ALL
        .into_iter()
        .filter(|name| *name != SinkName::KochavaSmartlink)
}

/// Every key some sink table takes besides the delivery keys, in the order problems name them
/// (`names`, which most sinks take, last).
fn every_sink_key() -> Vec<&'static str> {
    let mut keys: Vec<&'static str> = Vec::new();
    for name in tables() {
        for key in spec(name).keys {
            if *key != "names" && !keys.contains(key) {
                keys.push(key);
            }
        }
    }
    keys.push("names");
    keys
}

/// The dotted keys of the sink tables whose values are secrets (`sinks.dashbot.api_key`).
pub(super) fn secret_keys() -> impl Iterator<Item = String> {
    tables().flat_map(|name| {
        spec(name)
            .secret_keys
            .iter()
            .map(move |key| format!("{}.{key}", name.table()))
    })
}

/// Keys that a sink table holds but its sink does not take, found before the tables are read.
pub(super) struct StrayKeys {
    /// Keys no sink takes: reported with the other unknown keys, naming what the table takes.
    pub unknown: Vec<Problem>,
    /// Keys another sink takes (`bot.api_key`): reported with the table's own problems. (A
    /// `names` table is read from every sink table, and checked there.)
    pub foreign: BTreeSet<String>,
}

/// Takes every key out of the sink tables that their sink does not take, so that each table
/// is read with its own keys only (its `Table` refuses any other).
pub(super) fn take_stray_keys(tree: &mut config::Map<String, config::Value>) -> StrayKeys {
    let every = every_sink_key();
    let mut stray = StrayKeys {
        unknown: Vec::new(),
        foreign: BTreeSet::new(),
    };
    for name in tables() {
        let spec = spec(name);
        let prefix = name.table();
        let Some(table) = table_mut(tree, prefix) else {
            continue;
        };
        // `names` is read with the delivery keys, whatever the sink: a table whose sink takes
        // none is told so with its other problems (`shared` in `Tables::validate`).
        let takes =
            |key: &str| DELIVERY_KEYS.contains(&key) || key == "names" || spec.keys.contains(&key);
        let keys: Vec<String> = table.keys().filter(|key| !takes(key)).cloned().collect();
        for key in keys {
            let value = table.remove(&key);
            let full = format!("{prefix}.{key}");
            if every.contains(&key.as_str()) {
                stray.foreign.insert(full);
                continue;
            }
            let taken: Vec<String> = DELIVERY_KEYS
                .iter()
                .chain(spec.keys)
                .map(|key| format!("`{key}`"))
                .collect();
            let origin = origin_note(&full, value.as_ref().and_then(config::Value::origin));
            stray.unknown.push(Problem {
                message: format!("unknown key; [{prefix}] takes {}{origin}", taken.join(", ")),
                key: full,
            });
        }
    }
    stray
}

/// The table at a dotted name (`sinks.kochava`), when there is one.
fn table_mut<'t>(
    tree: &'t mut config::Map<String, config::Value>,
    dotted: &str,
) -> Option<&'t mut config::Map<String, config::Value>> {
    let mut table = tree;
    for name in dotted.split('.') {
        match table.get_mut(name).map(|value| &mut value.kind) {
            Some(config::ValueKind::Table(inner)) => table = inner,
            _ => return None,
        }
    }
    Some(table)
}

/// The enabled sinks, the bot first, and those disabled for lack of credentials.
#[derive(Debug, Default)]
pub(super) struct Validated {
    pub enabled: Vec<Route>,
    pub disabled: Vec<(SinkName, String)>,
}

/// Validates each sink table present, in config order.
pub(super) fn validate(
    check: &mut Checker,
    bot: Option<SinkTable<bot::Table>>,
    sinks: RawSinks,
    foreign: &BTreeSet<String>,
    context: &Context,
) -> Validated {
    let mut tables = Tables {
        check,
        foreign,
        validated: Validated::default(),
    };
    tables.validate(SinkName::Bot, bot, |table, shared, check| {
        let bot = bot::from_table(table, check, context)?;
        Ok(bot.map(|bot| vec![route(SinkName::Bot, shared, Sink::Bot(bot))]))
    });
    tables.validate(SinkName::Kochava, sinks.kochava, |table, shared, check| {
        let Some((kochava, smartlink)) = kochava::from_table(table, shared.names.clone(), check)?
        else {
            return Ok(None);
        };
        let pings = smartlink.map(|smartlink| {
            Route::new(
                SinkName::KochavaSmartlink,
                kochava::SMARTLINK_KINDS.to_vec(),
                shared.delivery.clone(),
                Sink::KochavaSmartlink(smartlink),
            )
        });
        let track = route(SinkName::Kochava, shared, Sink::Kochava(kochava));
        Ok(Some(std::iter::once(track).chain(pings).collect()))
    });
    tables.validate(SinkName::Dashbot, sinks.dashbot, |table, shared, check| {
        let dashbot = dashbot::from_table(table, shared.names.clone(), check)?;
        Ok(dashbot.map(|dashbot| vec![route(SinkName::Dashbot, shared, Sink::Dashbot(dashbot))]))
    });
    tables.validate(
        SinkName::PageActivities,
        sinks.page_activities,
        |table, shared, check| {
            let sink = page_activities::from_table(table, shared.names.clone(), check, context)?;
            let name = SinkName::PageActivities;
            Ok(sink.map(|sink| vec![route(name, shared, Sink::PageActivities(sink))]))
        },
    );
    tables.validate(
        SinkName::Conversions,
        sinks.conversions,
        |table, shared, check| {
            let sink = conversions::from_table(table, shared.names.clone(), check, context)?;
            let name = SinkName::Conversions;
            Ok(sink.map(|sink| vec![route(name, shared, Sink::Conversions(sink))]))
        },
    );
    tables.validated
}

/// The route of an enabled sink: the kinds and the delivery policy of its table.
fn route(name: SinkName, shared: Shared, sink: Sink) -> Route {
    Route::new(name, shared.kinds, shared.delivery, sink)
}

/// The sink tables' validation in progress.
struct Tables<'a> {
    check: &'a mut Checker,
    foreign: &'a BTreeSet<String>,
    validated: Validated,
}

impl Tables<'_> {
    /// Validates one sink table, when present: first the keys of other sinks it holds, then
    /// what every sink table has in common (delivery policy, kinds, names), then `build` its
    /// own keys: `Ok(Some)` enabled, `Ok(None)` invalid (problems recorded), `Err` disabled.
    fn validate<T>(
        &mut self,
        name: SinkName,
        table: Option<SinkTable<T>>,
        build: impl FnOnce(T, Shared, &mut Checker) -> Result<Option<Vec<Route>>, Disabled>,
    ) {
        let Some(table) = table else { return };
        let prefix = name.table();
        let spec = spec(name);
        let names_unwanted = table.names.is_some() && !spec.keys.contains(&"names");
        for key in every_sink_key() {
            let held = key == "names" && names_unwanted;
            let key = format!("{prefix}.{key}");
            if held || self.foreign.contains(&key) {
                self.check
                    .problem(key, format!("is not a key of [{prefix}]"));
            }
        }
        let shared = table.shared(self.check, prefix, &spec.delivery, spec.kinds);
        match build(table.own, shared, self.check) {
            Ok(Some(routes)) => self.validated.enabled.extend(routes),
            Ok(None) => {}
            Err(Disabled(reason)) => self.validated.disabled.push((name, reason)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use crate::config::{Config, ConfigError};
    use crate::sink_name::SinkName;
    use std::collections::HashMap;

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

    /// A key of another sink is named as not this table's, after the unknown keys and in a
    /// fixed order; one no sink takes lists what the table takes.
    #[test]
    fn keys_of_other_sinks_and_unknown_keys_are_told_apart() {
        let found = problems(
            &format!(
                "{MINIMAL}[bot]\nurl = \"http://b/\"\nnames = {{ message = \"x\" }}\n\
                 page_tokens = {{ \"1\" = \"t\" }}\napi_key = \"k\"\nretries = 3\n\
                 [sinks.kochava]\napp_id = \"k\"\ngdpr = 1\n"
            ),
            &[("BOTRELAY__SINKS__KOCHAVA__DATASET_ID", "d")],
        );
        assert_eq!(
            found,
            [
                "bot.retries: unknown key; [bot] takes `concurrency`, `timeout`, `max_attempts`, `backoff`, `max_backoff`, `ttl`, `kinds`, `url`",
                "sinks.kochava.gdpr: unknown key; [sinks.kochava] takes `concurrency`, `timeout`, `max_attempts`, `backoff`, `max_backoff`, `ttl`, `kinds`, `url`, `app_id`, `include_text`, `impression_url`, `click_url`, `smartlink_prefix`, `click_payloads`, `origination_ip`, `device_ver`, `gdpr_privacy_consent`, `api_key`, `auth_secret`, `names`",
                "bot.api_key: is not a key of [bot]",
                "bot.page_tokens: is not a key of [bot]",
                "bot.names: is not a key of [bot]",
                "sinks.kochava.dataset_id: is not a key of [sinks.kochava] (from BOTRELAY__SINKS__KOCHAVA__DATASET_ID)",
            ]
        );
    }

    /// A sink's own keys and the shared ones convert from environment strings like any other.
    #[test]
    fn sink_keys_from_the_environment_convert() -> Result<(), ConfigError> {
        let config = Config::from_sources(
            MINIMAL,
            env(&[
                ("BOTRELAY__SINKS__KOCHAVA__APP_ID", "k"),
                ("BOTRELAY__SINKS__KOCHAVA__INCLUDE_TEXT", "true"),
                (
                    "BOTRELAY__SINKS__KOCHAVA__CLICK_URL",
                    "https://c/{fb_user_id}",
                ),
                ("BOTRELAY__SINKS__KOCHAVA__CONCURRENCY", "4"),
            ]),
        )?;
        let names: Vec<SinkName> = config.sinks.iter().map(|sink| sink.name).collect();
        assert_eq!(names, [SinkName::Kochava, SinkName::KochavaSmartlink]);
        assert!(
            config
                .sinks
                .iter()
                .all(|sink| sink.delivery.concurrency == 4)
        );
        let found = problems(
            MINIMAL,
            &[
                ("BOTRELAY__SINKS__KOCHAVA__APP_ID", "k"),
                ("BOTRELAY__SINKS__KOCHAVA__INCLUDE_TEXT", "maybe"),
            ],
        );
        assert_eq!(
            found,
            [
                "sinks.kochava.include_text: expected a boolean, found string \"maybe\" (from BOTRELAY__SINKS__KOCHAVA__INCLUDE_TEXT)"
            ]
        );
        Ok(())
    }
}
