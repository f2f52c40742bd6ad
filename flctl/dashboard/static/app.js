// flctl dashboard: fills the page from /api/... and follows /api/stream (server-sent events).
// Everything the coordinator says is written with textContent, never parsed as HTML.
"use strict";

const body = document.body;
const PAGE = body.dataset.page;
const ACTIONS = body.dataset.actions === "on";
const CSRF = document.querySelector('meta[name="csrf-token"]').content;
const main = document.getElementById("main");

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

const SVG = "http://www.w3.org/2000/svg";
function svg(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
  return node;
}

function fmtTime(unix) { return unix ? new Date(unix * 1000).toLocaleTimeString() : "–"; }
function fmtDate(unix) { return unix ? new Date(unix * 1000).toLocaleString() : "–"; }
function fmtNum(v, digits = 4) {
  if (typeof v !== "number") return v === undefined || v === null ? "–" : String(v);
  return Number.isInteger(v) ? String(v) : v.toFixed(digits);
}
function fmtBytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0; let v = n;
  while (Math.abs(v) >= 1024 && i < units.length - 1) { v /= 1024; i += 1; }
  return i === 0 ? `${v} B` : `${v.toFixed(1)} ${units[i]}`;
}
function fmtMetrics(m) {
  return Object.entries(m || {}).map(([k, v]) => `${k} ${fmtNum(v)}`).join(", ") || "–";
}
const SHORT = { selecting: "select", training: "train", aggregating: "aggregate", evaluating: "evaluate" };
function fmtPhases(phases) {
  return (phases || []).filter((p) => SHORT[p.phase]).map((p) => `${SHORT[p.phase]} ${fmtNum(p.seconds, 2)} s`).join(" · ") || "–";
}
function statusCell(status) { return el("td", { class: `status-${status}` }, status); }

// replaceChildren without the absent parts (a null would be written as "null")
function show(...nodes) { main.replaceChildren(...nodes.flat().filter((n) => n !== null && n !== undefined)); }

function banner(text, ok) {
  const node = document.getElementById("banner");
  node.textContent = text;
  node.className = ok ? "banner ok" : "banner";
  node.hidden = !text;
}

async function getJSON(path) {
  let response;
  try {
    response = await fetch(path, { headers: { accept: "application/json" } });
  } catch (err) {
    throw new Error("the dashboard server does not answer");
  }
  let data = {};
  try { data = await response.json(); } catch (err) { data = {}; }
  if (response.status === 401) { window.location.assign("/login"); }
  if (!response.ok) {
    throw new Error((data.error || `HTTP ${response.status}`) + (data.hint ? ` (${data.hint})` : ""));
  }
  if (typeof data.as_of_seq === "number") asOf = Math.min(asOf, data.as_of_seq);
  return data;
}

// ------------------------------------------------------------------ actions

function confirmAction(text, field) {
  const dialog = document.getElementById("confirm");
  document.getElementById("confirm-text").textContent = text;
  const label = document.getElementById("confirm-field");
  const input = document.getElementById("confirm-input");
  label.hidden = !field;
  input.value = "";
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => {
      resolve(dialog.returnValue === "ok" ? (field ? input.value : true) : null);
    }, { once: true });
    dialog.returnValue = "";
    dialog.showModal();
  });
}

async function act(name, payload, text, field) {
  const answer = await confirmAction(text, field);
  if (answer === null || answer === "") return;
  if (field) payload[field] = answer;
  const response = await fetch(`/api/actions/${name}`, {
    method: "POST",
    headers: { "content-type": "application/json", "x-csrf-token": CSRF },
    body: JSON.stringify(payload),
  });
  let data = {};
  try { data = await response.json(); } catch (err) { data = {}; }
  if (response.ok) banner(data.done || "done", true);
  else banner(`${name} refused: ${data.error || response.status}`, false);
  refresh();
}

function actionButton(label, onclick) {
  return ACTIONS ? el("button", { class: "action", "data-action": label, onclick }, label) : null;
}

// ------------------------------------------------------------------ chart

