"""The web inspector's single page: plain HTML, CSS and vanilla JavaScript, no framework and no
external assets, so it works offline and its whole behaviour can be read here.

Everything shown comes from visitors on the internet and is hostile: the script only ever puts it
into the page with ``textContent`` or ``dataset``, never as HTML (the one link, a tunnel's public
URL, comes from the relay and is used only if it is http or https). The
server sends a Content-Security-Policy allowing exactly ``SCRIPT`` and ``STYLE`` (by hash), so
the page has no inline ``style=`` or ``on...=`` attributes and ``PAGE`` embeds both verbatim.

Hooks for tests and tools: rows are ``tr.request-row[data-id]`` (``.replay`` and
``data-replay-of`` for replays, ``.highlight`` on the latest replay's result), their status cell is
``td.status``; the detail pane is ``#detail[data-id]`` with ``#detail-method``,
``#detail-path``, ``#detail-status``, ``#request-headers``, ``#response-headers``,
``#request-body`` and ``#response-body``; the button is ``#replay``; ``#live`` has class ``on``
while the event stream is connected.
"""

from __future__ import annotations

__all__ = ["PAGE", "SCRIPT", "STYLE"]

STYLE = """
:root {
  --bg: #f6f7f9; --panel: #fff; --ink: #1d2330; --muted: #6b7385; --line: #e2e5ea;
  --accent: #2f6fde; --ok: #1f8a4c; --redirect: #8a6d1f; --client-err: #c2571a;
  --server-err: #c62f3a; --sel: #e8f0fe; --flash: #fff4c2;
  --mono: ui-monospace, SFMono-Regular, Menlo, Consolas, "DejaVu Sans Mono", monospace;
}
* { box-sizing: border-box; }
html, body { margin: 0; height: 100%; }
body {
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
  color: var(--ink); background: var(--bg); display: flex; flex-direction: column;
}
header {
  display: flex; align-items: center; gap: 16px; padding: 10px 16px;
  background: #1d2330; color: #eef1f6; flex-wrap: wrap;
}
header h1 { font-size: 16px; margin: 0; font-weight: 600; letter-spacing: .02em; }
header h1 span { color: #9fb3d9; font-weight: 400; }
#tunnels { list-style: none; margin: 0; padding: 0; display: flex; gap: 14px; flex-wrap: wrap;
  flex: 1; }
#tunnels li { font-family: var(--mono); font-size: 12.5px; }
#tunnels .name { color: #9fb3d9; margin-right: 6px; }
#tunnels a { color: #fff; }
#tunnels .arrow { color: #9fb3d9; margin: 0 6px; }
#live { font-size: 12px; color: #f0b4b4; }
#live::before { content: "\\25CF  "; }
#live.on { color: #9fe0b4; }
main { flex: 1; display: flex; min-height: 0; }
#list { flex: 1 1 55%; overflow: auto; min-width: 0; }
#detail { flex: 1 1 45%; overflow: auto; background: var(--panel);
  border-left: 1px solid var(--line); padding: 14px 18px; min-width: 0; }
#detail[hidden] { display: none; }
table { border-collapse: collapse; width: 100%; }
#requests { background: var(--panel); }
#requests th { position: sticky; top: 0; background: #eceff3; text-align: left; font-weight: 600;
  font-size: 12px; color: var(--muted); padding: 6px 10px; border-bottom: 1px solid var(--line); }
#requests td { padding: 6px 10px; border-bottom: 1px solid var(--line); white-space: nowrap; }
#requests td.path { font-family: var(--mono); font-size: 13px; max-width: 0; width: 100%;
  overflow: hidden; text-overflow: ellipsis; }
#requests td.num, #requests th.num { text-align: right; font-variant-numeric: tabular-nums; }
#requests td.time { color: var(--muted); font-variant-numeric: tabular-nums; }
.request-row { cursor: pointer; }
.request-row:hover { background: #f2f5fa; }
.request-row.selected { background: var(--sel); }
.request-row.highlight td:first-child { box-shadow: inset 3px 0 0 var(--accent); }
.request-row.flash { animation: flash 2s ease-out; }
.request-row.selected.flash { animation: flash-selected 2s ease-out; }
@keyframes flash { from { background: var(--flash); } to { background: transparent; } }
@keyframes flash-selected { from { background: var(--flash); } to { background: var(--sel); } }
.method { font-family: var(--mono); font-weight: 600; font-size: 12.5px; }
.badge { display: inline-block; font-size: 11px; padding: 0 6px; margin-left: 6px;
  border-radius: 8px; background: #e7ecf7; color: var(--accent); font-family: system-ui, sans-serif;
  vertical-align: 1px; }
.status { font-weight: 600; font-variant-numeric: tabular-nums; }
.s2 { color: var(--ok); } .s3 { color: var(--redirect); } .s4 { color: var(--client-err); }
.s5, .failed { color: var(--server-err); } .pending { color: var(--muted); font-weight: 400; }
#empty { color: var(--muted); padding: 24px 16px; margin: 0; }
#empty code { font-family: var(--mono); }
.detail-head { display: flex; align-items: baseline; gap: 10px; flex-wrap: wrap; }
.detail-head .path { font-family: var(--mono); font-size: 14px; word-break: break-all; flex: 1; }
#detail-method { font-size: 14px; }
#detail-status { font-size: 15px; }
.meta { color: var(--muted); font-size: 12.5px; margin: 6px 0 0; }
.meta a { color: var(--accent); cursor: pointer; }
.actions { margin: 12px 0 4px; display: flex; gap: 10px; align-items: center; }
button { font: inherit; padding: 5px 14px; border-radius: 6px; border: 1px solid var(--accent);
  background: var(--accent); color: #fff; cursor: pointer; }
button:disabled { opacity: .6; cursor: default; }
button.plain { background: transparent; color: var(--ink); border-color: var(--line); }
#replay-message { font-size: 12.5px; color: var(--muted); }
#replay-message.failed { color: var(--server-err); }
.error { background: #fdecee; color: var(--server-err); border-radius: 6px; padding: 8px 10px;
  margin: 10px 0 0; }
h2 { font-size: 13px; text-transform: uppercase; letter-spacing: .06em; color: var(--muted);
  margin: 20px 0 6px; border-bottom: 1px solid var(--line); padding-bottom: 4px; }
h3 { font-size: 12.5px; margin: 12px 0 4px; color: var(--muted); font-weight: 600; }
.headers td { font-family: var(--mono); font-size: 12.5px; padding: 2px 8px 2px 0;
  vertical-align: top; word-break: break-all; }
.headers td:first-child { color: var(--muted); white-space: nowrap; word-break: normal;
  width: 1%; }
.body-meta { color: var(--muted); font-size: 12px; margin: 0 0 4px; }
.body-meta a { color: var(--accent); margin-left: 8px; }
pre { font-family: var(--mono); font-size: 12.5px; background: #f4f6f9;
  border: 1px solid var(--line); border-radius: 6px; padding: 8px 10px; margin: 0;
  overflow: auto; max-height: 60vh; white-space: pre-wrap; word-break: break-all; }
.none { color: var(--muted); font-style: italic; margin: 0; }
"""

