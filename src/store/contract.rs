//! The store contract as tests that take any backend: each function drives a fresh [`Store`]
//! through one operation's semantics (dedupe, leases, lanes, pause, replay, purge, depth, dead
//! letters) using only the public API. `sqlite` below runs them on a temporary embedded store;
//! `postgres::tests` runs them on a fresh PostgreSQL database.

use super::{
    Claimed, DeadLetterFilter, EnqueueReport, NewEvent, Retention, Settle, SinkDepth, Store,
};
use crate::clock::Millis;
use crate::event::{Event, EventData, EventId, EventKind, Source};
use crate::sink_name::SinkName;
use std::collections::BTreeMap;
use std::time::Duration;

pub(crate) type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

const T0: Millis = 1_000_000_000;
const LEASE: Duration = Duration::from_secs(10);
const DAY: Millis = 86_400_000;

/// An event named `name` (carried as its page id, so that claims can be read back by name) of
/// `user`, for `sinks`.
fn event(name: &str, user: Option<&str>, sinks: &[SinkName]) -> NewEvent {
    NewEvent {
        event: Event {
            id: EventId::derive(&[name.as_bytes()]),
            source: Source::Webhook,
            kind: EventKind::Message,
            page_id: Some(name.to_owned()),
            user_id: user.map(str::to_owned),
            timestamp_ms: T0,
            data: EventData::Other { key: None },
            webhook: None,
        },
        sinks: sinks.to_vec(),
    }
}

fn name(claimed: &Claimed) -> String {
    claimed.event.page_id.clone().unwrap_or_default()
}

/// Claims what `sink` has due at `now`; returns the claims sorted by name.
async fn claim(
    store: &Store,
    sink: SinkName,
    now: Millis,
) -> Result<Vec<Claimed>, Box<dyn std::error::Error + Send + Sync>> {
    let mut claimed = store.claim(sink, 100, now, LEASE).await?.deliveries;
    claimed.sort_by_key(name);
    Ok(claimed)
}

fn names(claimed: &[Claimed]) -> Vec<String> {
    claimed.iter().map(name).collect()
}

async fn depth_of(
    store: &Store,
    sink: SinkName,
) -> Result<(u64, u64, u64), Box<dyn std::error::Error + Send + Sync>> {
    let depth = store.depth().await?;
    let SinkDepth {
        queued,
        in_flight,
        dead,
    } = depth.get(&sink).cloned().unwrap_or_default();
    Ok((queued, in_flight, dead))
}

const BOT: SinkName = SinkName::Bot;
const DASHBOT: SinkName = SinkName::Dashbot;

fn delivered() -> Settle {
    Settle::Delivered { status: 200 }
}

fn dead(error: &str) -> Settle {
    Settle::Dead {
        status: Some(400),
        error: error.to_owned(),
        attempted: true,
    }
}

/// An event id is stored once: a repeat in the same call, in a later call, or from concurrent
/// callers is a duplicate and gets no deliveries.
pub(crate) async fn dedupe(store: &Store) -> TestResult {
    let report = store
        .enqueue(
            vec![
                event("a", Some("u"), &[BOT, DASHBOT]),
                event("a", Some("u"), &[BOT, DASHBOT]),
                event("b", Some("u"), &[BOT]),
            ],
            T0,
        )
        .await?;
    assert_eq!(
        report,
        EnqueueReport {
            stored: 2,
            duplicates: 1,
            deliveries: 3
        }
    );
    let again = store
        .enqueue(vec![event("a", Some("u"), &[BOT])], T0 + 1)
        .await?;
    assert_eq!(
        again,
        EnqueueReport {
            stored: 0,
            duplicates: 1,
            deliveries: 0
        }
    );
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..10 {
        let store = store.clone();
        tasks.spawn(async move {
            store
                .enqueue(vec![event("c", Some("w"), &[BOT])], T0 + 2)
                .await
        });
    }
    let (mut stored, mut duplicates) = (0, 0);
    while let Some(report) = tasks.join_next().await {
        let report = report??;
        stored += report.stored;
        duplicates += report.duplicates;
    }
    assert_eq!((stored, duplicates), (1, 9));
    assert_eq!(depth_of(store, BOT).await?, (3, 0, 0));
    assert_eq!(depth_of(store, DASHBOT).await?, (1, 0, 0));
    Ok(())
}

