// fleet dashboard: a hash-routed page per view, re-rendered from the API every 2 s.
"use strict";
const BASE = document.querySelector('meta[name="fleet-base"]').content;
const CSRF = document.querySelector('meta[name="fleet-csrf"]').content;
const REFRESH_MS = 2000;
const $page = document.getElementById("page");
let timer = null, busy = false, shown = null;

const esc = (v) => String(v ?? "").replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
const num = (v, d = 0) => v == null ? "–" : Number(v).toFixed(d);
const when = (t) => t ? new Date(t * 1000).toLocaleTimeString() : "–";
const bytes = (b) => b == null ? "–" : b > 1 << 30 ? (b / (1 << 30)).toFixed(1) + " GiB" : (b / (1 << 20)).toFixed(0) + " MiB";
const age = (s) => s == null ? "–" : s < 90 ? s.toFixed(1) + " s" : (s / 60).toFixed(1) + " min";

async function get(path) {
  const r = await fetch(BASE + path, {credentials: "same-origin"});
  if (r.status === 401) { location.href = BASE + "/login"; throw new Error("signed out"); }
  const body = await r.json();
  if (!r.ok) throw new Error(body.error || r.statusText);
  return body;
}

async function post(path, params) {
  const r = await fetch(BASE + path, {method: "POST", credentials: "same-origin",
    headers: {"Content-Type": "application/json", "X-CSRF-Token": CSRF},
    body: JSON.stringify(params || {})});
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(body.error || r.statusText);
  return body;
}

function toast(text) {
  const t = document.getElementById("toast");
  t.textContent = text; t.style.display = "block";
  setTimeout(() => { t.style.display = "none"; }, 4000);
}

// Every control button: data-post (path), data-confirm (question), data-params (JSON),
// data-ask (a parameter to prompt for). Nothing happens without the user's confirmation.
document.addEventListener("click", async (e) => {
  const b = e.target.closest("button[data-post]");
  if (!b) return;
  const params = JSON.parse(b.dataset.params || "{}");
  if (b.dataset.ask) {
    for (const name of b.dataset.ask.split(",")) {
      const v = prompt(`${name}:`, params[name] ?? "");
      if (v === null) return;
      params[name] = v;
    }
  }
  busy = true;
  const ok = confirm(b.dataset.confirm || "Are you sure?");
  busy = false;
  if (!ok) return;
  try { toast((await post(b.dataset.post, params)).message || "done"); render(); }
  catch (err) { toast("failed: " + err.message); }
});

function act(label, path, question, params, ask) {
  return `<button data-post="${esc(path)}" data-confirm="${esc(question)}"` +
    (params ? ` data-params='${esc(JSON.stringify(params))}'` : "") +
    (ask ? ` data-ask="${esc(ask)}"` : "") + `>${esc(label)}</button>`;
}

function table(cols, rows, id) {
  return `<table id="${id || ""}"><thead><tr>${cols.map((c) => `<th>${esc(c[0])}</th>`).join("")}</tr></thead><tbody>` +
    (rows.length ? rows.map((r) => `<tr>${cols.map((c) => `<td class="${c[2] || ""}">${c[1](r)}</td>`).join("")}</tr>`).join("")
      : `<tr><td colspan="${cols.length}">none</td></tr>`) + "</tbody></table>";
}

// -- Plots (uPlot, static/vendor): the API sends at most 300 time buckets per series and
// the top 10 series per plot (fleet/dashboard/series.py). The charts live in #plots,
// outside the HTML that render() replaces every 2 s, and get new data with setData:
// no flicker, and the hovered point stays put while its values update.
const WINDOWS = {"15m": "15 min", "1h": "1 h", "24h": "24 h"};
const PLOTS = {
  queues: [
    {key: "waiting", title: "Queue depth", unit: "tasks", how: "peak", rank: "peak depth", fmt: (v) => num(v)},
    {key: "completion_rate", title: "Throughput", unit: "tasks/s", how: "mean", rank: "mean throughput", fmt: (v) => num(v, 2)},
    {key: "actual", title: "Replicas", unit: "replicas", how: "peak", rank: "peak replicas", fmt: (v) => num(v)},
  ],
  workers: [
    {key: "rss", title: "Worker memory (RSS)", unit: "MiB", how: "peak", rank: "peak memory", scale: 1 / 1048576, fmt: (v) => num(v)},
  ],
};
const NOUN = {queues: "queues", workers: "workers"};
// Colour-blind-safe (Tableau 10); a name keeps its colour across plots and refreshes.
const PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"];
const colours = new Map();
const colour = (name) => {
  if (!colours.has(name)) colours.set(name, PALETTE[colours.size % PALETTE.length]);
  return colours.get(name);
};
// A value with no neighbour (alone between gaps) is drawn as a dot: a line needs two.
const isolated = (u, si) => {
  const ys = u.data[si], out = [];
  for (let i = 0; i < ys.length; i++) if (ys[i] != null && ys[i - 1] == null && ys[i + 1] == null) out.push(i);
  return out.length ? out : null;
};
const span = (s) => s < 60 ? `${s} s` : s < 3600 ? `${s / 60} min` : s < 86400 ? `${s / 3600} h` : `${s / 86400} d`;

