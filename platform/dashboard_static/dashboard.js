// walle release dashboard: polls the JSON API with the operator token and renders it.
// All data goes into the DOM through textContent / attributes, never as HTML.
"use strict";

const TOKEN_KEY = "walle.operatorToken";
const POLL_MS = 1500;
const $ = (id) => document.getElementById(id);

let pollTimer = null;
let shownTask = null;        // task whose history is open
let shownTaskLatest = null;  // its latest version when the history was loaded

function el(tag, text, attrs) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  return e;
}

function short(version) { return (version || "").slice(0, 10); }

function when(ts) {
  if (!ts) return "";
  return new Date(ts * 1000).toISOString().replace("T", " ").slice(0, 19) + "Z";
}

class AuthError extends Error {}

async function api(path, token) {
  const resp = await fetch(path, {headers: {"Authorization": "Bearer " + token}, cache: "no-store"});
  let body = null;
  try { body = await resp.json(); } catch (e) { body = null; }
  if (resp.status === 401) throw new AuthError((body && body.error) || "operator token refused");
  if (!resp.ok) throw new Error((body && body.error) || ("HTTP " + resp.status));
  return body;
}

function fillBody(table, rows) {
  const tbody = table.tBodies[0];
  tbody.replaceChildren(...rows);
}

function renderReleases(data) {
  const rows = data.releases.map((r) => {
    const tr = el("tr", null, {"data-release": r.id, "class": "state-" + r.state});
    const s = r.stats;
    const cell = (field, text, extra) => {
      const td = el("td", text, Object.assign({"data-field": field}, extra || {}));
      tr.appendChild(td);
      return td;
    };
    cell("id", r.id);
    cell("task", r.task + "@" + short(r.version), {"title": r.task + "@" + r.version, "class": "mono"});
    cell("rule", r.rule || "(every device)", {"class": "mono rule"});
    cell("stage", r.stage);
    const ro = cell("rollout", "");
    ro.appendChild(el("meter", null, {"min": 0, "max": 100, "value": r.rollout}));
    ro.appendChild(el("span", Number(r.rollout) + "%", {"class": "pct"}));
    cell("channel", r.channel);
    cell("state", r.state, {"class": "badge"});
    cell("delivered", s.delivered, {"class": "num"});
    cell("ran", s.ran, {"class": "num"});
    cell("runs", s.runs, {"class": "num"});
    cell("failed", s.failed, {"class": "num" + (s.failed ? " bad" : "")});
    cell("p50", Number(s.p50_duration_s).toFixed(3), {"class": "num"});
    cell("rejected", s.rejected, {"class": "num" + (s.rejected ? " bad" : "")});
    cell("rolled_back", s.rolled_back, {"class": "num" + (s.rolled_back ? " bad" : "")});
    const created = cell("created", null, {"class": "muted created"});
    created.appendChild(el("div", when(r.created_at), {"class": "nowrap"}));
    created.appendChild(el("div", "by " + r.created_by));
    cell("note", r.note, {"class": "note"});
    return tr;
  });
  fillBody($("releases"), rows);
  const more = data.releases_total > data.releases.length ? ` (newest ${data.releases.length} of ${data.releases_total})` : "";
  $("releases-count").textContent = data.releases_total + more;
}

function renderFleet(f) {
  $("fleet-seen").textContent = f.seen;
  $("fleet-enrolled").textContent = f.enrolled;
  fillBody($("fleet-app"), f.by_app_version.map((r) => {
    const tr = el("tr", null, {"data-key": r.app_version});
    tr.appendChild(el("td", r.app_version || "(unknown)", {"class": "mono"}));
    tr.appendChild(el("td", r.devices, {"class": "num", "data-field": "devices"}));
    return tr;
  }));
  fillBody($("fleet-task"), f.by_task_version.map((r) => {
    const tr = el("tr", null, {"data-key": r.task + "@" + r.version});
    tr.appendChild(el("td", r.task + "@" + short(r.version), {"class": "mono", "title": r.task + "@" + r.version}));
    tr.appendChild(el("td", r.devices, {"class": "num", "data-field": "devices"}));
    return tr;
  }));
}

function renderTasks(data) {
  fillBody($("tasks"), data.tasks.map((t) => {
    const tr = el("tr", null, {"data-task": t.name});
    const td = el("td");
    const b = el("button", t.name, {"type": "button", "class": "link", "data-task": t.name});
    b.addEventListener("click", () => openHistory(t.name));
    td.appendChild(b);
    tr.appendChild(td);
    tr.appendChild(el("td", short(t.version), {"class": "mono", "title": t.version}));
    tr.appendChild(el("td", t.message));
    tr.appendChild(el("td", t.author));
    tr.appendChild(el("td", when(t.created_at), {"class": "muted"}));
    return tr;
  }));
  const open = data.tasks.find((t) => t.name === shownTask);
  if (open && open.version !== shownTaskLatest) openHistory(open.name);  // a new version arrived
}