SCRIPT = """
"use strict";
(function () {
  const rows = document.getElementById("rows");
  const empty = document.getElementById("empty");
  const detail = document.getElementById("detail");
  const live = document.getElementById("live");
  const replayButton = document.getElementById("replay");
  const replayMessage = document.getElementById("replay-message");
  const byId = new Map();          // id -> row element
  let selected = null;             // id shown in the detail pane
  let highlightNext = null;        // id of a replay to highlight once its row exists
  let pollTimer = null;
  let connected = false;           // the event stream is open
  let detailToken = 0;             // ignores stale detail responses

  // --- small helpers; all untrusted data goes in as text, never as HTML ---
  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }
  function setText(id, text) { document.getElementById(id).textContent = text; }
  function bytes(n) {
    if (n === null || n === undefined) return "";
    if (n < 1024) return n + " B";
    if (n < 1024 * 1024) return (n / 1024).toFixed(1) + " KB";
    return (n / 1024 / 1024).toFixed(1) + " MB";
  }
  function duration(ms) {
    if (ms === null || ms === undefined) return "";
    if (ms < 1000) return (ms < 10 ? ms.toFixed(1) : Math.round(ms)) + " ms";
    return (ms / 1000).toFixed(2) + " s";
  }
  function clock(epoch) {
    const d = new Date(epoch * 1000);
    return d.toLocaleTimeString([], {hour12: false});
  }
  function statusText(s) {
    if (s.status !== null && s.status !== undefined) return String(s.status);
    return s.error ? "error" : (s.duration_ms === null ? "\\u2026" : "\\u2014");
  }
  function statusClass(s) {
    if (s.status !== null && s.status !== undefined) return "status s" + String(s.status)[0];
    return s.error ? "status failed" : "status pending";
  }
  async function getJSON(url) {
    const response = await fetch(url, {cache: "no-store"});
    if (!response.ok) throw new Error(url + ": " + response.status);
    return response.json();
  }

  // --- tunnels ---
  async function loadTunnels() {
    let data;
    try { data = await getJSON("/api/tunnels"); } catch (e) { return; }
    const list = document.getElementById("tunnels");
    list.replaceChildren();
    for (const t of data.tunnels) {
      const item = el("li");
      item.append(el("span", "name", t.name));
      const url = String(t.public_url || "");
      if (/^https?:\\/\\//.test(url)) {
        const link = el("a", "", url);
        link.href = url; link.target = "_blank"; link.rel = "noopener noreferrer";
        item.append(link);
      } else {
        item.append(el("span", "", url));
      }
      item.append(el("span", "arrow", "\\u2192"), el("span", "local", t.local));
      list.append(item);
    }
  }

  // --- the request list ---
  function fillRow(row, s) {
    row.replaceChildren();
    const method = el("td"); method.append(el("span", "method", s.method));
    const path = el("td", "path", s.path);
    path.title = s.path;
    if (s.replay_of) path.append(el("span", "badge", "replay"));
    const status = el("td", statusClass(s), statusText(s));
    if (s.error) status.title = s.error;
    row.append(method, path, status,
      el("td", "num", duration(s.duration_ms)),
      el("td", "num", bytes(s.request_size)),
      el("td", "num", bytes(s.response_size)),
      el("td", "time", clock(s.started)));
  }
  function makeRow(s) {
    const row = el("tr", "request-row");
    row.dataset.id = s.id;
    row.tabIndex = 0;
    if (s.replay_of) { row.classList.add("replay"); row.dataset.replayOf = s.replay_of; }
    if (s.id === selected) row.classList.add("selected");
    byId.set(s.id, row);
    return row;
  }
  function upsert(s, fresh) {
    let row = byId.get(s.id);
    if (!row) {
      row = makeRow(s);
      if (fresh) rows.prepend(row); else rows.append(row);
    }
    fillRow(row, s);
    if (s.id === highlightNext) highlight(row);
    return row;
  }
  function remove(id) {
    const row = byId.get(id);
    if (row) { row.remove(); byId.delete(id); }
    if (id === selected) closeDetail();
  }
  function updateEmpty() { empty.hidden = byId.size > 0; }
  function highlight(row) {   // the result of a replay: marked, flashed once, and opened
    highlightNext = null;
    select(row.dataset.id);   // first, so the flash is not restarted by the selection
    for (const old of rows.querySelectorAll(".request-row.highlight")) {
      old.classList.remove("highlight");
    }
    row.classList.add("highlight", "flash");
    row.addEventListener("animationend", () => row.classList.remove("flash"), {once: true});
    row.scrollIntoView({block: "nearest"});
    replayMessage.className = "";
    replayMessage.textContent = "replayed";
  }
  function render(list) {   // newest first, the order of the table
    const seen = new Set();
    for (const s of list) {
      seen.add(s.id);
      rows.append(upsert(s, false));
    }
    for (const id of Array.from(byId.keys())) if (!seen.has(id)) remove(id);
    updateEmpty();
  }
  async function refresh() {   // only while the event stream is down: it brings its own list
    let data;
    try { data = await getJSON("/api/requests"); } catch (e) { return; }
    if (!connected) render(data.requests);
  }

  // --- live updates: Server-Sent Events, polling while they are unavailable ---
  function startPolling() {
    if (pollTimer === null) pollTimer = setInterval(() => { refresh(); loadTunnels(); }, 2000);
  }
  function stopPolling() {
    if (pollTimer !== null) { clearInterval(pollTimer); pollTimer = null; }
  }
  function onEvent(message) {
    let m;
    try { m = JSON.parse(message.data); } catch (e) { return; }
    if (m.event === "snapshot") {
      render(m.requests);
    } else if (m.event === "clear") {
      for (const id of Array.from(byId.keys())) remove(id);
    } else if (m.event === "evict") {
      remove(m.id);
    } else if (m.event === "begin" || m.event === "end") {
      upsert(m, true);
      if (m.id === selected && m.event === "end") showDetail(m.id);
    }
    updateEmpty();
  }
  function connect() {
    if (!window.EventSource) { startPolling(); return; }
    // Each (re)connection starts with a snapshot of the whole list, then live changes.
    const source = new EventSource("/api/events?snapshot=1");
    source.onopen = () => {
      connected = true;
      live.classList.add("on"); live.textContent = "live";
      stopPolling(); loadTunnels();
    };
    source.onmessage = onEvent;
    source.onerror = () => {   // the browser reconnects by itself, unless refused; poll meanwhile
      connected = false;
      live.classList.remove("on"); live.textContent = "reconnecting";
      startPolling();
      if (source.readyState === EventSource.CLOSED) setTimeout(connect, 10000);
    };
  }

  // --- the detail pane ---
  function headersTable(id, headers) {
    const table = document.getElementById(id);
    table.replaceChildren();
    for (const [name, value] of headers) {
      const tr = el("tr");
      tr.append(el("td", "", name), el("td", "", value));
      table.append(tr);
    }
    table.hidden = headers.length === 0;
  }
  function hexDump(hex) {
    const lines = [];
    for (let offset = 0; offset < hex.length / 2; offset += 16) {
      const chunk = hex.slice(offset * 2, offset * 2 + 32);
      const pairs = chunk.match(/../g) || [];
      const ascii = pairs.map((p) => {
        const c = parseInt(p, 16);
        return c >= 32 && c < 127 ? String.fromCharCode(c) : ".";
      }).join("");
      lines.push(offset.toString(16).padStart(8, "0") + "  " +
        pairs.join(" ").padEnd(47, " ") + "  |" + ascii + "|");
    }
    return lines.join("\\n");
  }
  function showBody(id, body) {
    const box = document.getElementById(id);
    box.replaceChildren();
    box.dataset.encoding = body.encoding;
    if (body.size === 0) { box.append(el("p", "none", "no body")); return; }
    const kind = body.encoding === "base64" ? "binary" : body.encoding === "json" ? "JSON" : "text";
    const meta = el("p", "body-meta", kind + ", " + bytes(body.size) +
      (body.truncated ? " (only the first part was kept)" : ""));
    box.append(meta);
    if (body.encoding === "base64") {
      const raw = atob(body.base64);
      const data = new Uint8Array(raw.length);
      for (let i = 0; i < raw.length; i++) data[i] = raw.charCodeAt(i);
      const link = el("a", "", "download");
      link.href = URL.createObjectURL(new Blob([data]));
      link.download = "body.bin";
      meta.append(link);
      const shown = body.hex_preview.length / 2;
      box.append(el("pre", "hex", hexDump(body.hex_preview)));
      if (body.size > shown) box.append(el("p", "body-meta", "first " + shown + " bytes shown"));
    } else {
      box.append(el("pre", body.encoding === "json" ? "json" : "text", body.text));
    }
  }
  async function showDetail(id) {
    const token = ++detailToken;
    let d;
    try { d = await getJSON("/api/requests/" + encodeURIComponent(id)); }
    catch (e) { if (token === detailToken) closeDetail(); return; }
    if (token !== detailToken) return;
    detail.dataset.id = d.id;
    detail.hidden = false;
    setText("detail-method", d.method);
    setText("detail-path", d.path);
    const status = document.getElementById("detail-status");
    status.textContent = statusText(d) + (d.reason ? " " + d.reason : "");
    status.className = statusClass(d);
    const meta = document.getElementById("detail-meta");
    meta.replaceChildren(
      "HTTP/" + d.http_version + " \\u00b7 " + new Date(d.started * 1000).toLocaleString() +
      " \\u00b7 from " + d.client + " \\u00b7 tunnel " + d.tunnel +
      (d.duration_ms === null ? "" : " \\u00b7 " + duration(d.duration_ms)));
    if (d.replay_of) {
      const link = el("a", "", d.replay_of);
      link.addEventListener("click", () => select(d.replay_of));
      meta.append(" \\u00b7 replay of ", link);
    }
    const error = document.getElementById("detail-error");
    error.textContent = d.error || "";
    error.hidden = !d.error;
    headersTable("request-headers", d.request_headers);
    headersTable("response-headers", d.response_headers);
    showBody("request-body", d.request_body);
    showBody("response-body", d.response_body);
    replayButton.disabled = d.request_body.truncated;
    replayButton.title = d.request_body.truncated ? "the request body was not kept whole" : "";
  }
  function select(id) {
    if (selected !== id) { replayMessage.textContent = ""; replayMessage.className = ""; }
    selected = id;
    for (const row of rows.querySelectorAll(".request-row.selected")) {
      row.classList.remove("selected");
    }
    const row = byId.get(id);
    if (row) row.classList.add("selected");
    showDetail(id);
  }
  function closeDetail() {
    selected = null;
    detailToken++;
    detail.hidden = true;
    delete detail.dataset.id;
    for (const row of rows.querySelectorAll(".request-row.selected")) {
      row.classList.remove("selected");
    }
  }

  async function replay() {
    const id = selected;
    if (!id) return;
    replayButton.disabled = true;
    replayMessage.className = "";
    replayMessage.textContent = "replaying\\u2026";
    try {
      const response = await fetch("/api/requests/" + encodeURIComponent(id) + "/replay",
        {method: "POST"});
      const data = await response.json().catch(() => ({}));
      if (response.status !== 201) throw new Error(data.error || "HTTP " + response.status);
      const row = byId.get(data.id);
      if (row) highlight(row); else { highlightNext = data.id; refresh(); }
    } catch (e) {
      replayMessage.className = "failed";
      replayMessage.textContent = e.message;
    } finally {
      replayButton.disabled = false;
    }
  }

  // --- wiring ---
  rows.addEventListener("click", (event) => {
    const row = event.target.closest(".request-row");
    if (row) select(row.dataset.id);
  });
  document.addEventListener("keydown", (event) => {
    if (event.target instanceof HTMLInputElement) return;
    if (event.key === "Escape") { closeDetail(); return; }
    if (event.key === "Enter" && event.target.classList &&
        event.target.classList.contains("request-row")) {
      select(event.target.dataset.id); return;
    }
    if (event.key !== "ArrowDown" && event.key !== "ArrowUp") return;
    const current = selected && byId.get(selected);
    const next = !current ? rows.firstElementChild
      : event.key === "ArrowDown" ? current.nextElementSibling : current.previousElementSibling;
    if (next) { event.preventDefault(); next.focus(); select(next.dataset.id); }
  });
  replayButton.addEventListener("click", replay);
  document.getElementById("close").addEventListener("click", closeDetail);

  refresh();
  loadTunnels();
  connect();
})();
"""