function chart(points) {
  const names = [];
  for (const p of points) for (const k of Object.keys(p.metrics)) if (!names.includes(k)) names.push(k);
  const chosen = ["accuracy", "loss"].filter((k) => names.includes(k));
  const series = chosen.length ? chosen : names.slice(0, 2);
  const width = 800; const height = 220; const pad = 34;
  const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": "metrics over rounds" });
  root.append(svg("line", { class: "axis", x1: pad, y1: height - pad, x2: width - 10, y2: height - pad }));
  if (!points.length) {
    const t = svg("text", { x: width / 2 - 60, y: height / 2 }); t.textContent = "no committed round yet";
    root.append(t);
  }
  const rounds = points.map((p) => p.round);
  const minR = Math.min(...rounds); const maxR = Math.max(...rounds);
  const x = (r) => pad + (maxR === minR ? 0.5 : (r - minR) / (maxR - minR)) * (width - pad - 20);
  series.forEach((name, i) => {
    const values = points.filter((p) => typeof p.metrics[name] === "number");
    if (!values.length) return;
    const vs = values.map((p) => p.metrics[name]);
    const lo = Math.min(...vs); const hi = Math.max(...vs);
    const y = (v) => 10 + (hi === lo ? 0.5 : 1 - (v - lo) / (hi - lo)) * (height - pad - 20);
    root.append(svg("polyline", { class: `series-${i}`, points: values.map((p) => `${x(p.round)},${y(p.metrics[name])}`).join(" ") }));
    for (const p of values) {
      const dot = svg("circle", { class: `point series-${i}`, cx: x(p.round), cy: y(p.metrics[name]), r: 3, "data-round": p.round, "data-metric": name });
      const tip = svg("title", {}); tip.textContent = `round ${p.round}: ${name} ${fmtNum(p.metrics[name])}`;
      dot.append(tip); root.append(dot);
    }
  });
  if (points.length) {
    for (const r of [minR, maxR]) {
      const t = svg("text", { x: x(r) - 4, y: height - pad + 16 }); t.textContent = `r${r}`; root.append(t);
    }
  }
  const legend = el("div", { class: "legend" }, series.map((s, i) => el("span", { class: `series-${i}` }, `● ${s}`)));
  return el("div", { class: "chart", id: "chart" }, root, legend);
}

// ------------------------------------------------------------------ pages

function card(label, value, id) {
  return el("div", { class: "card", id }, el("div", { class: "label" }, label), el("div", { class: "value" }, value));
}

function eventsTable(events, id) {
  return el("table", { id },
    el("thead", {}, el("tr", {}, ["seq", "time", "type", "round", "client", "details"].map((h) => el("th", {}, h)))),
    el("tbody", {}, events.map((e) => el("tr", { "data-seq": e.seq, "data-type": e.type },
      el("td", { class: "num" }, e.seq), el("td", {}, fmtTime(e.time_unix)), el("td", {}, e.type),
      el("td", { class: "num" }, e.round || ""), el("td", {}, e.client_id),
      el("td", {}, el("pre", {}, JSON.stringify(e.data)))))));
}

