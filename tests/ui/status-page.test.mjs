// The status page in a real browser (Chromium through playwright-core). Run by tests/it/ui.rs,
// which starts the relays and mock sinks and passes their URLs in the environment:
//   BOTRELAY_UI_URL        the admin listener of a relay without admin.token
//   BOTRELAY_UI_SINKS      its enabled sinks, comma-separated
//   BOTRELAY_UI_SEEDED     how many dead letters of page_activities it holds
//   BOTRELAY_UI_CONTROL    the control server: the mock bot's answers, webhooks to the relay
//   BOTRELAY_UI_TOKEN_URL  the admin listener of a relay with admin.token = BOTRELAY_UI_TOKEN
//   BOTRELAY_CHROMIUM      the browser (default /usr/bin/chromium)
//   BOTRELAY_UI_SCREENSHOT optional: where to write a PNG of the page with its data
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

function env(name) {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set: run these tests through cargo test (tests/it/ui.rs)`);
  return value;
}

const RELAY = env('BOTRELAY_UI_URL');
const SINKS = env('BOTRELAY_UI_SINKS').split(',');
const SEEDED = Number(env('BOTRELAY_UI_SEEDED'));
const CONTROL = env('BOTRELAY_UI_CONTROL');
const GUARDED = env('BOTRELAY_UI_TOKEN_URL');
const TOKEN = env('BOTRELAY_UI_TOKEN');
const WAIT = { timeout: 20_000 };

let profile;
let context;

before(async () => {
  profile = mkdtempSync(join(tmpdir(), 'botrelay-ui-'));
  context = await chromium.launchPersistentContext(profile, {
    executablePath: process.env.BOTRELAY_CHROMIUM || '/usr/bin/chromium',
    headless: true,
    viewport: { width: 1280, height: 900 },
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
      '--disable-component-update', '--disable-sync', '--no-first-run'],
  });
});

after(async () => {
  await context?.close();
  if (profile) rmSync(profile, { recursive: true, force: true });
});

async function control(method, path) {
  const response = await fetch(CONTROL + path, { method });
  assert.equal(response.status, 200, `${method} ${path}`);
  return response.json();
}

async function until(what, check, within = 20_000) {
  const deadline = Date.now() + within;
  for (;;) {
    if (await check()) return;
    if (Date.now() > deadline) throw new Error(`not within ${within} ms: ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

// A new tab on `base` (polling every second), recording what it requests and every script
// error or console error (a CSP violation is one); `finish` checks them and closes it.
async function open(base, path = '/?refresh=1') {
  const page = await context.newPage();
  const requests = [];
  const problems = [];
  page.on('request', (request) => requests.push(request.url()));
  page.on('pageerror', (error) => problems.push('page error: ' + error.message));
  page.on('console', (message) => {
    // A 401 before the token is given is expected; Chromium logs every failed load.
    if (message.type() === 'error' && !/status of 401/.test(message.text())) problems.push('console: ' + message.text());
  });
  page.on('dialog', (dialog) => dialog.accept());
  await page.goto(base + path);
  page.finish = async () => {
    const origin = new URL(base).origin;
    const outside = requests.filter((url) => new URL(url).origin !== origin);
    assert.deepEqual(outside, [], 'the page requested something from elsewhere');
    assert.deepEqual(problems, []);
    await page.close();
  };
  return page;
}

const sink = (page, name) => page.locator(`article.sink[data-sink="${name}"]`);
const rows = (page) => page.locator('#dl-table tbody tr');

test('every enabled sink is listed with its state, figures and charts', async () => {
  const page = await open(RELAY);
  for (const name of SINKS) {
    await sink(page, name).waitFor(WAIT);
    assert.equal(await sink(page, name).getAttribute('data-state'), 'ok', name);
    assert.match(await sink(page, name).locator('.state').innerText(), /ok/i);
    assert.equal(await sink(page, name).locator('svg.chart').count(), 2, `${name}: two charts`);
  }
  // The sink with the seeded dead letters is not enabled: listed as such, with its count.
  const seeded = sink(page, 'page_activities');
  assert.equal(await seeded.getAttribute('data-state'), 'disabled');
  assert.equal(await seeded.locator('[data-figure="dead"] b').innerText(), String(SEEDED));
  assert.equal(await page.title(), 'botrelay status');
  await page.finish();
});

test('10,000 dead letters are paged quickly with `after`', async () => {
  const page = await open(RELAY);
  await page.selectOption('#dl-sink', 'page_activities');
  await page.click('#dl-filter button[type="submit"]');
  await until('the first page', async () => (await rows(page).count()) === 100);
  const firstIds = await rows(page).evaluateAll((trs) => trs.map((tr) => Number(tr.dataset.id)));
  assert.ok(await page.isDisabled('#dl-prev'));
  let started = Date.now();
  await page.click('#dl-next');
  await until('the second page', async () => {
    const first = await rows(page).first().getAttribute('data-id');
    return Number(first) > firstIds[firstIds.length - 1];
  });
  const took = Date.now() - started;
  assert.ok(took < 3000, `the next page took ${took} ms`);
  const secondIds = await rows(page).evaluateAll((trs) => trs.map((tr) => Number(tr.dataset.id)));
  assert.equal(secondIds.length, 100);
  assert.ok(secondIds.every((id) => id > Math.max(...firstIds)), 'page 2 follows page 1');
  // A bigger page of 1000 renders quickly too.
  started = Date.now();
  await page.selectOption('#dl-limit', '1000');
  await page.click('#dl-filter button[type="submit"]');
  await until('a page of 1000', async () => (await rows(page).count()) === 1000);
  assert.ok(Date.now() - started < 5000, `a page of 1000 took ${Date.now() - started} ms`);
  await page.click('#dl-next');
  await until('page 2 of 1000', async () => Number(await rows(page).first().getAttribute('data-id')) > Math.max(...firstIds) + 900);
  await page.click('#dl-first');
  await until('back to the first page', async () => Number(await rows(page).first().getAttribute('data-id')) === firstIds[0]);

  // A selection of letters of a sink that is not enabled is left dead, and the page says so.
  await page.selectOption('#dl-limit', '100');
  await page.click('#dl-filter button[type="submit"]');
  await until('the first page again', async () => (await rows(page).count()) === 100);
  await rows(page).nth(0).locator('input.pick').check();
  await rows(page).nth(1).locator('input.pick').check();
  assert.equal(await page.locator('#dl-replay-selected').innerText(), 'Replay selected (2)');
  await page.click('#dl-replay-selected');
  await page.locator('#dl-message', { hasText: 'left dead (sink not enabled): 2 of page_activities' }).waitFor(WAIT);
  await page.finish();
});

test('a dead letter appears, a click on replay delivers it and it leaves the table', async () => {
  const page = await open(RELAY);
  await control('POST', '/bot/status/400');
  assert.equal((await control('POST', '/messages/ui-dead-user/mid-ui-dead')).status, 200);
  await page.fill('#dl-user', 'ui-dead-user');
  await page.click('#dl-filter button[type="submit"]');
  const row = rows(page).filter({ hasText: 'ui-dead-user' });
  await row.waitFor(WAIT);
  assert.equal(await rows(page).count(), 1);
  assert.match(await row.innerText(), /bot\s+message\s+ui-dead-user/);
  assert.match(await row.innerText(), /400/);
  await control('POST', '/bot/status/200');
  await row.locator('button.replay').click();
  await page.locator('#dl-message', { hasText: 'Replayed 1' }).waitFor(WAIT);
  await page.locator('#dl-empty').waitFor({ state: 'visible', ...WAIT });
  assert.equal(await rows(page).count(), 0);
  await until('the bot receives the replayed message', async () => {
    const { replied } = await control('GET', '/bot/received/mid-ui-dead');
    return replied.join() === '400,200';
  });

  // Everything a filter matches: two letters of one user, one click (and a confirmation).
  await control('POST', '/bot/status/400');
  await control('POST', '/messages/ui-many/mid-ui-many-1');
  await control('POST', '/messages/ui-many/mid-ui-many-2');
  await page.fill('#dl-user', 'ui-many');
  await page.click('#dl-filter button[type="submit"]');
  await until('two letters of ui-many', async () => (await rows(page).count()) === 2);
  await control('POST', '/bot/status/200');
  await page.click('#dl-replay-matching');
  await page.locator('#dl-message', { hasText: 'Replayed 2' }).waitFor(WAIT);
  await until('the table is empty', async () => (await rows(page).count()) === 0);
  await page.finish();
});

test('an outage of the bot shows as an outage and clears when it answers again', async () => {
  const page = await open(RELAY);
  await sink(page, 'bot').waitFor(WAIT);
  await control('POST', '/bot/status/503');
  for (const user of ['ui-out-1', 'ui-out-2', 'ui-out-3']) {
    for (const n of [1, 2]) await control('POST', `/messages/${user}/mid-${user}-${n}`);
  }
  await page.locator('article.sink[data-sink="bot"][data-state="outage"]').waitFor(WAIT);
  const bot = sink(page, 'bot');
  assert.match(await bot.locator('h3').innerText(), /outage\s+since/i);
  assert.match(await bot.locator('.last-error').innerText(), /503/);
  // The other sink goes on.
  assert.equal(await sink(page, 'dashbot').getAttribute('data-state'), 'ok');
  await control('POST', '/bot/status/200');
  await page.locator('article.sink[data-sink="bot"][data-state="ok"]').waitFor(WAIT);
  await until('the held messages are delivered', async () => {
    const { replied } = await control('GET', '/bot/received/mid-ui-out-3-2');
    return replied.includes(200);
  });
  await page.finish();
});

test('paused users are listed, paused and unpaused', async () => {
  const page = await open(RELAY);
  await page.fill('#pause-user', 'ui-paused-user');
  await page.click('#pause-form button[type="submit"]');
  const row = page.locator('#paused-table tr[data-user="ui-paused-user"]');
  await row.waitFor(WAIT);
  await row.locator('button.unpause').click();
  await row.waitFor({ state: 'detached', ...WAIT });
  assert.ok(await page.locator('#paused-empty').isVisible());
  await page.finish();
});

test('with a token set the page asks for it and shows nothing before', async () => {
  const page = await open(GUARDED);
  const answers = [];
  page.on('response', (response) => {
    if (new URL(response.url()).pathname.startsWith('/admin/')) answers.push(response.status());
  });
  await page.locator('#login').waitFor({ state: 'visible', ...WAIT });
  const nothingShown = async () => {
    assert.ok(await page.locator('#app').isHidden());
    assert.equal(await page.locator('#sinks').innerHTML(), '');
    assert.equal(await page.locator('#dl-table tbody').innerHTML(), '');
    assert.equal(await page.locator('#dl-sink option').count(), 1);
    const text = await page.locator('body').innerText();
    assert.doesNotMatch(text, /dashbot|queued|in flight|Dead letters|Paused users/);
  };
  await nothingShown();
  // A wrong token: refused, still nothing.
  await page.fill('#token', 'not-the-token');
  await page.click('#login-form button[type="submit"]');
  await page.locator('#login-error', { hasText: 'refused' }).waitFor(WAIT);
  await nothingShown();
  assert.ok(answers.length > 0 && answers.every((status) => status === 401), `answers: ${answers}`);
  // The token: the page shows the relay, and keeps the token in this tab only.
  await page.fill('#token', TOKEN);
  await page.click('#login-form button[type="submit"]');
  await sink(page, 'bot').waitFor(WAIT);
  assert.equal(await page.evaluate(() => sessionStorage.getItem('botrelay.admin.token')), TOKEN);
  assert.ok(!(await page.content()).includes(TOKEN), 'the token is not in the page');
  assert.equal(await page.locator('#token').inputValue(), '');
  await page.reload();
  await sink(page, 'bot').waitFor(WAIT);
  // Forget it: back to the form, nothing shown.
  await page.click('#forget');
  await page.locator('#login').waitFor({ state: 'visible', ...WAIT });
  await nothingShown();
  assert.equal(await page.evaluate(() => sessionStorage.getItem('botrelay.admin.token')), null);
  await page.finish();
});

test('a screenshot of the page with its data', { skip: !process.env.BOTRELAY_UI_SCREENSHOT }, async () => {
  const page = await open(RELAY);
  await page.setViewportSize({ width: 1200, height: 1040 });
  await control('POST', '/bot/status/400');
  await control('POST', '/messages/1234567890123456/mid-ui-shot-1');
  await control('POST', '/messages/2345678901234567/mid-ui-shot-2');
  await page.selectOption('#dl-sink', 'bot');
  await page.click('#dl-filter button[type="submit"]');
  await until('two dead letters of the bot', async () => (await rows(page).count()) === 2);
  await control('POST', '/bot/status/200');
  await page.fill('#pause-user', '6543210987654321');
  await page.click('#pause-form button[type="submit"]');
  await page.locator('#paused-table tbody tr').first().waitFor(WAIT);
  await sink(page, 'bot').locator('svg.chart rect').first().waitFor(WAIT);
  await page.evaluate(() => window.scrollTo(0, 0));
  await page.screenshot({ path: process.env.BOTRELAY_UI_SCREENSHOT, fullPage: true });
  await page.locator('#paused-table button.unpause').click();
  await page.click('#dl-replay-matching');
  await until('the table is empty', async () => (await rows(page).count()) === 0);
  await page.finish();
});
