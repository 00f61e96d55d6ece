//! Outages are not dead letters (SPEC §4): a bot that fails as a whole (a 503 storm, connection
//! refused, a 404 while it is redeployed) for several users gets its deliveries held, in order,
//! without spending attempts, and everything arrives once it answers again; an event the sink
//! refuses on its own is still dead-lettered at once; `Retry-After` is capped at `max_backoff`.

use crate::support::*;
use botrelay::admin::api::SinkView;
use std::collections::BTreeMap;
use std::time::Duration;

const PAGE: &str = "682498302938465";
const USERS: [&str; 4] = ["U1", "U2", "U3", "U4"];
const MESSAGES_PER_USER: usize = 3;
const WAIT: Duration = Duration::from_secs(15);

fn bot_table(url: &str) -> String {
    format!("[bot]\nurl = \"{url}\"\nbackoff = \"50ms\"\nmax_backoff = \"200ms\"\n")
}

async fn sinks(app: &TestApp) -> TestResult<Vec<SinkView>> {
    Ok(app
        .http
        .get(format!("{}/admin/sinks", app.admin_url))
        .send()
        .await?
        .json()
        .await?)
}

async fn bot_view(app: &TestApp) -> TestResult<SinkView> {
    sinks(app)
        .await?
        .into_iter()
        .find(|sink| sink.sink == "bot")
        .ok_or_else(|| "no bot in /admin/sinks".into())
}

/// Posts every user's messages, in order, user after user.
async fn post_messages(app: &TestApp) -> TestResult {
    for n in 0..MESSAGES_PER_USER {
        for user in USERS {
            let mid = format!("m-{user}-{n}");
            let body = text_message(PAGE, user, &mid, "hi", 1_764_000_000_000 + n as i64);
            assert_eq!(app.post_webhook(&body).await?.status(), 200);
        }
    }
    Ok(())
}