async function renderOverview() {
  const d = await getJSON("/api/overview");
  const running = d.running;
  const left = d.open_round ? Math.max(0, d.open_round.deadline_unix - d.now_unix) : null;
  const states = Object.entries(d.clients_by_state).map(([s, n]) => `${n} ${s}`).join(", ") || "none";
  const privacy = d.privacy
    ? `ε ${fmtNum(d.privacy.epsilon, 3)} of ${d.privacy.budget ? fmtNum(d.privacy.budget, 3) : "∞"}`
    : "off";
  const parts = [
    el("h1", {}, "Overview"),
    d.warnings.length ? el("div", { class: "banner" }, d.warnings.join("; ")) : null,
    el("div", { class: "grid" },
      card("head model", d.head_version ? `v${d.head_version}` : "none", "head"),
      card("running round", running ? `round ${running.round}: ${running.status}` : "none", "running"),
      card("time left", left === null ? "–" : `${left.toFixed(0)} s`, "time-left"),
      card("rounds", `${d.rounds_total} (${d.queued} queued)`, "rounds-total"),
      card("clients", states, "clients"),
      card("privacy", privacy, "privacy")),
  ];
  if (running && ACTIONS) {
    parts.push(el("p", {}, actionButton("cancel round", () => act("cancel", { round: running.round }, `Cancel round ${running.round}?`))));
  }
  if (d.open_round) {
    parts.push(el("h2", {}, `Round ${d.open_round.round}: ${d.open_round.at_deadline}`));
    parts.push(el("table", { id: "participants" },
      el("thead", {}, el("tr", {}, ["client", "state", "progress", "rate"].map((h) => el("th", {}, h)))),
      el("tbody", {}, d.open_round.participants.map((p) => el("tr", {},
        el("td", {}, p.client_id), el("td", {}, p.state),
        el("td", {}, el("div", { class: "bar" }, el("span", { style: null, "data-progress": p.progress }))),
        el("td", { class: "num" }, p.bytes_per_s ? `${fmtBytes(p.bytes_per_s)}/s` : "–"))))));
  }
  parts.push(el("h2", {}, "Metrics over rounds"), chart(d.chart));
  parts.push(el("h2", {}, "Last events"), eventsTable(d.events, "last-events"));
  show(parts);
  for (const bar of main.querySelectorAll("[data-progress]")) bar.style.width = `${Math.round(Number(bar.dataset.progress) * 100)}%`;
}

async function renderRounds() {
  const params = new URLSearchParams(window.location.search);
  const before = params.get("before") || "";
  const d = await getJSON(`/api/rounds?limit=50${before ? `&before=${encodeURIComponent(before)}` : ""}`);
  const rows = d.rounds.map((r) => el("tr", { "data-round": r.round },
    el("td", {}, el("a", { href: `/rounds/${r.round}` }, r.round)), statusCell(r.status),
    el("td", { class: "num" }, r.num_clients), el("td", { class: "num" }, fmtNum(r.duration_s, 2)),
    el("td", {}, fmtPhases(r.phases)), el("td", {}, fmtMetrics(r.metrics)), el("td", {}, r.reason),
    el("td", {}, fmtDate(r.created_unix))));
  const oldest = d.rounds.length ? d.rounds[d.rounds.length - 1].round : 0;
  show(
    el("h1", {}, `Rounds (${d.rounds_total})`),
    el("table", { id: "rounds" },
      el("thead", {}, el("tr", {}, ["round", "status", "clients", "seconds", "phases", "metrics", "reason", "created"].map((h) => el("th", {}, h)))),
      el("tbody", {}, rows)),
    oldest > 1 ? el("p", {}, el("a", { href: `/rounds?before=${oldest}` }, "older rounds →")) : null);
}

async function renderRound() {
  const id = window.location.pathname.split("/").pop();
  const d = await getJSON(`/api/rounds/${encodeURIComponent(id)}`);
  const r = d.round;
  show(
    el("h1", {}, `Round ${r.round}`),
    el("div", { class: "grid" }, card("status", r.status, "round-status"), card("clients", r.num_clients),
      card("seconds", fmtNum(r.duration_s, 2)), card("model", r.model_version ? `v${r.model_version}` : "–")),
    r.reason ? el("p", { class: "error" }, r.reason) : null,
    el("h2", {}, "Metrics"), el("p", {}, fmtMetrics(r.metrics)),
    el("h2", {}, "Phases"),
    el("table", { id: "phases" }, el("tbody", {}, r.phases.map((p) => el("tr", {}, el("td", {}, p.phase), el("td", { class: "num" }, `${fmtNum(p.seconds, 3)} s`))))),
    el("h2", {}, "Updates"),
    el("table", { id: "updates" },
      el("thead", {}, el("tr", {}, ["client", "status", "examples", "size", "scores", "outlier", "reason"].map((h) => el("th", {}, h)))),
      el("tbody", {}, (r.updates || []).map((u) => el("tr", {},
        el("td", {}, u.client_id), statusCell(u.status), el("td", { class: "num" }, u.num_examples),
        el("td", { class: "num" }, u.size === undefined ? "–" : fmtBytes(u.size) + (u.wire_bytes !== u.size ? ` (${fmtBytes(u.wire_bytes)} sent)` : "")),
        el("td", {}, fmtMetrics(u.scores)), el("td", {}, u.excluded ? `excluded: ${u.outlier}` : u.outlier),
        el("td", {}, u.reason))))),
    r.updates_left_out ? el("p", { class: "muted" }, `${r.updates_left_out} more updates not listed`) : null,
    el("h2", {}, "Events"), eventsTable(d.events.slice().reverse(), "round-events"));
}