/// An outcome that arrives after its lease ran out and the delivery was claimed again changes
/// nothing, not the row and not its lane; the newer claim's outcome counts.
pub(crate) async fn outcome_only_under_its_lease(store: &Store) -> TestResult {
    store
        .enqueue(
            vec![
                event("first", Some("u"), &[BOT]),
                event("second", Some("u"), &[BOT]),
            ],
            T0,
        )
        .await?;
    let first = claim(store, BOT, T0).await?;
    assert_eq!(names(&first), ["first"]);
    // Leased: nobody else gets it before the lease ends.
    assert!(claim(store, BOT, T0 + 9_000).await?.is_empty());
    // The first attempt hangs past its lease; the delivery is claimed again.
    let second = claim(store, BOT, T0 + 11_000).await?;
    assert_eq!(names(&second), ["first"]);
    assert_eq!(second[0].id, first[0].id);
    for late in [
        Settle::Retry {
            due_at: T0 + 12_000,
            counted: true,
            status: Some(500),
            error: "HTTP 500".into(),
        },
        delivered(),
    ] {
        store.settle(&first[0], late, T0 + 12_000).await?;
        assert_eq!(depth_of(store, BOT).await?, (1, 1, 0));
        assert!(claim(store, BOT, T0 + 12_000).await?.is_empty());
    }
    store.settle(&second[0], delivered(), T0 + 12_000).await?;
    assert_eq!(depth_of(store, BOT).await?, (1, 0, 0));
    let next = claim(store, BOT, T0 + 12_000).await?;
    assert_eq!(names(&next), ["second"]);
    assert_eq!(next[0].attempts, 0);
    Ok(())
}

/// A renewed lease keeps the claim past its first end; the renewed claim's outcome counts and
/// the old lease's does not; a lost claim cannot be renewed.
pub(crate) async fn renew_extends_the_lease(store: &Store) -> TestResult {
    store
        .enqueue(vec![event("long", Some("u"), &[BOT])], T0)
        .await?;
    let claimed = claim(store, BOT, T0).await?;
    let [claimed] = claimed.as_slice() else {
        return Err("one claim expected".into());
    };
    let before = claimed.clone();
    let mut renewed = claimed.clone();
    assert!(store.renew(&mut renewed, T0 + 5_000, LEASE).await?);
    assert_eq!(renewed.lease_until, T0 + 15_000);
    assert!(claim(store, BOT, T0 + 11_000).await?.is_empty(), "renewed");
    // The old lease no longer identifies the claim.
    store.settle(&before, delivered(), T0 + 12_000).await?;
    assert_eq!(depth_of(store, BOT).await?, (0, 1, 0));
    let mut stale = before.clone();
    assert!(!store.renew(&mut stale, T0 + 12_000, LEASE).await?);
    assert_eq!(stale.lease_until, before.lease_until);
    store.settle(&renewed, delivered(), T0 + 12_000).await?;
    assert_eq!(depth_of(store, BOT).await?, (0, 0, 0));
    // Once the lease ran out and another claim took it, renewing fails.
    store
        .enqueue(vec![event("lost", Some("u"), &[BOT])], T0 + 20_000)
        .await?;
    let mut lost = claim(store, BOT, T0 + 20_000).await?;
    let again = claim(store, BOT, T0 + 31_000).await?;
    assert_eq!(names(&again), ["lost"]);
    assert!(!store.renew(&mut lost[0], T0 + 31_000, LEASE).await?);
    Ok(())
}

