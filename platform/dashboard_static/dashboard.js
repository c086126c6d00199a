// walle release dashboard: polls the JSON API with the operator token and renders it.
// All data goes into the DOM through textContent / attributes, never as HTML.
"use strict";

const TOKEN_KEY = "walle.operatorToken";
const POLL_MS = 1500;
const $ = (id) => document.getElementById(id);

let pollTimer = null;
let shownTask = null;        // task whose history is open
let shownTaskLatest = null;  // its latest version when the history was loaded
let shownRelease = null;     // release whose drill-down is open
let shownDevice = null;      // device whose drill-down is open
let lastOverview = null;

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

function linkButton(text, attrs, onClick) {
  const b = el("button", text, Object.assign({"type": "button", "class": "link"}, attrs));
  b.addEventListener("click", onClick);
  return b;
}

function releaseFilter(r) {
  const task = $("filter-task").value.trim();
  const state = $("filter-state").value;
  if (task && !r.task.includes(task)) return false;
  if (state && r.state !== state) return false;
  if ($("filter-failing").checked && !r.stats.failed) return false;
  return true;
}

function renderReleases(data) {
  const shown = data.releases.filter(releaseFilter);
  const rows = shown.map((r) => {
    const tr = el("tr", null, {"data-release": r.id, "class": "state-" + r.state});
    const s = r.stats;
    const cell = (field, text, extra) => {
      const td = el("td", text, Object.assign({"data-field": field}, extra || {}));
      tr.appendChild(td);
      return td;
    };
    cell("id", null).appendChild(linkButton(r.id, {"data-open-release": r.id}, () => openRelease(r.id)));
    const channel = r.channel && r.channel !== "stable" ? " [" + r.channel + "]" : "";
    cell("task", r.task + "@" + short(r.version) + channel, {"title": r.task + "@" + r.version, "class": "mono"});
    cell("rule", r.rule || "(every device)", {"class": "mono rule"});
    cell("stage", r.stage);
    const ro = cell("rollout", "");
    ro.appendChild(el("meter", null, {"min": 0, "max": 100, "value": r.rollout}));
    ro.appendChild(el("span", Number(r.rollout) + "%", {"class": "pct"}));
    cell("state", r.state, {"class": "badge"});
    cell("guard", r.guard || "", {"class": r.guard === "tripped" ? "bad" : "muted"});
    cell("delivered", s.delivered, {"class": "num"});
    cell("ran", s.ran, {"class": "num"});
    cell("runs", s.runs, {"class": "num"});
    cell("failed", s.failed, {"class": "num" + (s.failed ? " bad" : "")});
    cell("p50", Number(s.p50_duration_s).toFixed(3), {"class": "num"});
    cell("rejected", s.rejected + " / " + s.rolled_back, {"class": "num" + (s.rejected || s.rolled_back ? " bad" : "")});
    const created = cell("created", null, {"class": "muted created"});
    created.appendChild(el("div", when(r.created_at), {"class": "nowrap"}));
    created.appendChild(el("div", "by " + r.created_by));
    cell("note", r.note, {"class": "note"});
    return tr;
  });
  fillBody($("releases"), rows);
  const more = data.releases_total > data.releases.length ? ` (newest ${data.releases.length} of ${data.releases_total})` : "";
  const filtered = shown.length !== data.releases.length ? `, ${shown.length} shown` : "";
  $("releases-count").textContent = data.releases_total + more + filtered;
}

// One run: a header line, then its error (with the task's traceback) and its log lines.
function runBlock(e, withDevice) {
  const div = el("div", null, {"class": "run " + (e.status === "ok" ? "ok" : "failed"), "data-device": e.device_id});
  const head = el("div", null, {"class": "run-head"});
  head.appendChild(el("span", when(e.ts), {"class": "muted"}));
  if (withDevice) head.appendChild(linkButton(e.device_id, {"data-open-device": e.device_id}, () => openDevice(e.device_id)));
  head.appendChild(el("span", e.task + "@" + short(e.version), {"class": "mono"}));
  head.appendChild(el("span", e.release_id || "-", {"class": "mono"}));
  head.appendChild(el("span", e.status, {"class": "status-" + (e.status === "ok" ? "ok" : "bad")}));
  head.appendChild(el("span", Number(e.duration_s).toFixed(3) + " s · " + e.peak_memory_kb + " KB · " + e.trigger, {"class": "muted"}));
  div.appendChild(head);
  if (e.error) div.appendChild(el("pre", e.error, {"class": "error"}));
  if (e.lines && e.lines.length) div.appendChild(el("pre", e.lines.join("\n"), {"class": "log"}));
  return div;
}