// The window: ?window= in the hash (a link says what it shows), else the last one chosen.
function chosenWindow() {
  const w = new URLSearchParams(location.hash.split("?")[1] || "").get("window");
  if (Object.hasOwn(WINDOWS, w || "")) return w;
  try { const kept = localStorage.getItem("fleet.window"); if (Object.hasOwn(WINDOWS, kept || "")) return kept; }
  catch (err) { /* storage disabled: the default */ }
  return "1h";
}

const plots = {
  el: null, kind: null, charts: {}, fetched: 0, window: null, step: 0, seq: 0,

  // The section for one kind of page, built once (again only when the page kind changes).
  build(kind) {
    for (const c of Object.values(this.charts)) c.u.destroy();
    this.charts = {};
    this.kind = kind;
    this.el.innerHTML = `<div class="plot-bar"><span>Window</span><span class="windows" role="group" aria-label="time window">` +
      Object.entries(WINDOWS).map(([w, label]) => `<button type="button" data-window="${w}" aria-pressed="false">${label}</button>`).join("") +
      `</span><span class="plot-note" id="plot-step"></span></div><div class="charts">` +
      PLOTS[kind].map((p) => `<figure class="plot" id="plot-${p.key}"><figcaption>${esc(p.title)} <span class="how"></span></figcaption>` +
        `<div class="plot-area"><span class="y-label">${esc(p.unit)}</span><div class="plot-canvas"></div></div>` +
        `<div class="x-label">time</div><div class="plot-legend"></div><p class="more"></p></figure>`).join("") + "</div>";
  },

  // Called by render(): show (or hide) the plots, and read the API when a new bucket may
  // have filled (never more often than the page refreshes, at least once a minute).
  async show(kind) {
    this.el.hidden = !kind;
    if (!kind) return;
    const w = chosenWindow();
    const due = Math.min(60000, Math.max(REFRESH_MS, this.step * 1000));
    if (kind === this.kind && w === this.window && Date.now() - this.fetched < due) return;
    if (kind !== this.kind) this.build(kind);
    this.window = w;
    this.fetched = Date.now();
    for (const b of this.el.querySelectorAll("button[data-window]")) b.setAttribute("aria-pressed", String(b.dataset.window === w));
    const seq = ++this.seq;
    let data;
    try { data = await get(`/api/fleet/series?what=${kind}&window=${w}`); }
    catch (err) { this.fetched = 0; throw err; }
    if (seq !== this.seq) return;  // a newer read (another window or page) is under way
    this.step = data.step;
    this.el.querySelector("#plot-step").textContent = `last ${WINDOWS[w]}, one point per ${span(data.step)}`;
    for (const p of PLOTS[kind]) this.draw(p, data, data[kind][p.key], NOUN[kind]);
  },

  draw(p, data, fig, noun) {
    const box = this.el.querySelector(`#plot-${p.key}`);
    let c = this.charts[p.key];
    // The same names in another rank order: keep the chart's order (and the chart).
    const same = c && fig.series.length === c.order.length && fig.series.every((s) => c.order.includes(s.name));
    const series = same ? c.order.map((n) => fig.series.find((s) => s.name === n)) : fig.series;
    const names = series.map((s) => s.name);
    const rows = [data.t, ...series.map((s) => s.values.map((v) => v == null ? null : v * (p.scale || 1)))];
    box.querySelector(".how").textContent = `(${p.how} per ${span(data.step)}, ${p.unit})`;
    box.querySelector(".more").textContent = !names.length ? "no samples in this window"
      : fig.more > 0 ? `${fig.more} more ${noun} not drawn (the top ${names.length} by ${p.rank} are)` : "";
    if (same) {
      c.range = [data.since, data.until];
      c.u.setData(rows);
      return;
    }
    if (c) c.u.destroy();  // other series: a new chart (uPlot's series are fixed at creation)
    c = this.charts[p.key] = {order: names, range: [data.since, data.until]};
    const value = (u, v) => v == null ? "–" : `${p.fmt(v)} ${p.unit}`;
    c.u = new uPlot({
      ...this.size(p.key), class: "fleet-plot",
      series: [{label: "time", value: (u, t) => t == null ? "–" : new Date(t * 1000).toLocaleString()},
        ...names.map((n) => ({label: n, stroke: colour(n), width: 1.5, value, points: {filter: isolated}}))],
      scales: {x: {time: true, range: () => c.range},
               y: {range: (u, lo, hi) => uPlot.rangeNum(0, hi > 0 ? hi : 1, 0.1, true)}},
      axes: [{}, {size: 52}],
      cursor: {drag: {x: false, y: false}, sync: {key: "fleet-" + this.kind}},
      legend: {live: true, mount: (u, el) => box.querySelector(".plot-legend").append(el)},
    }, rows, box.querySelector(".plot-canvas"));
  },

  // The grid (app.css) sizes each figure; the chart fills its figure's canvas box.
  size(key) {
    const holder = this.el.querySelector(`#plot-${key} .plot-canvas`);
    return {width: Math.max(240, holder.clientWidth), height: 200};
  },
};