/// Only the head of a (sink, user) lane is claimed; the next goes when the head is delivered,
/// dead or skipped, not while it waits for a retry. Lane-less events and other users are not
/// held back.
pub(crate) async fn lanes_keep_their_order(store: &Store) -> TestResult {
    store
        .enqueue(
            vec![
                event("u1", Some("u"), &[BOT]),
                event("u2", Some("u"), &[BOT]),
                event("u3", Some("u"), &[BOT]),
                event("u4", Some("u"), &[BOT]),
                event("v1", Some("v"), &[BOT]),
                event("n1", None, &[BOT]),
                event("n2", None, &[BOT]),
            ],
            T0,
        )
        .await?;
    let heads = claim(store, BOT, T0).await?;
    assert_eq!(names(&heads), ["n1", "n2", "u1", "v1"]);
    assert_eq!(depth_of(store, BOT).await?, (3, 4, 0));
    let u1 = heads.iter().find(|c| name(c) == "u1").ok_or("u1")?;
    store
        .settle(
            u1,
            Settle::Retry {
                due_at: T0 + 5_000,
                counted: true,
                status: Some(503),
                error: "HTTP 503".into(),
            },
            T0 + 100,
        )
        .await?;
    assert!(claim(store, BOT, T0 + 1_000).await?.is_empty());
    let retried = claim(store, BOT, T0 + 5_000).await?;
    assert_eq!(names(&retried), ["u1"]);
    assert_eq!(retried[0].attempts, 1);
    store.settle(&retried[0], delivered(), T0 + 5_100).await?;
    let u2 = claim(store, BOT, T0 + 5_100).await?;
    assert_eq!(names(&u2), ["u2"]);
    store.settle(&u2[0], dead("HTTP 400"), T0 + 5_200).await?;
    let u3 = claim(store, BOT, T0 + 5_200).await?;
    assert_eq!(names(&u3), ["u3"]);
    store
        .settle(
            &u3[0],
            Settle::Skipped {
                reason: "user is paused".into(),
            },
            T0 + 5_300,
        )
        .await?;
    let u4 = claim(store, BOT, T0 + 5_300).await?;
    assert_eq!(names(&u4), ["u4"]);
    store.settle(&u4[0], delivered(), T0 + 5_400).await?;
    assert!(claim(store, BOT, T0 + 5_400).await?.is_empty());
    // v1, n1, n2 are still in flight; u2 is dead.
    assert_eq!(depth_of(store, BOT).await?, (0, 3, 1));
    // A new event of a lane whose head is gone is due at once.
    store
        .enqueue(vec![event("u5", Some("u"), &[BOT])], T0 + 6_000)
        .await?;
    assert_eq!(names(&claim(store, BOT, T0 + 6_000).await?), ["u5"]);
    Ok(())
}

/// Pauses are stored, listed, answered by `is_paused`, idempotent, and undone.
pub(crate) async fn pause(store: &Store) -> TestResult {
    assert!(!store.is_paused("p1"));
    store.set_paused("p1", true, T0).await?;
    store.set_paused("p1", true, T0 + 5).await?;
    store.set_paused("p2", true, T0 + 1).await?;
    assert!(store.is_paused("p1") && store.is_paused("p2"));
    assert!(!store.is_paused("p3"));
    assert_eq!(
        store.paused_users().await?,
        [("p1".to_owned(), T0), ("p2".to_owned(), T0 + 1)]
    );
    store.set_paused("p1", false, T0 + 2).await?;
    store.set_paused("p3", false, T0 + 2).await?;
    assert!(!store.is_paused("p1") && store.is_paused("p2"));
    assert_eq!(store.paused_users().await?, [("p2".to_owned(), T0 + 1)]);
    Ok(())
}

