// The kappa web UI: the pipeline as a DAG (topics → bronze → silver → gold) with each model's
// version, state, lag, rate, replay progress and expectations; recent alerts; a table browser
// and a query box whose result draws as a line or bar chart. Everything comes from the HTTP
// API (/v1/models, /v1/status, /v1/sql), polled once a second; no asset comes from elsewhere.
"use strict";

const POLL_MS = 1000;
const REPLAY_POLL_MS = 250; // while a replay runs, to follow its progress closely
const MODELS_EVERY = 5; // polls between rereads of the project graph
const SVG = "http://www.w3.org/2000/svg";
const NODE_W = 230, NODE_H = 84, COL_GAP = 70, ROW_GAP = 18, TOP = 34, LEFT = 16;

let graph = null;      // GET /v1/models
let status = null;     // GET /v1/status
let selected = null;   // the model whose details show
let lastResult = null; // the last query's answer
let queries = 0;       // queries sent: only the newest one's answer is shown
let polls = 0;

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

function svg(tag, attrs, text) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

async function api(path, options) {
  const response = await fetch(path, options);
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    const message = body && body.error ? body.error.message : response.status + " " + response.statusText;
    const error = new Error(message);
    error.status = response.status;
    throw error;
  }
  return body;
}

const fmt = new Intl.NumberFormat("en-US", { maximumFractionDigits: 1 });
function num(n) { return n === undefined || n === null ? "–" : fmt.format(n); }
function seconds(s) {
  if (s === undefined || s === null) return "–";
  if (s < 60) return fmt.format(s) + " s";
  if (s < 3600) return fmt.format(s / 60) + " min";
  return fmt.format(s / 3600) + " h";
}

// ---- the DAG ---------------------------------------------------------------------------

function layers() {
  const order = ["topics", "bronze"];
  for (const m of graph.models) if (!order.includes(m.layer)) order.push(m.layer);
  // silver before gold whatever order the models came in.
  const rank = (l) => ({ topics: 0, bronze: 1, silver: 2, gold: 3 })[l] ?? 2.5;
  return order.sort((a, b) => rank(a) - rank(b));
}

function statusOf(id) {
  if (!status) return null;
  return status.models.concat(status.bronze || []).find((m) => m.model === id) || null;
}

function replayOf(id) {
  if (!status) return null;
  return (status.versions || []).find((v) => v.model === id && v.state === "replaying") || null;
}

function nodes() {
  const all = [];
  for (const t of graph.topics) {
    all.push({ id: "topic:" + t.name, layer: "topics", title: t.name, topic: t });
    all.push({ id: t.bronze, layer: "bronze", title: t.bronze, inputs: ["topic:" + t.name] });
  }
  for (const m of graph.models) {
    const inputs = m.inputs.map((i) => (i.kind === "topic" ? "topic:" + i.name : i.name));
    all.push({ id: m.model, layer: m.layer, title: m.model, model: m, inputs });
  }
  return all;
}

function drawDag() {
  const dag = document.getElementById("dag");
  dag.replaceChildren();
  if (!graph) return;
  const columns = layers();
  const placed = new Map();
  const perColumn = columns.map(() => 0);
  for (const n of nodes()) {
    const c = columns.indexOf(n.layer);
    const x = LEFT + c * (NODE_W + COL_GAP);
    const y = TOP + perColumn[c] * (NODE_H + ROW_GAP);
    perColumn[c] += 1;
    placed.set(n.id, { ...n, x, y });
  }
  const width = LEFT * 2 + columns.length * NODE_W + (columns.length - 1) * COL_GAP;
  const height = TOP + Math.max(1, ...perColumn) * (NODE_H + ROW_GAP) + 10;
  dag.setAttribute("width", width);
  dag.setAttribute("height", height);
  dag.setAttribute("viewBox", `0 0 ${width} ${height}`);
  columns.forEach((l, c) => {
    dag.append(svg("text", { class: "layer-title", x: LEFT + c * (NODE_W + COL_GAP), y: 20 }, l));
  });
  for (const n of placed.values()) {
    for (const from of n.inputs || []) {
      const s = placed.get(from);
      if (!s) continue;
      const x1 = s.x + NODE_W, y1 = s.y + NODE_H / 2, x2 = n.x, y2 = n.y + NODE_H / 2;
      const mid = (x1 + x2) / 2;
      dag.append(svg("path", {
        class: "edge", "data-from": from, "data-to": n.id,
        d: `M${x1},${y1} C${mid},${y1} ${mid},${y2} ${x2},${y2}`,
      }));
    }
  }
  for (const n of placed.values()) dag.append(drawNode(n));
}