/// Waits until the bot sink reports an outage.
async fn wait_for_outage(app: &TestApp) -> TestResult<SinkView> {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let view = bot_view(app).await?;
        if view.state == "outage" {
            return Ok(view);
        }
        if std::time::Instant::now() > deadline {
            return Err(format!("no outage: {view:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The mids each user's deliveries reached the bot with (answered 200), in arrival order.
fn delivered_by_user(bot: &MockSink) -> BTreeMap<String, Vec<String>> {
    let mut by_user: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for request in bot
        .received()
        .iter()
        .filter(|request| request.replied == 200)
    {
        let item = &request.json()["entry"][0]["messaging"][0];
        let user = item["sender"]["id"].as_str().unwrap_or_default().to_owned();
        let mid = item["message"]["mid"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        by_user.entry(user).or_default().push(mid);
    }
    by_user
}

/// The outage, then the recovery: nothing dead, everything delivered once, in each user's order,
/// and the sink's state back to `ok`.
async fn recovers_in_order(app: &TestApp, bot: &MockSink) -> TestResult {
    let total = USERS.len() * MESSAGES_PER_USER;
    app.wait_for_deliveries(|delivery| delivery.state == "delivered", total, WAIT)
        .await?;
    assert!(app.store.dead_letters(Default::default()).await?.is_empty());
    let by_user = delivered_by_user(bot);
    for user in USERS {
        let expected: Vec<String> = (0..MESSAGES_PER_USER)
            .map(|n| format!("m-{user}-{n}"))
            .collect();
        assert_eq!(by_user.get(user), Some(&expected), "{user}");
    }
    let view = bot_view(app).await?;
    assert_eq!((view.state.as_str(), view.outage_since), ("ok", None));
    Ok(())
}

/// The attempts the deliveries have spent (counted failures), all together.
async fn spent(app: &TestApp) -> TestResult<u32> {
    Ok(app
        .deliveries()
        .await?
        .iter()
        .map(|delivery| delivery.attempts - delivery.throttled)
        .sum())
}

/// While the sink is down its deliveries are held: they spend no attempts (their probes are
/// uncounted; the count must not move for half a second), and none is dead-lettered.
async fn held_while_down(app: &TestApp) -> TestResult {
    let before = spent(app).await?;
    let until = std::time::Instant::now() + Duration::from_millis(500);
    while std::time::Instant::now() < until {
        assert_eq!(spent(app).await?, before, "attempts spent in an outage");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(app.store.dead_letters(Default::default()).await?.is_empty());
    Ok(())
}

#[tokio::test]
async fn a_503_storm_dead_letters_nothing_and_everything_arrives_in_order() -> TestResult {
    let bot = MockSink::start().await?;
    bot.set_default(Reply::status(503));
    let app = spawn_app(&bot_table(&bot.url("/webhook"))).await?;
    post_messages(&app).await?;
    let view = wait_for_outage(&app).await?;
    assert!(view.outage_since.is_some(), "{view:?}");
    // Held: probes go at the backoff pace, one at a time, not a retry per delivery.
    let before = bot.received().len();
    assert_stays("one probe at a time", Duration::from_millis(400), || {
        bot.received().len() <= before + 4
    })
    .await?;
    held_while_down(&app).await?;
    bot.set_default(Reply::status(200));
    recovers_in_order(&app, &bot).await?;
    app.stop().await
}

#[tokio::test]
async fn a_bot_that_refuses_connections_dead_letters_nothing() -> TestResult {
    let addr = refused_address().await?;
    let app = spawn_app(&bot_table(&format!("http://{addr}/webhook"))).await?;
    post_messages(&app).await?;
    wait_for_outage(&app).await?;
    held_while_down(&app).await?;
    let bot = MockSink::start_at(addr).await?;
    recovers_in_order(&app, &bot).await?;
    app.stop().await
}

/// A redeploy answers 404 for a while: for several users that is the sink, not the events.
#[tokio::test]
async fn a_404_redeploy_dead_letters_nothing() -> TestResult {
    let bot = MockSink::start().await?;
    bot.set_default(Reply::status(404));
    let app = spawn_app(&bot_table(&bot.url("/webhook"))).await?;
    post_messages(&app).await?;
    wait_for_outage(&app).await?;
    held_while_down(&app).await?;
    bot.set_default(Reply::status(200));
    recovers_in_order(&app, &bot).await?;
    app.stop().await
}

/// One event the bot refuses (400) while it takes every other: dead at once, after one attempt,
/// and the sink stays `ok`.
#[tokio::test]
async fn a_permanent_400_amid_successes_is_dead_lettered_at_once() -> TestResult {
    let bot = MockSink::start().await?;
    bot.decide(|request| {
        request
            .text()
            .contains("m-U2-1")
            .then(|| Reply::status(400))
    });
    let app = spawn_app(&bot_table(&bot.url("/webhook"))).await?;
    post_messages(&app).await?;
    let total = USERS.len() * MESSAGES_PER_USER;
    app.wait_for_deliveries(|delivery| delivery.state == "delivered", total - 1, WAIT)
        .await?;
    let letters = app.store.dead_letters(Default::default()).await?;
    let [letter] = letters.as_slice() else {
        return Err(format!("{} dead letters", letters.len()).into());
    };
    assert_eq!(
        (letter.user.as_deref(), letter.attempts, letter.last_status),
        (Some("U2"), 1, Some(400))
    );
    assert_eq!(bot_view(&app).await?.state, "ok");
    app.stop().await
}

/// `Retry-After: 3600` with `max_backoff = 2s`: the next attempt comes after about 2 s.
#[tokio::test]
async fn retry_after_is_capped_at_max_backoff() -> TestResult {
    let bot = MockSink::start().await?;
    bot.script([Reply::status(503).with_header("retry-after", "3600")]);
    let app = spawn_app(&format!(
        "[bot]\nurl = \"{}\"\nbackoff = \"100ms\"\nmax_backoff = \"2s\"\n",
        bot.url("/webhook")
    ))
    .await?;
    let body = text_message(PAGE, "U1", "m-capped", "hi", 1_764_000_000_000);
    assert_eq!(app.post_webhook(&body).await?.status(), 200);
    let received = bot.wait_for(2, Duration::from_secs(10)).await?;
    let gap = received[1].at.duration_since(received[0].at);
    assert!(
        gap >= Duration::from_millis(1_900) && gap < Duration::from_secs(4),
        "second attempt after {gap:?}"
    );
    app.stop().await
}