async function renderClients() {
  const d = await getJSON("/api/clients");
  show(
    el("h1", {}, "Clients"),
    el("table", { id: "clients" },
      el("thead", {}, el("tr", {}, ["client", "state", "this round", "progress", "rate", "last seen", "rounds", "up", "down", ""].map((h) => el("th", {}, h)))),
      el("tbody", {}, d.clients.map((c) => el("tr", { "data-client": c.client_id },
        el("td", {}, c.client_id), el("td", {}, c.state), el("td", {}, c.round_state || "–"),
        el("td", {}, c.progress === undefined ? "–" : `${Math.round(c.progress * 100)} %`),
        el("td", { class: "num" }, c.bytes_per_s ? `${fmtBytes(c.bytes_per_s)}/s` : "–"),
        el("td", {}, fmtTime(c.last_seen_unix)), el("td", { class: "num" }, c.rounds_joined),
        el("td", { class: "num" }, fmtBytes(c.bytes_up)), el("td", { class: "num" }, fmtBytes(c.bytes_down)),
        el("td", {},
          actionButton("evict", () => act("evict", { client_id: c.client_id }, `End ${c.client_id}'s session? It may join again.`)),
          c.state === "revoked" ? null : actionButton("revoke", () => act("revoke", { identity: c.client_id }, `Revoke ${c.client_id}? It is refused from now on.`))))))));
}

async function renderModels() {
  const d = await getJSON("/api/models?limit=100");
  const versions = d.models.map((m) => m.version);
  const pick = (id) => el("select", { id }, versions.map((v) => el("option", { value: v }, `v${v}`)));
  const a = pick("diff-a"); const b = pick("diff-b");
  if (versions.length > 1) b.selectedIndex = 1;
  show(
    el("h1", {}, "Models"),
    el("div", { class: "filters" }, "Compare", a, "with", b,
      el("button", { id: "compare", onclick: () => window.location.assign(`/models/diff?a=${a.value}&b=${b.value}`) }, "Compare")),
    el("table", { id: "models" },
      el("thead", {}, el("tr", {}, ["version", "kind", "parent", "round", "tags", "metrics", "digest", "created", ""].map((h) => el("th", {}, h)))),
      el("tbody", {}, d.models.map((m) => el("tr", { "data-version": m.version },
        el("td", {}, `v${m.version}${m.is_head ? " (head)" : ""}`), el("td", {}, m.kind),
        el("td", {}, m.parent ? `v${m.parent}` : "–"), el("td", {}, m.server_round || "–"),
        el("td", {}, m.tags.join(", ")), el("td", {}, fmtMetrics(m.metrics)),
        el("td", {}, el("code", {}, m.digest.slice(0, 12))), el("td", {}, fmtDate(m.created_unix)),
        el("td", {},
          m.is_head ? null : actionButton("rollback", () => act("rollback", { version: m.version }, `Make version ${m.version}'s weights the head again (a new version)?`)),
          actionButton("tag", () => act("tag", { version: m.version }, `Tag version ${m.version} as:`, "name"))))))));
}