/// A replayed dead letter rejoins its lane at its original place (before the rows behind it),
/// starts its attempts and ttl again; letters of a sink not replayable stay dead and are
/// counted; a second replay finds nothing.
pub(crate) async fn replay(store: &Store) -> TestResult {
    store
        .enqueue(
            vec![
                event("u1", Some("u"), &[BOT, DASHBOT]),
                event("u2", Some("u"), &[BOT]),
                event("u3", Some("u"), &[BOT]),
                event("n1", None, &[BOT]),
            ],
            T0,
        )
        .await?;
    let heads = claim(store, BOT, T0).await?;
    assert_eq!(names(&heads), ["n1", "u1"]);
    for head in &heads {
        store.settle(head, dead("HTTP 400"), T0 + 10).await?;
    }
    let dashbot = claim(store, DASHBOT, T0).await?;
    store.settle(&dashbot[0], dead("HTTP 401"), T0 + 10).await?;
    let u2 = claim(store, BOT, T0 + 20).await?;
    assert_eq!(names(&u2), ["u2"]);

    let t1 = T0 + 1_000;
    let outcome = store
        .replay(DeadLetterFilter::default(), &[BOT], t1)
        .await?;
    assert_eq!(outcome.replayed, 2);
    assert_eq!(
        outcome.left_dead,
        BTreeMap::from([("dashbot".to_owned(), 1)])
    );
    // The lane-less letter goes at once; u1 waits behind u2, the lane's head.
    let now = claim(store, BOT, t1).await?;
    assert_eq!(names(&now), ["n1"]);
    assert_eq!(now[0].attempts, 0);
    assert_eq!(now[0].ttl_from, t1);
    store.settle(&u2[0], delivered(), t1 + 10).await?;
    // u1 comes back before u3: its original place.
    let next = claim(store, BOT, t1 + 10).await?;
    assert_eq!(names(&next), ["u1"]);
    assert_eq!((next[0].attempts, next[0].ttl_from), (0, t1));
    store.settle(&next[0], delivered(), t1 + 20).await?;
    assert_eq!(names(&claim(store, BOT, t1 + 20).await?), ["u3"]);

    let letters = store.dead_letters(DeadLetterFilter::default()).await?;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].sink, "dashbot");
    let again = store
        .replay(DeadLetterFilter::default(), &[BOT], t1 + 30)
        .await?;
    assert_eq!(again.replayed, 0);
    // With the sink replayable, the letter goes back too.
    let dashbot_replay = store
        .replay(
            DeadLetterFilter {
                sink: Some(DASHBOT),
                ..DeadLetterFilter::default()
            },
            &[BOT, DASHBOT],
            t1 + 40,
        )
        .await?;
    assert_eq!(dashbot_replay.replayed, 1);
    assert!(dashbot_replay.left_dead.is_empty());
    assert_eq!(names(&claim(store, DASHBOT, t1 + 40).await?), ["u1"]);
    Ok(())
}

/// The purge removes finished rows past their retention and events past the dedupe window that
/// no delivery refers to; open deliveries and their events stay; a purged event id is new
/// again.
pub(crate) async fn purge(store: &Store) -> TestResult {
    store
        .enqueue(
            vec![
                event("done", Some("a"), &[BOT]),
                event("open", Some("b"), &[BOT]),
                event("letter", Some("c"), &[BOT]),
                event("skipped", Some("d"), &[BOT]),
            ],
            T0,
        )
        .await?;
    for claimed in claim(store, BOT, T0).await? {
        let outcome = match name(&claimed).as_str() {
            "done" => delivered(),
            "letter" => dead("HTTP 400"),
            "skipped" => Settle::Skipped {
                reason: "not for this sink".into(),
            },
            _ => continue,
        };
        store.settle(&claimed, outcome, T0 + 10).await?;
    }
    let retention = Retention {
        delivered: Duration::from_secs(86_400),
        dead: Duration::from_secs(3 * 86_400),
        dedupe_window: Duration::from_secs(86_400),
    };
    // Nothing is old enough yet.
    assert_eq!(store.purge(retention, T0 + 100).await?, Default::default());
    let purged = store.purge(retention, T0 + 2 * DAY).await?;
    assert_eq!((purged.deliveries, purged.events), (2, 2));
    assert_eq!(depth_of(store, BOT).await?, (0, 1, 1));
    let purged = store.purge(retention, T0 + 4 * DAY).await?;
    assert_eq!((purged.deliveries, purged.events), (1, 1));
    assert!(
        store
            .dead_letters(DeadLetterFilter::default())
            .await?
            .is_empty()
    );
    // Forgotten ids are new again; the open one is still known.
    let report = store
        .enqueue(
            vec![
                event("done", Some("a"), &[BOT]),
                event("open", Some("b"), &[BOT]),
            ],
            T0 + 4 * DAY,
        )
        .await?;
    assert_eq!((report.stored, report.duplicates), (1, 1));
    Ok(())
}