document.addEventListener("click", (e) => {
  const b = e.target.closest("button[data-window]");
  if (!b) return;
  try { localStorage.setItem("fleet.window", b.dataset.window); } catch (err) { /* the hash has it */ }
  const [path] = location.hash.slice(1).split("?");
  history.replaceState(null, "", `#${path || "/" + plots.kind}?window=${b.dataset.window}`);
  plots.show(plots.kind).catch((err) => toast("plots: " + err.message));
});
window.addEventListener("resize", () => {
  for (const [key, c] of Object.entries(plots.charts)) c.u.setSize(plots.size(key));
});

// Messages kept instead of delivered again (poison, malformed): shown under the queues.
async function deadLetters() {
  const d = await get("/api/fleet/dead?limit=100");
  const q = "/api/fleet/queues/";
  const queues = Object.entries(d.counts).filter(([, n]) => n > 0);
  return `<h3>Dead letters</h3>` + table([
    ["Queue", (r) => esc(r[0])], ["Entries", (r) => num(r[1]), "num"],
    ["", (r) => act("Requeue all", q + r[0] + "/dead/requeue", `Send every task message of ${r[0]}'s dead letters again?`) +
                act("Purge", q + r[0] + "/dead/purge", `Delete all ${r[1]} dead letters of ${r[0]} for good?`)],
  ], queues, "dead-queues") + table([
    ["At", (e) => when(e.at)], ["Queue", (e) => esc(e.queue)], ["Reason", (e) => `<span class="error">${esc(e.reason)}</span>`],
    ["Task", (e) => e.task_id ? `<a href="#/task/${esc(e.task_id)}">${esc(e.task || e.task_id)}</a>` : "–"],
    ["Deliveries", (e) => num(e.deliveries), "num"], ["Detail", (e) => esc(e.detail)],
    ["", (e) => e.requeue_problem ? esc(e.requeue_problem) : act("Requeue", "/api/fleet/dead/" + e.id + "/requeue", `Send ${e.task}[${e.task_id}] again?`)],
  ], d.entries, "dead-letters");
}

// -- What if: a window replayed by the simulator under the current settings and the
// tuner's (GET /api/fleet/whatif). It runs once per window asked, not on every 2-s
// refresh: the answer is kept here and the page re-drawn only when it changes (the
// plots are images, which a redraw would fetch again).
const WHATIF_WINDOWS = {"15m": "15 min", "1h": "1 h", "6h": "6 h", "24h": "24 h"};
const FIGURES = [
  ["Cost (worker-hours)", (f) => num(f.worker_seconds / 3600, 2), "worker_seconds"],
  ["Wait p50", (f) => age(f.wait_p50), "wait_p50"], ["Wait p95", (f) => age(f.wait_p95), "wait_p95"],
  ["Wait p99", (f) => age(f.wait_p99), "wait_p99"],
  ["SLO violation (s)", (f) => num(f.slo_violation_seconds), "slo_violation_seconds"],
  ["Scale events", (f) => num(f.scale_events), "scale_events"],
  ["Max replicas", (f) => num(f.max_replicas), "max_replicas"], ["Max backlog", (f) => num(f.max_backlog), "max_backlog"],
];
const whatif = {key: null, data: null, error: null, running: false};