async function openHistory(name) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (!token) return;
  let data;
  try { data = await api("/api/tasks/" + encodeURIComponent(name) + "/history", token); }
  catch (e) { return failed(e); }
  shownTask = name;
  shownTaskLatest = data.versions.length ? data.versions[0].version : null;
  $("history-task").textContent = name;
  fillBody($("versions"), data.versions.map((v) => {
    const tr = el("tr", null, {"data-version": v.version});
    tr.appendChild(el("td", short(v.version), {"class": "mono", "title": v.version}));
    tr.appendChild(el("td", v.message));
    tr.appendChild(el("td", v.author));
    tr.appendChild(el("td", when(v.created_at), {"class": "muted"}));
    return tr;
  }));
  for (const [sel, idx] of [[$("diff-v1"), 1], [$("diff-v2"), 0]]) {
    sel.replaceChildren(...data.versions.map((v) => el("option", short(v.version) + " " + v.message, {"value": v.version})));
    sel.selectedIndex = Math.min(idx, data.versions.length - 1);  // default: previous -> latest
  }
  $("diff").replaceChildren();
  $("diff-error").hidden = true;
  $("history").hidden = false;
}

async function showDiff(ev) {
  ev.preventDefault();
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (!token || !shownTask) return;
  const q = new URLSearchParams({v1: $("diff-v1").value, v2: $("diff-v2").value});
  let data;
  try { data = await api("/api/tasks/" + encodeURIComponent(shownTask) + "/diff?" + q, token); }
  catch (e) {
    if (e instanceof AuthError) return failed(e);
    $("diff-error").textContent = e.message;
    $("diff-error").hidden = false;
    return;
  }
  $("diff-error").hidden = true;
  const lines = data.unified_diff ? data.unified_diff.replace(/\n$/, "").split("\n") : ["(no differences)"];
  $("diff").replaceChildren(...lines.map((line) => {
    let cls = "ctx";
    if (line.startsWith("+++") || line.startsWith("---") || line.startsWith("diff ") || line.startsWith("index ")) cls = "meta";
    else if (line.startsWith("+")) cls = "add";
    else if (line.startsWith("-")) cls = "del";
    else if (line.startsWith("@@")) cls = "hunk";
    return el("span", line, {"class": cls});  // block spans: one per line
  }));
}

function render(data) {
  $("operator").textContent = data.operator;
  renderReleases(data);
  renderFleet(data.fleet);
  renderTasks(data);
  const t = new Date(data.server_time * 1000);
  $("updated").textContent = t.toLocaleTimeString();
  $("updated").setAttribute("datetime", t.toISOString());
  $("stale").hidden = true;
}

function clearData() {
  for (const id of ["releases", "fleet-app", "fleet-task", "tasks", "versions"]) fillBody($(id), []);
  for (const id of ["operator", "updated", "fleet-seen", "fleet-enrolled", "releases-count", "history-task"]) $(id).textContent = "";
  $("diff").replaceChildren();
  shownTask = shownTaskLatest = null;
}

function showLogin(message) {
  if (pollTimer) { clearTimeout(pollTimer); pollTimer = null; }
  clearData();
  $("app").hidden = true;
  $("history").hidden = true;
  $("status").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
  $("login-error").hidden = !message;
  $("token").focus();
}

function failed(e) {
  if (e instanceof AuthError) {
    sessionStorage.removeItem(TOKEN_KEY);
    showLogin("Login refused: " + e.message);
  } else {
    $("stale").textContent = "update failed: " + e.message;
    $("stale").hidden = false;
  }
}

async function poll() {
  pollTimer = null;
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (!token) return showLogin("");
  try {
    render(await api("/api/overview", token));
  } catch (e) {
    failed(e);
    if (e instanceof AuthError) return;
  }
  pollTimer = setTimeout(poll, POLL_MS);
}

async function login(ev) {
  ev.preventDefault();
  const token = $("token").value.trim();
  if (!token) return;
  let data;
  try { data = await api("/api/overview", token); }
  catch (e) {
    return showLogin((e instanceof AuthError ? "Login refused: " : "Cannot reach the platform: ") + e.message);
  }
  sessionStorage.setItem(TOKEN_KEY, token);
  $("token").value = "";
  $("login").hidden = true;
  $("app").hidden = false;
  $("status").hidden = false;
  render(data);
  pollTimer = setTimeout(poll, POLL_MS);
}

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", login);
  $("diff-form").addEventListener("submit", showDiff);
  $("logout").addEventListener("click", () => { sessionStorage.removeItem(TOKEN_KEY); showLogin(""); });
  if (sessionStorage.getItem(TOKEN_KEY)) {
    $("app").hidden = false;
    $("status").hidden = false;
    poll();
  } else {
    showLogin("");
  }
});