function renderRuns(container, entries, withDevice, empty) {
  container.replaceChildren(...(entries.length ? entries.map((e) => runBlock(e, withDevice)) : [el("p", empty, {"class": "muted"})]));
}

async function openRelease(id) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (!token) return;
  let d;
  try { d = await api("/api/releases/" + encodeURIComponent(id), token); }
  catch (e) { return failed(e); }
  shownRelease = id;
  const h = d.health, r = h.release, s = r.stats;
  $("rd-id").textContent = r.id;
  $("rd-title").textContent = r.task + "@" + short(r.version) + " · " + r.state + " · " + r.stage + " " + r.rollout + "%";
  $("rd-figures").replaceChildren(...[["targeted", h.targeted], ["delivered", s.delivered], ["ran", s.ran],
      ["failed devices", h.failed_devices], ["rejected", s.rejected], ["rolled back", s.rolled_back],
      ["runs", s.runs], ["failed runs", s.failed], ["p50 s", Number(s.p50_duration_s).toFixed(3)],
      ["p99 s", Number(h.p99_duration_s).toFixed(3)]].map(([k, v]) => {
    const span = el("span", null, {"class": "figure", "data-figure": k});
    span.appendChild(el("b", v));
    span.appendChild(el("span", " " + k));
    return span;
  }));
  const g = d.guard;
  let guardText = "no guard";
  if (g) {
    const limits = [];
    if (g.max_failure_rate) limits.push("failure rate ≤ " + (g.max_failure_rate * 100).toFixed(1) + "%");
    if (g.max_p99_seconds) limits.push("p99 ≤ " + g.max_p99_seconds + " s");
    guardText = "guard: " + limits.join(" and ") + " once " + g.min_runs + " runs, else " + g.on_trip + ": " + g.status;
    if (g.status === "tripped") {
      const detail = JSON.parse(g.trip_detail || "{}");
      guardText += " at " + when(g.tripped_at) + " (" + (detail.reason || "") + ") → " +
                   (g.action_release_id ? "rolled back as " + g.action_release_id : "paused");
    }
  }
  $("rd-guard").textContent = guardText;
  $("rd-guard").className = g && g.status === "tripped" ? "bad" : "";
  fillBody($("rd-errors"), h.top_errors.map((e) => {
    const tr = el("tr");
    tr.appendChild(el("td", e.runs, {"class": "num"}));
    tr.appendChild(el("td", e.devices, {"class": "num"}));
    tr.appendChild(el("td", e.error, {"class": "mono wrap", "title": e.example}));
    const td = el("td");
    td.appendChild(linkButton(e.example_device, {"data-open-device": e.example_device}, () => openDevice(e.example_device)));
    tr.appendChild(td);
    return tr;
  }));
  renderRuns($("rd-failed"), d.failed_runs, true, "no failed runs");
  renderRuns($("rd-runs"), d.runs, true, "no runs reported yet");
  $("release-detail").hidden = false;
}

async function refreshDevices() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (!token) return;
  const q = new URLSearchParams({q: $("filter-device").value.trim()});
  const data = await api("/api/devices?" + q, token);
  fillBody($("devices"), data.devices.map((d) => {
    const tr = el("tr", null, {"data-device": d.device_id, "class": d.revoked ? "state-revoked" : ""});
    const td = el("td");
    td.appendChild(linkButton(d.device_id, {"data-open-device": d.device_id}, () => openDevice(d.device_id)));
    tr.appendChild(td);
    tr.appendChild(el("td", d.user_id, {"class": "mono"}));
    tr.appendChild(el("td", d.app_version, {"class": "mono"}));
    tr.appendChild(el("td", when(d.last_seen), {"class": "muted"}));
    tr.appendChild(el("td", d.failed_runs, {"class": "num" + (d.failed_runs ? " bad" : ""), "data-field": "failed_runs"}));
    return tr;
  }));
  $("devices-count").textContent = data.total + (data.total > data.devices.length ? ` (${data.devices.length} shown)` : "");
}

