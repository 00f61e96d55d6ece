// botrelay's status page: reads the admin API of the relay that serves it, every few seconds.
// No framework, no outside request; every value from the API goes into the page as text.
'use strict';
(() => {
  const $ = (id) => document.getElementById(id);
  const TOKEN_KEY = 'botrelay.admin.token';
  const query = new URLSearchParams(location.search);
  // `?refresh=2` polls every 2 s (1 to 60; default 5).
  const POLL_MS = Math.min(60, Math.max(1, Number(query.get('refresh')) || 5)) * 1000;
  const SVG = 'http://www.w3.org/2000/svg';

  let token = sessionStorage.getItem(TOKEN_KEY) || '';
  let timer = null;
  let busy = false;
  // Bumped when the token is forgotten: answers to requests made before are dropped.
  let generation = 0;
  const letters = { afters: [], after: null, selected: new Set(), ids: [] };

  class Unauthorized extends Error {}

  async function api(method, path, body) {
    const headers = { Accept: 'application/json' };
    if (token) headers.Authorization = 'Bearer ' + token;
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    const response = await fetch(path, {
      method, headers, cache: 'no-store', credentials: 'omit',
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    if (response.status === 401) throw new Unauthorized('the admin token is missing or wrong');
    let data = null;
    try { data = await response.json(); } catch (_) { /* not JSON */ }
    if (!response.ok) throw new Error((data && data.error) || 'HTTP ' + response.status);
    return data;
  }

  // --- Elements -------------------------------------------------------------------------

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (name === 'class') node.className = value;
      else if (name.startsWith('on')) node.addEventListener(name.slice(2), value);
      else node.setAttribute(name, value === true ? '' : String(value));
    }
    for (const child of children) {
      if (child === undefined || child === null || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function svg(tag, attrs, ...children) {
    const node = document.createElementNS(SVG, tag);
    for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, String(value));
    for (const child of children) if (child) node.append(child);
    return node;
  }

  function ago(iso) {
    if (!iso) return 'never';
    const seconds = Math.round((Date.now() - Date.parse(iso)) / 1000);
    if (seconds < 60) return Math.max(0, seconds) + ' s ago';
    if (seconds < 3600) return Math.round(seconds / 60) + ' min ago';
    if (seconds < 86400) return (seconds / 3600).toFixed(1) + ' h ago';
    return (seconds / 86400).toFixed(1) + ' d ago';
  }

  function time(iso) {
    return iso ? el('time', { datetime: iso, title: iso }, ago(iso)) : 'never';
  }

  function ms(value) {
    if (value === null || value === undefined) return '–';
    return value >= 1000 ? (value / 1000).toFixed(value >= 10000 ? 0 : 1) + ' s' : value + ' ms';
  }

  // --- Sinks ----------------------------------------------------------------------------

  function renderSinks(sinks, history) {
    const hours = new Map((history.sinks || []).map((hour) => [hour.sink, hour]));
    const cards = sinks.map((sink) => {
      const state = sink.enabled ? sink.state : 'disabled';
      const hour = hours.get(sink.sink);
      return el('article', {
        class: 'sink' + (sink.enabled ? '' : ' disabled'),
        'data-sink': sink.sink, 'data-state': state,
      },
        el('h3', {}, sink.sink, el('span', { class: 'state ' + state }, state),
          sink.outage_since && el('span', { class: 'since' }, 'since ', time(sink.outage_since))),
        el('div', { class: 'figures' },
          figure(sink.queue_depth, 'queued', 'queue'),
          figure(sink.in_flight, 'in flight', 'in-flight'),
          figure(sink.dead, 'dead', 'dead'),
          el('div', {}, el('b', {}, time(sink.last_success_at)), el('span', {}, 'last success'))),
        sink.last_error && el('p', { class: 'last-error' },
          el('span', { class: 'muted' }, 'Last error ', time(sink.last_error.at),
            sink.last_error.dead ? ' (dead-lettered)' : '',
            sink.last_error.status ? ' · HTTP ' + sink.last_error.status : '', ': '),
          sink.last_error.message),
        sink.warnings.length > 0 && el('ul', { class: 'warnings' },
          ...sink.warnings.map((warning) => el('li', {}, warning))),
        hour && countsChart(hour, history),
        hour && latencyChart(hour, history));
    });
    $('sinks').replaceChildren(...cards);
    const select = $('dl-sink');
    const chosen = select.value;
    const names = sinks.map((sink) => sink.sink);
    if ([...select.options].slice(1).map((option) => option.value).join() !== names.join()) {
      select.replaceChildren(el('option', { value: '' }, 'all'),
        ...names.map((name) => el('option', { value: name }, name)));
      select.value = names.includes(chosen) ? chosen : '';
    }
  }

  function figure(value, label, key) {
    return el('div', { 'data-figure': key }, el('b', {}, value), el('span', {}, label));
  }

  const W = 360, H = 80, LEFT = 42, TOP = 6, BOTTOM = 12;

  function frame(max, unit, start, count) {
    const group = svg('g');
    group.append(
      svg('line', { class: 'axis', x1: LEFT, y1: H - BOTTOM, x2: W, y2: H - BOTTOM }),
      svg('line', { class: 'axis', x1: LEFT, y1: TOP, x2: LEFT, y2: H - BOTTOM }),
      svg('text', { x: LEFT - 3, y: TOP + 6, 'text-anchor': 'end' }, document.createTextNode(unit(max))),
      svg('text', { x: LEFT - 3, y: H - BOTTOM, 'text-anchor': 'end' }, document.createTextNode('0')),
      svg('text', { x: LEFT, y: H - 1 }, document.createTextNode('-' + count + ' min')),
      svg('text', { x: W, y: H - 1, 'text-anchor': 'end' }, document.createTextNode('now')));
    return group;
  }

  function minuteLabel(history, index) {
    const at = new Date(Date.parse(history.start) + index * history.step_seconds * 1000);
    return at.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
  }

  function countsChart(hour, history) {
    const n = hour.delivered.length;
    const totals = hour.delivered.map((d, i) => d + hour.retried[i] + hour.dead[i]);
    const max = Math.max(1, ...totals);
    const step = (W - LEFT) / n, height = H - TOP - BOTTOM;
    const chart = svg('svg', { class: 'chart counts', viewBox: `0 0 ${W} ${H}`, role: 'img',
      'aria-label': hour.sink + ': attempts per minute over the last hour' });
    chart.append(frame(max, String, history.start, n));
    for (let i = 0; i < n; i++) {
      if (totals[i] === 0) continue;
      let y = H - BOTTOM;
      const bar = svg('g', {}, svg('title', {}, document.createTextNode(
        `${minuteLabel(history, i)}: ${hour.delivered[i]} delivered, ${hour.retried[i]} retried, ${hour.dead[i]} dead`)));
      for (const kind of ['delivered', 'retried', 'dead']) {
        const h = (hour[kind][i] / max) * height;
        if (h <= 0) continue;
        y -= h;
        bar.append(svg('rect', { class: kind, x: LEFT + i * step + 0.5, y, width: Math.max(1, step - 1), height: h }));
      }
      chart.append(bar);
    }
    return el('div', {}, chart, el('div', { class: 'legend' },
      legend('delivered', 'delivered'), legend('retried', 'retried'), legend('dead', 'dead'),
      el('span', {}, 'this hour: ' + sum(hour.delivered) + ' / ' + sum(hour.retried) + ' / ' + sum(hour.dead))));
  }

  function latencyChart(hour, history) {
    const n = hour.p50_ms.length;
    const values = hour.p99_ms.concat(hour.p50_ms).filter((v) => v !== null);
    const max = Math.max(1, ...values);
    const step = (W - LEFT) / n, height = H - TOP - BOTTOM;
    const chart = svg('svg', { class: 'chart latency', viewBox: `0 0 ${W} ${H}`, role: 'img',
      'aria-label': hour.sink + ': p50 and p99 delivery time per minute over the last hour' });
    chart.append(frame(max, ms, history.start, n));
    for (const kind of ['p99', 'p50']) {
      const series = hour[kind + '_ms'];
      let path = '';
      let pen = false;
      for (let i = 0; i < n; i++) {
        const value = series[i];
        if (value === null) { pen = false; continue; }
        const x = LEFT + i * step + step / 2, y = H - BOTTOM - (value / max) * height;
        path += (pen ? 'L' : 'M') + x.toFixed(1) + ' ' + y.toFixed(1);
        pen = true;
        chart.append(svg('circle', { class: kind, cx: x.toFixed(1), cy: y.toFixed(1), r: 1.6 },
          svg('title', {}, document.createTextNode(`${minuteLabel(history, i)}: ${kind} ${ms(value)}`))));
      }
      if (path) chart.append(svg('path', { class: kind, d: path }));
    }
    const last = (series) => [...series].reverse().find((v) => v !== null) ?? null;
    return el('div', {}, chart, el('div', { class: 'legend' },
      legend('p50', 'p50 ' + ms(last(hour.p50_ms))), legend('p99', 'p99 ' + ms(last(hour.p99_ms))),
      el('span', {}, 'delivery time')));
  }

  function legend(kind, text) { return el('span', {}, el('i', { class: kind }), text); }
  function sum(list) { return list.reduce((a, b) => a + b, 0); }

  // --- Dead letters ---------------------------------------------------------------------

  function filter() {
    return { sink: $('dl-sink').value, user: $('dl-user').value.trim(), since: $('dl-since').value.trim() };
  }

  function limit() { return Number($('dl-limit').value) || 100; }

  function lettersPath() {
    const params = new URLSearchParams();
    for (const [name, value] of Object.entries(filter())) if (value) params.set(name, value);
    // One more than a page: whether there is a next one.
    params.set('limit', String(limit() + 1));
    if (letters.after !== null) params.set('after', String(letters.after));
    return '/admin/dead-letters?' + params;
  }

  function renderLetters(rows) {
    const more = rows.length > limit();
    const page = rows.slice(0, limit());
    letters.ids = page.map((row) => row.id);
    for (const id of [...letters.selected]) if (!letters.ids.includes(id)) letters.selected.delete(id);
    $('dl-table').tBodies[0].replaceChildren(...page.map((row) => el('tr', { 'data-id': row.id },
      el('td', {}, el('input', {
        type: 'checkbox', class: 'pick', 'aria-label': 'Select ' + row.id,
        checked: letters.selected.has(row.id),
        onchange: (event) => {
          if (event.target.checked) letters.selected.add(row.id); else letters.selected.delete(row.id);
          updateSelection();
        },
      })),
      el('td', {}, row.id), el('td', {}, row.sink), el('td', {}, row.kind),
      el('td', {}, row.user ?? '–'), el('td', {}, row.attempts), el('td', {}, row.last_status ?? '–'),
      el('td', { class: 'error-text' }, row.last_error ?? ''),
      el('td', {}, time(row.last_attempt_at)),
      el('td', {}, el('button', { type: 'button', class: 'replay', onclick: () => replay({ ids: [row.id] }) }, 'Replay')))));
    $('dl-empty').hidden = page.length > 0;
    $('dl-next').disabled = !more;
    $('dl-next').dataset.after = page.length ? String(page[page.length - 1].id) : '';
    $('dl-prev').disabled = letters.afters.length === 0;
    $('dl-first').disabled = letters.afters.length === 0;
    $('dl-page').textContent = page.length
      ? `page ${letters.afters.length + 1} · ids ${page[0].id}–${page[page.length - 1].id}` : '';
    updateSelection();
  }

  function updateSelection() {
    const count = letters.selected.size;
    $('dl-replay-selected').disabled = count === 0;
    $('dl-replay-selected').textContent = count ? `Replay selected (${count})` : 'Replay selected';
    const all = $('dl-all');
    all.checked = count > 0 && count === letters.ids.length;
    all.indeterminate = count > 0 && count < letters.ids.length;
  }

  async function replay(request, confirmText) {
    if (confirmText && !window.confirm(confirmText)) return;
    $('dl-message').textContent = 'Replaying…';
    try {
      const answer = await api('POST', '/admin/dead-letters/replay', request);
      const left = Object.entries(answer.left_dead || {}).map(([sink, n]) => `${n} of ${sink}`);
      $('dl-message').textContent = `Replayed ${answer.replayed}` +
        (left.length ? `; left dead (sink not enabled): ${left.join(', ')}` : '') + '.';
      if (request.ids) for (const id of request.ids) letters.selected.delete(id);
    } catch (error) {
      if (error instanceof Unauthorized) return signOut(error.message);
      $('dl-message').textContent = 'Replay failed: ' + error.message;
    }
    await refresh();
  }

  // --- Paused users ---------------------------------------------------------------------

  function renderPaused(users) {
    $('paused-table').tBodies[0].replaceChildren(...users.map((user) => el('tr', { 'data-user': user.user },
      el('td', {}, user.user), el('td', {}, time(user.paused_at)),
      el('td', {}, el('button', { type: 'button', class: 'unpause', onclick: () => setPaused(user.user, false) }, 'Unpause')))));
    $('paused-empty').hidden = users.length > 0;
  }

  async function setPaused(user, paused) {
    try {
      await api('POST', `/admin/users/${encodeURIComponent(user)}/${paused ? 'pause' : 'unpause'}`);
    } catch (error) {
      if (error instanceof Unauthorized) return signOut(error.message);
      showProblem((paused ? 'Pause' : 'Unpause') + ' failed: ' + error.message);
    }
    await refresh();
  }

  // --- Polling and the token ------------------------------------------------------------

  function showProblem(text) {
    $('problem').textContent = text || '';
    $('problem').hidden = !text;
  }

  async function refresh() {
    clearTimeout(timer);
    if (busy) { timer = setTimeout(refresh, 200); return; }
    busy = true;
    const mine = generation;
    try {
      const [sinks, history, rows, paused] = await Promise.all([
        api('GET', '/admin/sinks'), api('GET', '/admin/sinks/history'),
        api('GET', lettersPath()), api('GET', '/admin/paused'),
      ]);
      if (mine !== generation) return;
      renderSinks(sinks, history);
      renderLetters(rows);
      renderPaused(paused);
      $('login').hidden = true;
      $('app').hidden = false;
      $('forget').hidden = !token;
      showProblem('');
      $('updated').textContent = 'updated ' + new Date().toLocaleTimeString();
      timer = setTimeout(refresh, POLL_MS);
    } catch (error) {
      if (mine !== generation) return;
      if (error instanceof Unauthorized) { busy = false; return signOut(token ? 'That token was refused.' : ''); }
      showProblem('Cannot read the admin API: ' + error.message);
      timer = setTimeout(refresh, POLL_MS);
    } finally {
      busy = false;
    }
  }

  // Shows the token form and nothing else: every datum already on the page is removed.
  function signOut(message) {
    generation += 1;
    clearTimeout(timer);
    token = '';
    sessionStorage.removeItem(TOKEN_KEY);
    $('app').hidden = true;
    for (const id of ['sinks']) $(id).replaceChildren();
    for (const table of ['dl-table', 'paused-table']) $(table).tBodies[0].replaceChildren();
    $('dl-sink').replaceChildren(el('option', { value: '' }, 'all'));
    $('updated').textContent = '';
    $('forget').hidden = true;
    showProblem('');
    $('login-error').textContent = message || '';
    $('login-error').hidden = !message;
    $('login').hidden = false;
    $('token').focus();
  }

  function start() {
    $('login-form').addEventListener('submit', (event) => {
      event.preventDefault();
      token = $('token').value.trim();
      $('token').value = '';
      if (!token) return;
      sessionStorage.setItem(TOKEN_KEY, token);
      $('login-error').hidden = true;
      refresh();
    });
    $('forget').addEventListener('click', () => signOut(''));
    $('dl-filter').addEventListener('submit', (event) => {
      event.preventDefault();
      letters.afters = [];
      letters.after = null;
      letters.selected.clear();
      refresh();
    });
    $('dl-next').addEventListener('click', () => {
      const after = $('dl-next').dataset.after;
      if (!after) return;
      letters.afters.push(letters.after);
      letters.after = Number(after);
      refresh();
    });
    $('dl-prev').addEventListener('click', () => {
      if (!letters.afters.length) return;
      letters.after = letters.afters.pop();
      refresh();
    });
    $('dl-first').addEventListener('click', () => {
      letters.afters = [];
      letters.after = null;
      refresh();
    });
    $('dl-all').addEventListener('change', (event) => {
      for (const id of letters.ids) {
        if (event.target.checked) letters.selected.add(id); else letters.selected.delete(id);
      }
      for (const box of document.querySelectorAll('#dl-table input.pick')) box.checked = event.target.checked;
      updateSelection();
    });
    $('dl-replay-selected').addEventListener('click', () => {
      const ids = [...letters.selected];
      if (ids.length) replay({ ids });
    });
    $('dl-replay-matching').addEventListener('click', () => {
      const { sink, user, since } = filter();
      const request = {};
      if (sink) request.sink = sink;
      if (user) request.user = user;
      if (since) request.since = since;
      const what = Object.entries(request).map(([name, value]) => `${name} = ${value}`).join(', ');
      replay(request, what ? `Replay every dead letter with ${what}?` : 'Replay EVERY dead letter?');
    });
    $('pause-form').addEventListener('submit', (event) => {
      event.preventDefault();
      const user = $('pause-user').value.trim();
      if (!user) return;
      $('pause-user').value = '';
      setPaused(user, true);
    });
    refresh();
  }

  start();
})();