async function renderDiff() {
  const params = new URLSearchParams(window.location.search);
  const d = await getJSON(`/api/models/diff?a=${encodeURIComponent(params.get("a") || "")}&b=${encodeURIComponent(params.get("b") || "")}`);
  const row = (label, f) => el("tr", {}, el("th", {}, label), el("td", {}, f(d.a)), el("td", {}, f(d.b)));
  show(
    el("h1", {}, `v${d.a.version} → v${d.b.version}`),
    el("p", { id: "same-weights" }, d.same_weights ? "Same weights (same digest)." : "Different weights."),
    el("table", { id: "diff" },
      el("thead", {}, el("tr", {}, el("th", {}, ""), el("th", {}, `v${d.a.version}`), el("th", {}, `v${d.b.version}`))),
      el("tbody", {}, row("kind", (m) => m.kind), row("parent", (m) => (m.parent ? `v${m.parent}` : "–")),
        row("round", (m) => m.server_round || "–"), row("tags", (m) => m.tags.join(", ")),
        row("digest", (m) => m.digest), row("created", (m) => fmtDate(m.created_unix)))),
    el("h2", {}, "Metrics"),
    el("table", { id: "diff-metrics" },
      el("thead", {}, el("tr", {}, ["metric", `v${d.a.version}`, `v${d.b.version}`, "change"].map((h) => el("th", {}, h)))),
      el("tbody", {}, d.metrics.map((m) => el("tr", {}, el("td", {}, m.name), el("td", { class: "num" }, fmtNum(m.a)), el("td", { class: "num" }, fmtNum(m.b)), el("td", { class: "num" }, m.change === null ? "–" : fmtNum(m.change)))))));
}

async function renderEvents() {
  const params = new URLSearchParams(window.location.search);
  const type = params.get("type") || "";
  const before = params.get("before") || "";
  const d = await getJSON(`/api/events?limit=100&type=${encodeURIComponent(type)}${before ? `&before=${encodeURIComponent(before)}` : ""}`);
  const input = el("input", { id: "type-filter", value: type, placeholder: "type, prefix or admin" });
  const oldest = d.events.length ? d.events[d.events.length - 1].seq : 0;
  show(
    el("h1", {}, "Events"),
    el("form", { class: "filters", onsubmit: (e) => { e.preventDefault(); window.location.assign(`/events?type=${encodeURIComponent(input.value)}`); } },
      "Type", input, el("button", { type: "submit" }, "Filter"),
      el("a", { href: "/events?type=admin" }, "audit trail")),
    eventsTable(d.events, "events"),
    oldest > 1 ? el("p", {}, el("a", { href: `/events?type=${encodeURIComponent(type)}&before=${oldest}` }, "older events →")) : null);
}

const RENDER = { overview: renderOverview, rounds: renderRounds, round: renderRound, clients: renderClients, models: renderModels, diff: renderDiff, events: renderEvents };

let busy = false; let again = false;
// the newest event the stream brought, and the oldest event the page's last answers knew of
let latestSeq = 0; let asOf = Infinity;
async function refresh() {
  if (busy) { again = true; return; }
  busy = true;
  asOf = Infinity;
  try {
    await RENDER[PAGE]();
    if (document.getElementById("banner").className === "banner") banner("", false);
  } catch (err) {
    banner(err.message, false);
  } finally {
    busy = false;
    body.dataset.loaded = String(Date.now());
    if (again) { again = false; setTimeout(refresh, 50); }
    // the server answered from a read older than the last event: ask again shortly
    else if (asOf !== Infinity && asOf < latestSeq) setTimeout(soon, 600);
  }
}

let timer = null;
function soon() { if (timer === null) timer = setTimeout(() => { timer = null; refresh(); }, 150); }

function follow() {
  const link = document.getElementById("link");
  const source = new EventSource("/api/stream");
  source.onmessage = (message) => {
    const data = JSON.parse(message.data);
    if (data.kind === "link") {
      latestSeq = Math.max(latestSeq, data.seq || 0);
      link.textContent = data.connected ? `live · ${data.leader}` : `coordinator unreachable: ${data.error || "connecting"}`;
      link.className = data.connected ? "link up" : "link";
      body.dataset.live = data.connected ? "on" : "off";
      if (data.connected) soon();
    } else if (data.kind === "events" && data.events.length) {
      latestSeq = Math.max(latestSeq, data.events[data.events.length - 1].seq);
      body.dataset.lastSeq = String(latestSeq);
      soon();
    }
  };
  source.onerror = () => { link.textContent = "dashboard server unreachable"; link.className = "link"; };
}

refresh();
follow();
setInterval(() => { if (PAGE === "overview" || PAGE === "clients") soon(); }, 2000);