function whatifQuery() {
  const f = new URLSearchParams(location.hash.split("?")[1] || "");
  const q = new URLSearchParams({since: f.get("since") || "1h"});
  if (f.get("until")) q.set("until", f.get("until"));
  if (f.get("candidate")) q.set("candidate", f.get("candidate"));
  for (const name of (f.get("queue") || "").split(",").map((s) => s.trim()).filter(Boolean)) q.append("queue", name);
  return q;
}

async function runWhatif(key) {
  whatif.key = key; whatif.running = true; whatif.data = whatif.error = null;
  try {
    const r = await fetch(BASE + "/api/fleet/whatif?" + key, {credentials: "same-origin"});
    if (r.status === 401) { location.href = BASE + "/login"; return; }
    const body = await r.json().catch(() => ({error: r.statusText}));
    if (whatif.key !== key) return;  // another window was asked meanwhile
    if (r.ok) whatif.data = body; else whatif.error = {status: r.status, message: body.error || r.statusText};
  } catch (err) {
    if (whatif.key === key) whatif.error = {status: 0, message: err.message};
  } finally {
    if (whatif.key === key) { whatif.running = false; render(); }
  }
}

function whatifSide(side, d, other) {
  const title = side.label === "current" ? "Current settings" : side.source === "tuner" ? "Tuner's settings" : "Candidate settings";
  const rows = FIGURES.map(([name, fmt, key]) => [name, fmt(side.total), other ? d.ratios[key] : undefined]);
  const cols = [["Figure", (r) => esc(r[0])], ["Value", (r) => esc(r[1]), "num"]];
  if (other) cols.push(["× current", (r) => r[2] == null ? "–" : esc(num(r[2], 2) + "×"), "num"]);
  return `<section class="whatif-side" id="whatif-${esc(side.label)}"><h3>${esc(title)} <span class="plot-note">(${esc(side.source)})</span></h3>` +
    table(cols, rows, `whatif-${side.label}-total`) +
    table([["Queue", (q) => esc(q.queue)], ["Tasks", (q) => num(q.tasks), "num"], ["Worker-h", (q) => num(q.worker_seconds / 3600, 2), "num"],
      ["Wait p95", (q) => age(q.wait_p95), "num"], ["SLO s", (q) => num(q.slo_violation_seconds), "num"],
      ["Scale events", (q) => num(q.scale_events), "num"], ["Max replicas", (q) => num(q.max_replicas), "num"]], side.queues, `whatif-${side.label}-queues`) +
    (side.plot ? `<a href="${esc(BASE + side.plot)}" target="_blank" rel="noopener" title="open the plot full size">` +
      `<img class="whatif-plot" alt="${esc(title)}: backlog, replicas and wait per queue over the window" src="${esc(BASE + side.plot)}"></a>` : "") +
    "</section>";
}

function whatifBody() {
  if (whatif.running) return `<p id="whatif-status">replaying the window under both settings…</p>`;
  if (whatif.error) {
    const why = whatif.error.status === 501 ? "What-if is not available here: " : whatif.error.status === 429 ? "Busy: " : "";
    return `<p id="whatif-status" class="error">${esc(why + whatif.error.message)}</p>`;
  }
  const d = whatif.data;
  if (!d) return "";
  const head = `<p id="whatif-status">${esc(d.message)} — ${esc(new Date(d.since * 1000).toLocaleString())} to ${esc(new Date(d.until * 1000).toLocaleString())}` +
    `${d.cached ? " (kept answer)" : ""}, ${esc(num(d.seconds, 1))} s to compute.</p>`;
  if (d.status !== "ok") return head;
  return head + `<div class="whatif-sides">${whatifSide(d.current, d, false)}${whatifSide(d.candidate, d, true)}</div>` +
    `<h3>What the candidate changes</h3>` + table([["Setting", (c) => esc(c.setting)], ["Current", (c) => esc(JSON.stringify(c.current))],
      ["Candidate", (c) => esc(JSON.stringify(c.candidate))]], d.changes, "whatif-changes") +
    (d.notes.length ? `<ul>${d.notes.map((n) => `<li>${esc(n)}</li>`).join("")}</ul>` : "") +
    (d.skipped ? `<p class="plot-note">${esc(d.skipped)} tasks without a service time were not replayed.</p>` : "");
}