function drawNode(n) {
  const g = svg("g", { class: "node", "data-model": n.id, transform: `translate(${n.x},${n.y})` });
  g.append(svg("rect", { class: "box", width: NODE_W, height: NODE_H, rx: 6 }));
  g.append(svg("text", { class: "title", x: 10, y: 18 }, n.title));
  const lines = [];
  let state = "";
  if (n.topic) {
    lines.push(`${n.topic.partitions} partition${n.topic.partitions === 1 ? "" : "s"}`);
    lines.push(`${num(n.topic.records)} records`);
    state = "live";
  } else {
    const s = statusOf(n.id);
    const version = n.model ? n.model.version.slice(0, 12) : "raw";
    state = s ? s.state : "unknown";
    lines.push(`v ${version} · ${state}`);
    if (s) {
      lines.push(`lag ${num(s.lag_records)} rec · ${seconds(s.lag_seconds)}`);
      lines.push(`${num(s.records_per_second)} ev/s · ${num(s.rows)} rows`);
    }
    if (s && (s.state === "not running" || s.state === "restarting" || s.state === "quarantined")) {
      g.classList.add("failing");
    }
    if (s && s.detail) g.append(svg("title", {}, s.detail));
  }
  g.classList.add(state.replace(/\s+/g, "-"));
  lines.forEach((line, i) => g.append(svg("text", { class: "sub", x: 10, y: 36 + i * 15 }, line)));
  const replay = replayOf(n.id);
  if (replay) {
    g.classList.add("replaying");
    const done = replay.percent_done || 0;
    const w = NODE_W - 20;
    g.append(svg("rect", { class: "bar-bg", x: 10, y: NODE_H - 9, width: w, height: 5 }));
    g.append(svg("rect", {
      class: "bar", x: 10, y: NODE_H - 9, width: (w * done) / 100, height: 5,
      role: "progressbar", "aria-valuenow": done.toFixed(1),
    }));
  }
  g.addEventListener("click", () => { selected = n.id; drawDetails(); });
  return g;
}

function drawDetails() {
  const box = document.getElementById("details");
  const n = graph && graph.models.find((m) => m.model === selected);
  if (!n) { box.hidden = true; return; }
  box.hidden = false;
  const s = statusOf(n.model);
  box.replaceChildren(
    el("h3", {}, n.model),
    el("div", {}, `version ${n.version}` + (n.materialization ? ` · ${n.materialization}` : "") +
      (s && s.detail ? ` · ${s.detail}` : "")),
    el("pre", {}, n.sql),
  );
  const open = el("button", { type: "button" }, `query ${n.model}`);
  open.addEventListener("click", () => browse(n.model));
  box.append(open);
}

function drawDeploy() {
  const box = document.getElementById("deploy");
  box.replaceChildren();
  const replaying = ((status && status.versions) || []).filter((v) => v.state === "replaying");
  for (const v of replaying) {
    const done = v.percent_done || 0;
    const bar = el("div", {
      class: "progress", role: "progressbar", "data-model": v.model,
      "aria-valuemin": "0", "aria-valuemax": "100", "aria-valuenow": done.toFixed(1),
    }, el("div", { style: `width:${done}%` }));
    box.append(el("div", { class: "replay" },
      el("strong", {}, `replaying ${v.model}`), el("span", {}, `v ${v.version.slice(0, 12)}`), bar,
      el("span", {}, `${done.toFixed(1)}%`),
      el("span", { class: "muted" }, `${num(v.records_per_second)} records/s · ETA ${seconds(v.eta_seconds)}`)));
  }
}

