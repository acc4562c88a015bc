// fleetstream dashboard: plain JS over the /v1 API. The API key lives in sessionStorage (this
// tab only). Every value from the API is rendered with textContent, never as HTML.
'use strict';

const KEY = 'fleetstream.key';
const TENANT = 'fleetstream.tenant';
const $ = (id) => document.getElementById(id);

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (name.startsWith('on')) el.addEventListener(name.slice(2), value);
    else if (value !== undefined && value !== null) el.setAttribute(name, value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

function status(text) { $('status').textContent = text; }

class ApiError extends Error {
  constructor(status, body) {
    super(body && body.error ? body.error + (body.field ? ` (${body.field})` : '') : `HTTP ${status}`);
    this.status = status;
  }
}

async function api(path, options = {}) {
  const response = await fetch(path, {
    ...options,
    headers: { authorization: `Bearer ${sessionStorage.getItem(KEY)}`, 'content-type': 'application/json' },
  });
  const body = response.status === 204 ? null : await response.json().catch(() => null);
  if (response.status === 401) { logout('Your key was refused; sign in again.'); }
  if (!response.ok) throw new ApiError(response.status, body);
  return body;
}

// The tenant a request addresses: operators pick one (or none for "all"), tenant keys have theirs.
function tenantQuery(sep = '?') {
  const tenant = sessionStorage.getItem(TENANT);
  return tenant ? `${sep}tenant=${encodeURIComponent(tenant)}` : '';
}

function logout(message) {
  sessionStorage.removeItem(KEY);
  sessionStorage.removeItem(TENANT);
  $('nav').hidden = true;
  $('view').textContent = '';
  $('login').hidden = false;
  $('login-error').textContent = message || '';
}

async function login(key) {
  sessionStorage.setItem(KEY, key.trim());
  try {
    const me = await api('/v1/me');
    $('login').hidden = true;
    $('nav').hidden = false;
    // Operators see every tenant and may narrow the views to one.
    const operator = !me.tenant_id;
    $('tenant-pick').hidden = !operator;
    $('who').textContent = operator ? me.role : `${me.role} · tenant ${me.tenant_id}`;
    if (!operator) sessionStorage.removeItem(TENANT);
    $('tenant').value = sessionStorage.getItem(TENANT) || '';
    route();
  } catch (err) {
    logout(err.message);
  }
}

// ---------- charts ----------

const PALETTE = ['#1f77b4', '#d62728', '#2ca02c', '#9467bd', '#ff7f0e', '#17becf', '#8c564b'];

// Draws `series` ([{label, points:[{time,value}]}]) into `container` over [from, to] (Dates);
// returns the point count.
function chart(container, title, series, from, to) {
  const times = [...new Set(series.flatMap(s => s.points.map(p => Date.parse(p.time) / 1000)))].sort((a, b) => a - b);
  const index = new Map(times.map((t, i) => [t, i]));
  const data = [times];
  let count = 0;
  for (const s of series) {
    const column = new Array(times.length).fill(null);
    for (const p of s.points) { column[index.get(Date.parse(p.time) / 1000)] = p.value; count++; }
    data.push(column);
  }
  container.textContent = '';
  container.dataset.points = String(count);
  const width = Math.max(320, Math.min(1100, container.clientWidth || 900));
  new uPlot({
    title, width, height: 280,
    scales: { x: { time: true, range: [from.getTime() / 1000, to.getTime() / 1000] } },
    series: [{}, ...series.map((s, i) => ({ label: s.label, stroke: PALETTE[i % PALETTE.length], width: 1.5, spanGaps: true, points: { show: times.length < 120 } }))],
    axes: [{}, { size: 60 }],
  }, data, container);
  return count;
}

// ---------- views ----------

async function overview(view) {
  const summary = await api(`/v1/fleet/summary${tenantQuery()}`);
  const p = summary.pipeline;
  const fmt = (v, digits = 0) => (v === undefined || v === null ? '—' : Number(v).toFixed(digits));
  const card = (label, value) => h('div', { class: 'card' }, h('div', { class: 'value' }, value), h('div', { class: 'label' }, label));
  view.append(h('div', { class: 'cards', id: 'summary' },
    card('devices', summary.devices),
    card('reporting (5 min)', summary.devices_reporting),
    card('firing alerts', summary.alerts_firing),
    card('msg/s', p ? fmt(p.sink_rows_per_second, 1) : 'operators only'),
    card('consumer lag', p ? fmt(p.sink_consumer_lag_messages) : 'operators only'),
  ));
  const site = h('input', { placeholder: 'site filter', size: 12 });
  const table = h('table', { id: 'fleet' }, h('tr', {}, h('th', {}, 'device'), h('th', {}, 'site'), h('th', {}, 'last reading'), h('th', {}, 'metrics')));
  const more = h('button', { type: 'button', hidden: true }, 'More');
  let cursor = null;
  async function load(reset) {
    if (reset) { cursor = null; while (table.rows.length > 1) table.deleteRow(1); }
    const params = new URLSearchParams({ limit: '100' });
    const tenant = sessionStorage.getItem(TENANT);
    if (tenant) params.set('tenant', tenant);
    if (site.value) params.set('site', site.value);
    if (cursor) params.set('cursor', cursor);
    const page = await api(`/v1/fleet/latest?${params}`);
    for (const d of page.items) {
      const link = h('a', { href: `#/device/${encodeURIComponent(d.device_id)}?tenant=${encodeURIComponent(d.tenant_id)}` }, d.device_id);
      const metrics = Object.entries(d.metrics).slice(0, 6).map(([k, v]) => `${k}=${typeof v === 'number' ? +v.toFixed(3) : v}`).join('  ');
      table.append(h('tr', {}, h('td', {}, link), h('td', {}, d.site_id || ''), h('td', {}, new Date(d.time).toLocaleString()), h('td', {}, metrics)));
    }
    cursor = page.next_cursor;
    more.hidden = !cursor;
  }
  site.addEventListener('change', () => load(true).catch(err => status(err.message)));
  more.addEventListener('click', () => load(false).catch(err => status(err.message)));
  view.append(h('h2', {}, 'Fleet latest'), h('div', { class: 'controls' }, site), table, more);
  await load(true);
}

const RANGES = { '1h': 3600, '6h': 6 * 3600, '24h': 86400, '7d': 7 * 86400 };
const BUCKETS = [10, 60, 300, 900, 3600, 21600];

async function device(view, id, tenant) {
  const tq = tenant ? `?tenant=${encodeURIComponent(tenant)}` : '';
  const latest = await api(`/v1/devices/${encodeURIComponent(id)}/latest${tq}`);
  const numeric = Object.entries(latest.metrics || {}).filter(([, v]) => typeof v === 'number' || typeof v === 'boolean').map(([k]) => k);
  view.append(h('h1', {}, `Device ${latest.device_id}`),
    h('p', {}, `site ${latest.site_id || '—'} · ${latest.status} · last reading ${latest.time ? new Date(latest.time).toLocaleString() : 'none yet'}`));
  const picks = numeric.map((m, i) => h('label', {}, h('input', { type: 'checkbox', value: m, ...(i < 3 ? { checked: '' } : {}) }), ` ${m}`));
  const range = h('select', {}, Object.keys(RANGES).map(r => h('option', { value: r, ...(r === '1h' ? { selected: '' } : {}) }, r)));
  const agg = h('select', {}, ['avg', 'min', 'max', 'last', 'count'].map(a => h('option', { value: a }, a)));
  const box = h('div', { class: 'chart', id: 'chart' });
  const note = h('p', { id: 'chart-note' });
  view.append(h('div', { class: 'controls' }, picks, 'range', range, 'aggregate', agg), box, note);
  async function draw() {
    const metrics = [...view.querySelectorAll('input[type=checkbox]:checked')].map(c => c.value);
    if (!metrics.length) { box.textContent = 'Pick a metric.'; return; }
    const seconds = RANGES[range.value];
    const to = new Date();
    const from = new Date(to.getTime() - seconds * 1000);
    // About 300 points per metric at most.
    const bucket = BUCKETS.find(b => seconds / b <= 360) || BUCKETS[BUCKETS.length - 1];
    const params = new URLSearchParams({ metrics: metrics.join(','), from: from.toISOString(), to: to.toISOString(), bucket: `${bucket}s`, agg: agg.value });
    if (tenant) params.set('tenant', tenant);
    const answer = await api(`/v1/devices/${encodeURIComponent(id)}/telemetry?${params}`);
    const count = chart(box, `${agg.value} per ${bucket}s`, answer.series.map(s => ({ label: s.metric, points: s.points })), from, to);
    note.textContent = `${count} points`;
    status(`chart rendered: ${count} points`);
  }
  for (const control of [range, agg, ...picks.map(p => p.firstChild)]) control.addEventListener('change', () => draw().catch(err => status(err.message)));
  await draw();
}

async function alerts(view) {
  const filter = h('select', {}, ['firing', 'pending', 'resolved', ''].map(s => h('option', { value: s }, s || 'any status')));
  const table = h('table', { id: 'alerts' });
  async function load() {
    table.textContent = '';
    table.append(h('tr', {}, ['started', 'status', 'severity', 'device', 'metric', 'value', 'threshold', 'acknowledged', ''].map(t => h('th', {}, t))));
    const params = new URLSearchParams({ limit: '200' });
    if (filter.value) params.set('status', filter.value);
    const tenant = sessionStorage.getItem(TENANT);
    if (tenant) params.set('tenant', tenant);
    const page = await api(`/v1/alerts?${params}`);
    for (const a of page.items) {
      const ack = a.acknowledged_at ? null : h('button', { type: 'button', onclick: async () => {
        try { await api(`/v1/alerts/${a.alert_id}/ack`, { method: 'POST' }); await load(); } catch (err) { status(err.message); }
      } }, 'Acknowledge');
      table.append(h('tr', {}, h('td', {}, new Date(a.started_at).toLocaleString()), h('td', {}, a.status),
        h('td', { class: `sev-${a.severity}` }, a.severity), h('td', {}, a.device_id), h('td', {}, a.metric || ''),
        h('td', {}, a.value ?? ''), h('td', {}, a.threshold ?? ''),
        h('td', {}, a.acknowledged_at ? `${new Date(a.acknowledged_at).toLocaleString()} by ${a.acknowledged_by}` : ''), h('td', {}, ack)));
    }
    status(`${page.items.length} alerts`);
  }
  filter.addEventListener('change', () => load().catch(err => status(err.message)));
  view.append(h('h1', {}, 'Alerts'), h('div', { class: 'controls' }, filter), table);
  await load();
}

async function pipeline(view) {
  view.append(h('h1', {}, 'Pipeline health'));
  let answer;
  try {
    answer = await api('/v1/system/metrics?bucket=1m');
  } catch (err) {
    view.append(h('p', { class: 'error' }, err.status === 403 ? 'Pipeline health is for operator keys.' : err.message));
    return;
  }
  const byName = new Map();
  for (const s of answer.series) {
    if (!byName.has(s.metric_name)) byName.set(s.metric_name, []);
    byName.get(s.metric_name).push({ label: `${s.service || ''} ${s.instance}`, points: s.points });
  }
  if (!byName.size) view.append(h('p', {}, 'No figures in the last hour.'));
  for (const [name, series] of byName) {
    const box = h('div', { class: 'chart' });
    view.append(box);
    chart(box, name, series, new Date(answer.from), new Date(answer.to));
  }
}

// ---------- routing ----------

async function route() {
  if (!sessionStorage.getItem(KEY)) return logout();
  const view = $('view');
  view.textContent = '';
  const hash = location.hash.slice(1) || '/';
  const [path, query] = hash.split('?');
  const params = new URLSearchParams(query || '');
  try {
    if (path.startsWith('/device/')) await device(view, decodeURIComponent(path.slice(8)), params.get('tenant'));
    else if (path === '/alerts') await alerts(view);
    else if (path === '/pipeline') await pipeline(view);
    else await overview(view);
  } catch (err) {
    view.append(h('p', { class: 'error' }, err.message));
    status(err.message);
  }
}

$('login').addEventListener('submit', (event) => { event.preventDefault(); login($('key').value); });
$('logout').addEventListener('click', () => logout());
$('tenant').addEventListener('change', () => {
  const value = $('tenant').value.trim();
  if (value) sessionStorage.setItem(TENANT, value); else sessionStorage.removeItem(TENANT);
  route();
});
window.addEventListener('hashchange', route);

// `?login=<key>` fills and submits the sign-in form (used by scripted checks), then leaves the
// address bar without the key.
const given = new URLSearchParams(location.search).get('login');
if (given) {
  history.replaceState(null, '', location.pathname + location.hash);
  $('key').value = given;
  $('login').requestSubmit();
} else if (sessionStorage.getItem(KEY)) {
  login(sessionStorage.getItem(KEY));
} else {
  logout();
}