const pages = {
  async workers() {
    const ws = await get("/api/fleet/workers");
    return {title: `<h2>Workers</h2>`, plots: "workers", html: table([
      ["Worker", (w) => `<a href="#/worker/${encodeURIComponent(w.hostname)}">${esc(w.hostname)}</a>`],
      ["Status", (w) => `<span class="${esc(w.status)}">${esc(w.status)}</span>`],
      ["Queue", (w) => esc(w.queue)], ["Concurrency", (w) => num(w.concurrency), "num"],
      ["Active", (w) => num(w.active), "num"], ["Succeeded", (w) => num(w.succeeded), "num"],
      ["Failed", (w) => num(w.failed), "num"], ["Retried", (w) => num(w.retried), "num"],
      ["Memory kills", (w) => num(w.memory_kills), "num"],
      ["CPU %", (w) => num(w.cpu_percent, 1), "num"], ["RSS", (w) => bytes(w.rss), "num"],
      ["Load", (w) => esc((w.loadavg || []).join(" "))], ["Last seen", (w) => when(w.seen)],
    ], ws, "workers")};
  },
  async worker(name) {
    const w = await get("/api/fleet/workers/" + encodeURIComponent(name));
    const i = w.inspect || {}, st = i.stats || {}, pool = st.pool || {};
    const p = "/api/worker/";
    return `<h2>Worker ${esc(name)} <span class="${esc(w.status)}">${esc(w.status)}</span></h2>` +
      `<p>${act("Shut down", p + "shutdown/" + name, `Shut down ${name}? Its running tasks finish first.`)}` +
      act("Restart pool", p + "pool/restart/" + name, `Restart ${name}'s pool?`) +
      act("Grow pool", p + "pool/grow/" + name, `Grow ${name}'s pool by 1?`, {n: 1}) +
      act("Shrink pool", p + "pool/shrink/" + name, `Shrink ${name}'s pool by 1?`, {n: 1}) +
      act("Autoscale pool", p + "pool/autoscale/" + name, `Set ${name}'s pool autoscale bounds?`, null, "min,max") +
      act("Add consumer", p + "queue/add-consumer/" + name, `Add a consumer on ${name}?`, null, "queue") +
      act("Cancel consumer", p + "queue/cancel-consumer/" + name, `Cancel a consumer on ${name}?`, null, "queue") + "</p>" +
      table([["Setting", (r) => esc(r[0])], ["Value", (r) => esc(r[1])]], [
        ["queue", w.queue], ["pool", pool.implementation], ["max concurrency", pool["max-concurrency"]],
        ["processes", (pool.processes || []).join(", ")], ["prefetch count", st.prefetch_count],
        ["time limits (soft/hard)", JSON.stringify(pool.timeouts)], ["CPU %", num(w.cpu_percent, 1)],
        ["RSS", bytes(w.rss)], ["memory available", bytes(w.memory_available)],
        ["succeeded / failed / retried", `${w.succeeded} / ${w.failed} / ${w.retried}`],
        ["memory-limit kills", w.memory_kills], ["software", `${w.sw_ident || ""} ${w.sw_ver || ""} ${w.sw_sys || ""}`],
        ["queues consumed", (i.active_queues || []).map((q) => q.name).join(", ")],
      ], "worker-info") +
      `<h3>Registered tasks</h3><pre>${esc((i.registered || []).join("\n"))}</pre>` +
      `<h3>Configuration</h3><pre>${esc(JSON.stringify(i.conf || {}, null, 1))}</pre>` +
      `<h3>Stats</h3><pre>${esc(JSON.stringify(st, null, 1))}</pre>`;
  },
  async queues() {
    const qs = await get("/api/fleet/queues");
    const q = "/api/fleet/queues/";
    return {title: `<h2>Queues</h2>`, plots: "queues", html: table([
      ["Queue", (r) => esc(r.name) + (r.paused ? " (paused)" : "")],
      ["Waiting", (r) => num(r.waiting), "num"], ["Reserved", (r) => num(r.reserved), "num"],
      ["Running", (r) => num(r.running), "num"], ["Oldest", (r) => age(r.oldest_age), "num"],
      ["Arrival /s", (r) => num(r.arrival_rate, 2), "num"], ["Completion /s", (r) => num(r.completion_rate, 2), "num"],
      ["Workers", (r) => num(r.workers), "num"],
      ["Replicas (desired/actual)", (r) => `${num(r.replicas_desired)} / ${num(r.replicas_actual)}`, "num"],
      ["Bounds", (r) => `${r.min_replicas}..${r.max_replicas}`, "num"],
      ["", (r) => (r.paused ? act("Resume", q + r.name + "/resume", `Resume queue ${r.name}?`)
                           : act("Pause", q + r.name + "/pause", `Pause queue ${r.name}? Its workers stop taking tasks.`)) +
                  act("Set bounds", q + r.name + "/bounds", `Change ${r.name}'s autoscaler bounds?`,
                      {min_replicas: r.min_replicas, max_replicas: r.max_replicas}, "min_replicas,max_replicas")],
    ], qs, "queues") + await deadLetters()};
  },
  async tasks() {
    const f = new URLSearchParams(location.hash.split("?")[1] || "");
    const qs = new URLSearchParams();
    for (const k of ["name", "worker", "queue", "search", "before"]) if (f.get(k)) qs.set(k, f.get(k));
    for (const s of f.getAll("state")) qs.append("state", s);
    if (f.get("minutes")) qs.set("since", Date.now() / 1000 - 60 * Number(f.get("minutes")));
    const body = await get("/api/fleet/tasks?" + qs);
    const states = ["RECEIVED", "STARTED", "SUCCESS", "FAILURE", "RETRY", "REVOKED"];
    const chosen = new Set(f.getAll("state"));
    return `<h2>Tasks</h2><form class="filters" id="task-filters">` +
      states.map((s) => `<label><input type="checkbox" name="state" value="${s}" ${chosen.has(s) ? "checked" : ""}>${s}</label>`).join("") +
      ["name", "worker", "queue", "search"].map((k) => `<input name="${k}" placeholder="${k}" value="${esc(f.get(k))}">`).join("") +
      `<select name="minutes"><option value="">any time</option>${[5, 60, 1440].map((m) => `<option value="${m}" ${f.get("minutes") == m ? "selected" : ""}>last ${m} min</option>`).join("")}</select>` +
      `<button type="submit">Filter</button></form>` + table([
        ["Task", (t) => `<a href="#/task/${esc(t.uuid)}">${esc(t.uuid)}</a>`], ["Name", (t) => esc(t.name)],
        ["State", (t) => `<span class="${esc(t.state)}">${esc(t.state)}</span>`], ["Queue", (t) => esc(t.queue)],
        ["Worker", (t) => esc(t.worker)], ["Received", (t) => when(t.received)], ["Runtime", (t) => num(t.runtime, 3), "num"],
        ["Args", (t) => esc((t.args || "").slice(0, 80))],
      ], body.tasks, "tasks") +
      (body.next ? `<a id="older" href="#/tasks?${(() => { const n = new URLSearchParams(f); n.set("before", body.next); return n; })()}">older →</a>` : "");
  },
  async task(id) {
    const t = await get("/api/fleet/tasks/" + encodeURIComponent(id));
    const live = !["SUCCESS", "FAILURE", "REVOKED"].includes(t.state);
    return `<h2>Task ${esc(id)} <span class="${esc(t.state)}">${esc(t.state)}</span></h2><p>` +
      (live ? act("Revoke", "/api/task/revoke/" + id, `Revoke ${id}?`) +
              act("Terminate", "/api/task/revoke/" + id, `Terminate ${id}? Its process gets SIGTERM.`, {terminate: true}) : "") + "</p>" +
      table([["Field", (r) => esc(r[0])], ["Value", (r) => r[1]]], [
        ["name", esc(t.name)], ["queue", esc(t.queue)], ["worker", esc(t.worker)], ["retries", esc(t.retries)],
        ["timeline", `received ${when(t.received)} → started ${when(t.started)} → finished ${when(t.succeeded || t.failed || t.revoked)}`],
        ["runtime", num(t.runtime, 3) + " s"], ["memory limit exceeded", t.memory_kill ? '<span class="error">yes</span>' : "no"],
        ["args", `<pre>${esc(t.args)}</pre>`], ["kwargs", `<pre>${esc(t.kwargs)}</pre>`],
        ["result", `<pre>${esc(t.result)}</pre>`], ["exception", `<pre class="error">${esc(t.exception)}</pre>`],
        ["traceback", `<pre>${esc(t.traceback)}</pre>`], ["parent / root", `${esc(t.parent_id)} / ${esc(t.root_id)}`],
      ], "task-info");
  },
  async failures() {
    const groups = await get("/api/fleet/failures");
    return `<h2>Failures by exception</h2>` + table([
      ["Exception", (g) => `<a href="#/tasks?state=FAILURE&search=">${esc(g.exception)}</a>`],
      ["Count", (g) => num(g.count), "num"],
      ["Tasks", (g) => esc(Object.entries(g.tasks).map(([n, c]) => `${n} (${c})`).join(", "))],
      ["Latest", (g) => `<pre>${esc(g.example)}</pre>`],
    ], groups, "failures");
  },
  async jobs() {
    const jobs = await get("/api/fleet/jobs");
    return `<h2>Jobs</h2>` + table([
      ["Job", (j) => `<a href="#/job/${esc(j.id)}">${esc(j.id)}</a>`], ["Task", (j) => esc(j.task)],
      ["State", (j) => esc(j.state)], ["Progress", (j) => `<progress max="${j.total}" value="${j.done}"></progress> ${j.done}/${j.total}`],
      ["Failed", (j) => num(j.failed), "num"], ["Created", (j) => when(j.created)],
      ["", (j) => (j.failed ? act("Retry failed", `/api/fleet/jobs/${j.id}/retry`, `Re-run ${j.failed} failed chunks of ${j.id}?`) : "") +
                  (["running", "aggregating"].includes(j.state) ? act("Revoke job", `/api/fleet/jobs/${j.id}/revoke`, `Revoke every task of ${j.id}?`) : "")],
    ], jobs, "jobs");
  },
  async job(id) {
    const j = await get("/api/fleet/jobs/" + encodeURIComponent(id));
    return `<h2>Job ${esc(id)} — ${esc(j.state)}</h2><p><progress max="${j.total}" value="${j.done}"></progress> ${j.done}/${j.total} done, ${j.failed} failed. ` +
      act("Retry failed", `/api/fleet/jobs/${id}/retry`, `Re-run the failed chunks of ${id}?`) +
      act("Revoke job", `/api/fleet/jobs/${id}/revoke`, `Revoke every task of ${id}?`) + `</p><p>result: ${esc(j.result_url)} ${esc(j.error)}</p>` +
      `<h3>Failed chunks</h3>` + table([["Chunk", (c) => num(c.index)], ["Error", (c) => `<pre>${esc(c.error)}</pre>`]], j.failed_chunks) +
      `<h3>Tasks</h3>` + table([["Task", (t) => `<a href="#/task/${esc(t.uuid)}">${esc(t.uuid)}</a>`], ["State", (t) => esc(t.state)], ["Worker", (t) => esc(t.worker)]], j.tasks);
  },
  async autoscaler() {
    const a = await get("/api/fleet/autoscaler");
    return `<h2>Autoscaler</h2>` + table([["Queue", (r) => esc(r[0])], ["Replicas", (r) => `${r[1].current} → ${r[1].desired}`], ["Why", (r) => esc(r[1].reason)], ["At", (r) => when(r[1].at)]],
      Object.entries(a.latest), "latest") + `<h3>Changes</h3>` +
      table([["At", (d) => when(d.at)], ["Queue", (d) => esc(d.queue)], ["Change", (d) => `${d.current} → ${d.desired}`], ["Reason", (d) => esc(d.reason)], ["Dry run", (d) => d.dry_run ? "yes" : ""]], a.decisions, "decisions");
  },
  async broker() {
    const b = await get("/api/fleet/broker");
    const r = b.rabbitmq;
    return `<h2>Broker</h2><p>${esc(b.transport)} at ${esc(b.url)}</p>` + table([
      ["Queue", (q) => esc(q.name)], ["Messages", (q) => num(q.messages), "num"], ["Unacked", (q) => num(q.unacked), "num"], ["Oldest", (q) => age(q.oldest_age)],
    ], b.queues, "broker") + (r ? `<h3>RabbitMQ at ${esc(r.url)}</h3>` + (r.error ? `<p class="error">${esc(r.error)}</p>` : "") + table([
      ["Queue", (q) => esc(q.name) + (q.exists ? "" : " (no such queue)")], ["Messages", (q) => num(q.messages), "num"], ["Consumers", (q) => num(q.consumers), "num"],
    ], r.queues, "rabbitmq") : "");
  },
  async whatif() {
    const q = whatifQuery(), key = q.toString();
    if (key !== whatif.key) runWhatif(key);  // not awaited: the page says it is running
    const chosen = q.get("since");
    return {keep: true, title: `<h2>What if</h2>`, html: `<p class="plot-note">The window's tasks (as <code>fleet trace export</code> has them) replayed by the simulator ` +
      `under the current settings and under the tuner's: cost and waits side by side (docs/dashboard.md, "What if").</p>` +
      `<form class="filters" id="whatif-form"><span class="windows" role="group" aria-label="window">` +
      Object.entries(WHATIF_WINDOWS).map(([w, label]) => `<button type="button" data-whatif-since="${w}" aria-pressed="${w === chosen && !q.get("until")}">last ${label}</button>`).join("") +
      `</span><input name="since" placeholder="since (1h or ISO time)" value="${esc(chosen)}">` +
      `<input name="until" placeholder="until (default now)" value="${esc(q.get("until"))}">` +
      `<input name="queue" placeholder="queues (default all)" value="${esc(q.getAll("queue").join(","))}">` +
      `<button type="submit">Replay</button>` +
      `<textarea name="candidate" rows="3" cols="60" placeholder="candidate settings instead of the tuner's (queues.yaml YAML), e.g. queues: {io: {autoscaling: {max_replicas: 6}}}">${esc(q.get("candidate"))}</textarea>` +
      `</form>` + whatifBody()};
  },
  async audit() {
    const rows = await get("/api/fleet/audit");
    return `<h2>Audit log</h2>` + table([["At", (r) => new Date(r.at * 1000).toLocaleString()], ["Who", (r) => `${esc(r.user)} (${esc(r.role)})`],
      ["Action", (r) => esc(r.action)], ["Target", (r) => esc(r.target)], ["Parameters", (r) => esc(JSON.stringify(r.params))],
      ["Outcome", (r) => `<span class="${r.ok ? "" : "error"}">${esc(r.outcome)}</span>`]], rows, "audit");
  },
};