_BODY = """
<header>
  <h1>burrow <span>inspector</span></h1>
  <ul id="tunnels"></ul>
  <span id="live">connecting</span>
</header>
<main>
  <section id="list">
    <table id="requests">
      <thead><tr>
        <th>Method</th><th>Path</th><th>Status</th><th class="num">Duration</th>
        <th class="num">Request</th><th class="num">Response</th><th>Time</th>
      </tr></thead>
      <tbody id="rows"></tbody>
    </table>
    <p id="empty">No requests yet. They appear here as soon as the tunnel receives them.</p>
  </section>
  <section id="detail" hidden>
    <div class="detail-head">
      <span id="detail-method" class="method"></span>
      <span id="detail-path" class="path"></span>
      <span id="detail-status" class="status"></span>
    </div>
    <p id="detail-meta" class="meta"></p>
    <p id="detail-error" class="error" hidden></p>
    <div class="actions">
      <button id="replay" type="button">Replay</button>
      <button id="close" class="plain" type="button">Close</button>
      <span id="replay-message" role="status"></span>
    </div>
    <h2>Request</h2>
    <h3>Headers</h3>
    <table id="request-headers" class="headers"></table>
    <h3>Body</h3>
    <div id="request-body" class="body"></div>
    <h2>Response</h2>
    <h3>Headers</h3>
    <table id="response-headers" class="headers"></table>
    <h3>Body</h3>
    <div id="response-body" class="body"></div>
  </section>
</main>
"""

PAGE = (
    '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
    '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
    "<title>burrow inspector</title>\n"
    '<link rel="icon" href="data:,">\n'
    f"<style>{STYLE}</style>\n</head>\n<body>{_BODY}<script>{SCRIPT}</script>\n</body>\n</html>\n"
)