async function openDevice(id) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (!token) return;
  let d;
  try { d = await api("/api/devices/" + encodeURIComponent(id), token); }
  catch (e) { return failed(e); }
  shownDevice = id;
  const dev = d.device;
  $("dd-id").textContent = dev.device_id;
  $("dd-title").textContent = "user " + (d.user_id || "-") + " · enrolled " + when(dev.enrolled_at) +
      " · last seen " + when(dev.last_seen) + (dev.revoked ? " · REVOKED" : "");
  const attrs = JSON.parse(dev.attrs_json || "{}");
  $("dd-attrs").textContent = Object.keys(attrs).sort().filter((k) => attrs[k] !== "" && !(Array.isArray(attrs[k]) && !attrs[k].length))
      .map((k) => k + "=" + attrs[k]).join("  ") || "no attributes reported yet";
  fillBody($("dd-installed"), d.installed.map((i) => {
    const tr = el("tr", null, {"data-task": i.task});
    tr.appendChild(el("td", i.task));
    tr.appendChild(el("td", short(i.version), {"class": "mono", "title": i.version, "data-field": "version"}));
    tr.appendChild(el("td", i.release_id, {"class": "mono"}));
    tr.appendChild(el("td", i.status, {"class": i.status === "installed" ? "" : "bad", "data-field": "status"}));
    tr.appendChild(el("td", when(i.ts), {"class": "muted"}));
    tr.appendChild(el("td", (i.error || "").split("\n")[0], {"class": "mono wrap"}));
    return tr;
  }));
  renderRuns($("dd-errors"), d.errors, false, "no errors");
  renderRuns($("dd-runs"), d.last_runs, false, "no runs reported yet");
  $("device-detail").hidden = false;
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
  lastOverview = data;
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
  for (const id of ["releases", "fleet-app", "fleet-task", "tasks", "versions", "devices", "rd-errors", "dd-installed"]) fillBody($(id), []);
  for (const id of ["operator", "updated", "fleet-seen", "fleet-enrolled", "releases-count", "history-task",
                    "devices-count", "rd-id", "rd-title", "rd-guard", "dd-id", "dd-title", "dd-attrs"]) $(id).textContent = "";
  for (const id of ["diff", "rd-figures", "rd-failed", "rd-runs", "dd-errors", "dd-runs"]) $(id).replaceChildren();
  $("release-detail").hidden = $("device-detail").hidden = true;
  shownTask = shownTaskLatest = shownRelease = shownDevice = lastOverview = null;
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
    await refreshDevices();
    if (shownRelease) await openRelease(shownRelease);
    if (shownDevice) await openDevice(shownDevice);
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
  refreshDevices().catch(failed);
  pollTimer = setTimeout(poll, POLL_MS);
}

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", login);
  $("diff-form").addEventListener("submit", showDiff);
  const rerender = () => { if (lastOverview) renderReleases(lastOverview); };
  $("release-filter").addEventListener("input", rerender);
  $("release-filter").addEventListener("submit", (ev) => ev.preventDefault());
  $("device-filter").addEventListener("submit", (ev) => { ev.preventDefault(); refreshDevices().catch(failed); });
  $("rd-close").addEventListener("click", () => { shownRelease = null; $("release-detail").hidden = true; });
  $("dd-close").addEventListener("click", () => { shownDevice = null; $("device-detail").hidden = true; });
  $("logout").addEventListener("click", () => { sessionStorage.removeItem(TOKEN_KEY); showLogin(""); });
  if (sessionStorage.getItem(TOKEN_KEY)) {
    $("app").hidden = false;
    $("status").hidden = false;
    poll();
  } else {
    showLogin("");
  }
});