// A banner on every page while the store misses events it could not recover.
async function gapBanner() {
  const el = document.getElementById("gaps");
  let gaps = [];
  try { gaps = (await get("/api/fleet/overview")).event_gaps || []; } catch (err) { return; }
  el.hidden = !gaps.length;
  el.innerHTML = gaps.length ? `<strong>Events missing</strong> (tasks in these windows may be absent or show an old state):<ul>` +
    gaps.map((g) => `<li class="gap">${esc(new Date(g.since * 1000).toLocaleString())} – ${esc(new Date(g.until * 1000).toLocaleTimeString())}: ` +
      `${esc(g.meaning || g.reason)}${g.detail ? ` (${esc(g.detail)})` : ""}</li>`).join("") + "</ul>" : "";
}

async function render() {
  if (busy) return;
  gapBanner();
  const [path] = (location.hash.slice(2) || "workers").split("?");
  const [name, ...rest] = path.split("/");
  const page = pages[name] || pages.workers;
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("on", a.hash === "#/" + name);
  try {
    const out = await page(decodeURIComponent(rest.join("/")));
    const {title = "", html = out, plots: kind = null, keep = false} = typeof out === "string" ? {} : out;
    const active = document.activeElement && document.activeElement.closest("form") ? document.activeElement : null;
    // keep: a page whose HTML did not change is left alone (the what-if plots stay).
    if (!active && !(keep && title + html === shown)) { $title.innerHTML = title; $view.innerHTML = html; shown = title + html; }
    await plots.show(kind);
    document.getElementById("status").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (err) {
    document.getElementById("status").textContent = "error: " + err.message;
  }
}

document.addEventListener("submit", (e) => {
  if (e.target.id !== "whatif-form") return;
  e.preventDefault();
  const q = new URLSearchParams();
  for (const [k, v] of new FormData(e.target)) if (v.trim()) q.set(k, v.trim());
  const hash = "#/whatif?" + q;
  document.activeElement.blur();  // render() leaves a page alone while its form has focus
  if (location.hash === hash) { whatif.key = null; render(); } else location.hash = hash;  // Replay again
});
document.addEventListener("click", (e) => {
  const b = e.target.closest("button[data-whatif-since]");
  if (!b) return;
  const q = new URLSearchParams(location.hash.split("?")[1] || "");
  q.set("since", b.dataset.whatifSince); q.delete("until");
  b.blur();
  location.hash = "#/whatif?" + q;
});
document.addEventListener("submit", (e) => {
  if (e.target.id !== "task-filters") return;
  e.preventDefault();
  const q = new URLSearchParams();
  for (const [k, v] of new FormData(e.target)) if (v) q.append(k, v);
  location.hash = "#/tasks?" + q;
});
// #page holds the page's title, the plots (kept across refreshes) and the rest.
const $title = document.createElement("div"), $view = document.createElement("div");
$view.id = "view";
$view.textContent = $page.textContent;
plots.el = Object.assign(document.createElement("section"), {id: "plots", className: "plots", hidden: true});
$page.replaceChildren($title, plots.el, $view);
window.addEventListener("hashchange", render);
render();
timer = setInterval(render, REFRESH_MS);