/// Depth counts queued (waiting, due, retrying), in flight and dead per sink.
pub(crate) async fn depth(store: &Store) -> TestResult {
    assert!(
        store
            .depth()
            .await?
            .values()
            .all(|d| d.queued + d.in_flight + d.dead == 0)
    );
    store
        .enqueue(
            vec![
                event("a1", Some("a"), &[BOT, DASHBOT]),
                event("a2", Some("a"), &[BOT]),
                event("b1", Some("b"), &[BOT]),
            ],
            T0,
        )
        .await?;
    assert_eq!(depth_of(store, BOT).await?, (3, 0, 0));
    assert_eq!(depth_of(store, DASHBOT).await?, (1, 0, 0));
    let heads = claim(store, BOT, T0).await?;
    assert_eq!(depth_of(store, BOT).await?, (1, 2, 0));
    let b1 = heads.iter().find(|c| name(c) == "b1").ok_or("b1")?;
    store.settle(b1, dead("HTTP 404"), T0 + 1).await?;
    assert_eq!(depth_of(store, BOT).await?, (1, 1, 1));
    Ok(())
}

/// The dead-letter list: every field, filters by sink, user, time, ids, the `after` cursor, the
/// limit, and newest first.
pub(crate) async fn dead_letter_listing(store: &Store) -> TestResult {
    let users = ["x", "y", "z", "x2"];
    let mut events = Vec::new();
    for user in users {
        events.push(event(&format!("{user}-bot"), Some(user), &[BOT, DASHBOT]));
    }
    store.enqueue(events, T0).await?;
    // Dead at T0 + 10·n, in the order of the users; dashbot's later.
    for (sink, offset) in [(BOT, 0), (DASHBOT, 100)] {
        let mut claimed = store.claim(sink, 100, T0, LEASE).await?.deliveries;
        claimed.sort_by_key(|c| {
            users
                .iter()
                .position(|user| c.event.user_id.as_deref() == Some(user))
        });
        for (n, delivery) in claimed.iter().enumerate() {
            let at = T0 + offset + 10 * Millis::try_from(n)?;
            store
                .settle(delivery, dead(&format!("HTTP 400 #{n}")), at)
                .await?;
        }
    }
    let all = store.dead_letters(DeadLetterFilter::default()).await?;
    assert_eq!(all.len(), 8);
    assert!(
        all.windows(2).all(|pair| pair[0].id < pair[1].id),
        "oldest first"
    );
    let letter = all
        .iter()
        .find(|letter| letter.sink == "bot" && letter.user.as_deref() == Some("y"))
        .ok_or("y's bot letter")?;
    assert_eq!(letter.kind, "message");
    assert_eq!(letter.event_id, EventId::derive(&[b"y-bot"]).as_str());
    assert_eq!(letter.attempts, 1);
    assert_eq!(letter.last_status, Some(400));
    assert_eq!(letter.last_error.as_deref(), Some("HTTP 400 #1"));
    assert_eq!(
        (
            letter.first_attempt_at,
            letter.last_attempt_at,
            letter.dead_at
        ),
        (Some(T0 + 10), Some(T0 + 10), T0 + 10)
    );
    let list = |filter: DeadLetterFilter| async move {
        store.dead_letters(filter).await.map(|letters| {
            letters
                .into_iter()
                .map(|letter| (letter.sink, letter.user.unwrap_or_default()))
                .collect::<Vec<_>>()
        })
    };
    let pair = |sink: &str, user: &str| (sink.to_owned(), user.to_owned());
    let by_sink = list(DeadLetterFilter {
        sink: Some(DASHBOT),
        ..DeadLetterFilter::default()
    })
    .await?;
    assert_eq!(by_sink.len(), 4);
    assert!(by_sink.iter().all(|(sink, _)| sink == "dashbot"));
    assert_eq!(
        list(DeadLetterFilter {
            user: Some("x".into()),
            ..DeadLetterFilter::default()
        })
        .await?,
        [pair("bot", "x"), pair("dashbot", "x")]
    );
    assert_eq!(
        list(DeadLetterFilter {
            sink: Some(BOT),
            since: Some(T0 + 20),
            ..DeadLetterFilter::default()
        })
        .await?,
        [pair("bot", "z"), pair("bot", "x2")]
    );
    let ids = vec![all[1].id, all[5].id];
    let by_ids = store
        .dead_letters(DeadLetterFilter {
            ids: Some(ids.clone()),
            ..DeadLetterFilter::default()
        })
        .await?;
    assert_eq!(by_ids.iter().map(|l| l.id).collect::<Vec<_>>(), ids);
    assert!(
        store
            .dead_letters(DeadLetterFilter {
                ids: Some(Vec::new()),
                ..DeadLetterFilter::default()
            })
            .await?
            .is_empty()
    );
    // Paging with `after`: three pages of 3, 3, 2 cover everything once.
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = store
            .dead_letters(DeadLetterFilter {
                after,
                limit: Some(3),
                ..DeadLetterFilter::default()
            })
            .await?;
        let Some(last) = page.last() else { break };
        after = Some(last.id);
        seen.extend(page.iter().map(|letter| letter.id));
    }
    assert_eq!(seen, all.iter().map(|l| l.id).collect::<Vec<_>>());
    let newest = store
        .dead_letters(DeadLetterFilter {
            newest_first: true,
            limit: Some(2),
            ..DeadLetterFilter::default()
        })
        .await?;
    assert_eq!(
        newest.iter().map(|l| l.dead_at).collect::<Vec<_>>(),
        [T0 + 130, T0 + 120]
    );
    Ok(())
}