function drawQuality() {
  const body = document.querySelector("#expectations tbody");
  body.replaceChildren();
  for (const m of (graph && graph.models) || []) {
    for (const e of m.expectations) {
      let result;
      if (e.failing_in_last_commit === undefined) {
        const s = statusOf(m.model);
        result = s && s.state === "quarantined" ? ["fail", "blocked: " + (s.detail || "")] : ["muted", "audited per commit"];
      } else if (e.failing_in_last_commit === 0) {
        result = ["pass", "pass"];
      } else {
        result = [e.severity === "warn" ? "warn" : "fail", `${num(e.failing_in_last_commit)} failing`];
      }
      body.append(el("tr", {}, el("td", {}, m.model), el("td", {}, e.name), el("td", {}, e.kind),
        el("td", {}, e.severity), el("td", { class: result[0] }, result[1])));
    }
  }
  const alerts = document.getElementById("alerts");
  alerts.replaceChildren();
  const recent = ((status && status.alerts) || []).slice(-10).reverse();
  if (recent.length === 0) alerts.append(el("li", { class: "muted" }, "none"));
  for (const a of recent) alerts.append(el("li", {}, el("span", { class: "muted" }, a.at + " "), el("strong", {}, a.kind + " "), a.message));
}

function drawTables() {
  const list = document.getElementById("tables");
  const names = [];
  for (const t of graph.topics) names.push(t.bronze);
  for (const m of graph.models) names.push(m.model);
  if (list.dataset.names === names.join(",")) return;
  list.dataset.names = names.join(",");
  list.replaceChildren();
  for (const name of names) {
    const item = el("li", { "data-table": name }, name);
    item.addEventListener("click", () => browse(name));
    list.append(item);
  }
}

function browse(table) {
  document.getElementById("query").value = `SELECT * FROM ${table} LIMIT 100`;
  runQuery();
}

// ---- queries and charts ----------------------------------------------------------------

const NUMERIC = /^(U?Int|Float|Decimal)/;

async function runQuery() {
  const sql = document.getElementById("query").value;
  const note = document.getElementById("query-status");
  const result = document.getElementById("result");
  note.textContent = "running…";
  const started = performance.now();
  const mine = ++queries;
  let answer;
  try {
    answer = await api("/v1/sql", {
      method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ sql }),
    });
  } catch (e) {
    if (mine !== queries) return; // a newer query was sent meanwhile
    lastResult = null;
    note.textContent = "";
    result.replaceChildren(el("div", { class: "error", id: "query-error" }, e.message));
    document.getElementById("chart").replaceChildren();
    return;
  }
  if (mine !== queries) return;
  lastResult = answer;
  note.textContent = `${lastResult.rows.length} rows in ${Math.round(performance.now() - started)} ms`;
  chooseAxes();
  drawResult();
  drawChart();
}

function chooseAxes() {
  const cols = lastResult.columns;
  for (const id of ["chart-x", "chart-y"]) {
    const select = document.getElementById(id);
    select.replaceChildren(...cols.map((c, i) => el("option", { value: String(i) }, c.name)));
  }
  const y = cols.findIndex((c, i) => i > 0 && NUMERIC.test(c.type));
  document.getElementById("chart-x").value = "0";
  document.getElementById("chart-y").value = String(y >= 0 ? y : Math.min(1, cols.length - 1));
}

function drawResult() {
  const shown = lastResult.rows.slice(0, 1000);
  const head = el("tr", {}, ...lastResult.columns.map((c) => el("th", { title: c.type }, c.name)));
  const rows = shown.map((r) => el("tr", {}, ...r.map((v, i) => el("td",
    NUMERIC.test(lastResult.columns[i].type) ? { class: "num" } : {}, v === null ? "NULL" : String(v)))));
  document.getElementById("result").replaceChildren(el("table", { id: "result-table" }, el("thead", {}, head), el("tbody", {}, ...rows)));
}

function drawChart() {
  const box = document.getElementById("chart");
  box.replaceChildren();
  const kind = document.getElementById("chart-kind").value;
  if (!lastResult || kind === "none" || lastResult.rows.length === 0) return;
  const xi = Number(document.getElementById("chart-x").value);
  const yi = Number(document.getElementById("chart-y").value);
  const points = lastResult.rows.map((r) => ({ x: r[xi], y: Number.parseFloat(r[yi]) }))
    .filter((p) => Number.isFinite(p.y)).slice(0, 2000);
  if (points.length === 0) {
    box.append(el("div", { class: "error" }, `column ${lastResult.columns[yi].name} has no numbers to draw`));
    return;
  }
  const W = 720, H = 280, L = 60, R = 14, T = 14, B = 46;
  const chart = svg("svg", { width: W, height: H, viewBox: `0 0 ${W} ${H}`, class: kind, "data-points": points.length });
  const ymin = Math.min(0, ...points.map((p) => p.y)), ymax = Math.max(0, ...points.map((p) => p.y));
  const span = ymax - ymin || 1;
  const sy = (v) => T + (H - T - B) * (1 - (v - ymin) / span);
  const step = (W - L - R) / points.length;
  const sx = (i) => L + step * (i + 0.5);
  chart.append(svg("line", { class: "axis", x1: L, y1: sy(0), x2: W - R, y2: sy(0) }));
  chart.append(svg("line", { class: "axis", x1: L, y1: T, x2: L, y2: H - B }));
  for (const v of [ymin, (ymin + ymax) / 2, ymax]) {
    chart.append(svg("text", { x: L - 6, y: sy(v) + 4, "text-anchor": "end" }, num(v)));
  }
  const labelEvery = Math.ceil(points.length / 8);
  points.forEach((p, i) => {
    if (i % labelEvery === 0) {
      chart.append(svg("text", { x: sx(i), y: H - B + 16, "text-anchor": "middle" }, String(p.x).slice(0, 16)));
    }
  });
  if (kind === "bar") {
    points.forEach((p, i) => {
      const y0 = sy(Math.max(0, p.y)), y1 = sy(Math.min(0, p.y));
      const bar = svg("rect", { class: "bar", x: sx(i) - step * 0.4, y: y0, width: step * 0.8, height: Math.max(1, y1 - y0) });
      bar.append(svg("title", {}, `${p.x}: ${p.y}`));
      chart.append(bar);
    });
  } else {
    const d = points.map((p, i) => `${i === 0 ? "M" : "L"}${sx(i).toFixed(1)},${sy(p.y).toFixed(1)}`).join(" ");
    chart.append(svg("path", { class: "series", d }));
  }
  chart.append(svg("text", { x: L, y: H - 6 }, `${lastResult.columns[yi].name} by ${lastResult.columns[xi].name}`));
  box.append(chart);
}

// ---- live updates ----------------------------------------------------------------------

async function poll() {
  try {
    if (!graph || polls % MODELS_EVERY === 0) {
      try {
        graph = await api("/v1/models");
      } catch (e) {
        if (e.status !== 409) throw e;
        // A server without a project: no graph, the rest still shows.
        if (!graph) document.getElementById("server").textContent += " · " + e.message;
        graph = { topics: [], models: [] };
      }
      drawTables();
    }
    status = await api("/v1/status");
    polls += 1;
    drawDag();
    drawDeploy();
    drawQuality();
    if (selected) drawDetails();
    document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (e) {
    document.getElementById("updated").textContent = "not connected: " + e.message;
  }
  const replaying = status && (status.versions || []).some((v) => v.state === "replaying");
  setTimeout(poll, replaying ? REPLAY_POLL_MS : POLL_MS);
}

async function start() {
  try {
    const health = await api("/v1/health");
    document.getElementById("server").textContent = `v${health.version} · ${health.data_dir}`;
  } catch (e) { /* poll says so */ }
  document.getElementById("run").addEventListener("click", runQuery);
  document.getElementById("query").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); runQuery(); }
  });
  for (const id of ["chart-kind", "chart-x", "chart-y"]) {
    document.getElementById(id).addEventListener("change", drawChart);
  }
  // #sql=…&chart=bar opens with that query run and drawn: links to a result can be shared.
  const link = new URLSearchParams(location.hash.slice(1));
  if (link.get("sql")) {
    document.getElementById("query").value = link.get("sql");
    if (link.get("chart")) document.getElementById("chart-kind").value = link.get("chart");
    runQuery();
  }
  poll();
}

start();