/// A delivery whose ttl ran out before its next attempt keeps, as a dead letter, the attempt
/// made, its status and its error after the reason.
pub(crate) async fn dead_without_an_attempt_keeps_the_last_answer(store: &Store) -> TestResult {
    store
        .enqueue(vec![event("ttl", Some("u"), &[BOT])], T0)
        .await?;
    let first = claim(store, BOT, T0).await?;
    store
        .settle(
            &first[0],
            Settle::Retry {
                due_at: T0 + 1_000,
                counted: true,
                status: Some(503),
                error: "HTTP 503: busy".into(),
            },
            T0,
        )
        .await?;
    let later = T0 + 10_000_000;
    let second = claim(store, BOT, later).await?;
    store
        .settle(
            &second[0],
            Settle::Dead {
                status: None,
                error: "ttl of 1h ran out before this attempt".into(),
                attempted: false,
            },
            later,
        )
        .await?;
    let letters = store.dead_letters(DeadLetterFilter::default()).await?;
    let [letter] = letters.as_slice() else {
        return Err(format!("{} dead letters", letters.len()).into());
    };
    assert_eq!(letter.attempts, 1);
    assert_eq!(letter.last_status, Some(503));
    assert_eq!(
        letter.last_error.as_deref(),
        Some("ttl of 1h ran out before this attempt; last error: HTTP 503: busy")
    );
    assert_eq!(letter.last_attempt_at, Some(T0));
    assert_eq!(letter.dead_at, later);
    Ok(())
}

/// A store that takes writes says so.
pub(crate) async fn probe(store: &Store) -> TestResult {
    assert!(store.is_writable(T0).await);
    assert!(store.is_writable(T0 + 1).await);
    Ok(())
}

/// An attempt whose claim ran out unsettled (the relay stopped during it) counts as failed when
/// the delivery is claimed again; the claim that would hand it out a `CRASH_LIMIT`-th time
/// dead-letters it as `crashed the relay` instead, and its lane moves on. A claim given back by
/// a shutdown (`release`) is due again at once and counts nothing.
pub(crate) async fn crashes_count_and_a_crash_loop_is_dead(store: &Store) -> TestResult {
    store
        .enqueue(
            vec![
                event("poison", Some("u"), &[BOT]),
                event("next", Some("u"), &[BOT]),
            ],
            T0,
        )
        .await?;
    let lease = crate::clock::millis(LEASE);
    let mut now = T0;
    for crashes in 0..super::CRASH_LIMIT {
        let claimed = claim(store, BOT, now).await?;
        assert_eq!(names(&claimed), ["poison"], "claim after {crashes} crashes");
        assert_eq!(claimed[0].attempts, crashes, "each cut-off attempt counts");
        // The relay dies during the attempt: nothing is settled, the lease runs out.
        now += lease + 1;
    }
    assert!(
        claim(store, BOT, now).await?.is_empty(),
        "dead, not handed out"
    );
    let letters = store.dead_letters(DeadLetterFilter::default()).await?;
    let [letter] = letters.as_slice() else {
        return Err(format!("{} dead letters", letters.len()).into());
    };
    assert!(
        letter
            .last_error
            .as_deref()
            .is_some_and(|error| error.starts_with(super::CRASHED)),
        "{letter:?}"
    );
    assert_eq!(letter.attempts, super::CRASH_LIMIT);
    // The lane moved on; a shutdown gives its claim back without counting.
    let next = claim(store, BOT, now).await?;
    assert_eq!(names(&next), ["next"]);
    store.release(next[0].claim_ref(), now + 1).await?;
    let again = claim(store, BOT, now + 1).await?;
    assert_eq!(names(&again), ["next"]);
    assert_eq!(again[0].attempts, 0, "a released claim counts nothing");
    store.settle(&again[0], delivered(), now + 2).await?;
    // A replay (the operator fixed what crashed the relay) starts its count over too: the
    // letter goes out again instead of dying on its first claim.
    let replayed = store
        .replay(DeadLetterFilter::default(), &[BOT], now + 3)
        .await?;
    assert_eq!(replayed.replayed, 1, "{replayed:?}");
    let retried = claim(store, BOT, now + 3).await?;
    assert_eq!(names(&retried), ["poison"], "handed out, not dead again");
    assert_eq!(retried[0].attempts, 0);
    Ok(())
}

/// Calls `$run!(test, …)` with every contract test, so that each backend runs the same list.
macro_rules! every_contract_test {
    ($run:ident) => {
        $run!(
            dedupe,
            outcome_only_under_its_lease,
            renew_extends_the_lease,
            lanes_keep_their_order,
            pause,
            replay,
            purge,
            depth,
            dead_letter_listing,
            dead_without_an_attempt_keeps_the_last_answer,
            crashes_count_and_a_crash_loop_is_dead,
            probe,
        );
    };
}
pub(crate) use every_contract_test;

/// Runs the contract on a temporary embedded store.
mod sqlite {
    use super::TestResult;
    use crate::store::Store;

    macro_rules! on_sqlite {
        ($($test:ident),* $(,)?) => {$(
            #[tokio::test]
            async fn $test() -> TestResult {
                let dir = tempfile::tempdir()?;
                let store = Store::open_sqlite(&dir.path().join("store.db"), None)?;
                super::$test(&store).await
            }
        )*};
    }

    crate::store::contract::every_contract_test!(on_sqlite);
}
