"""Runtime: the ``/-/status`` answer — JSON for programs, a live HTML page for people.

Content negotiation follows RFC 9110 §12.5.1: the page is served only when the client
ranks ``text/html`` strictly above ``application/json`` (browsers do; curl's ``*/*``
and ``Accept: application/json`` get JSON). ``Vary: Accept`` keeps caches honest.

The page is one self-contained document (no external assets). It embeds the current
snapshot, renders it at once and then re-fetches the same URL with
``Accept: application/json`` every 2 s. Pod ids come from Kubernetes and checkpoint names
from users, so every value is inserted with ``textContent`` (never ``innerHTML``), the
embedded JSON has ``<``, ``>`` and ``&`` escaped so it cannot close its ``<script>``,
and a Content-Security-Policy allows only this page's own script and style (by hash)
and fetches to its own origin.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping
from typing import Any

from aiohttp import web

POLL_INTERVAL_MS = 2000

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5rem;color:#1d232b;background:#f7f8fa}
h1{font-size:1.2rem;margin:0 0 1rem}h2{font-size:1rem;margin:1.5rem 0 .5rem}
.cards{display:flex;flex-wrap:wrap;gap:.75rem}
.card{background:#fff;border:1px solid #d8dde4;border-radius:6px;padding:.5rem .9rem}
.card b{display:block;font-size:1.4rem}.card small{color:#5b6573}
table{border-collapse:collapse;background:#fff;min-width:40rem}
th,td{border:1px solid #d8dde4;padding:.3rem .6rem;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums}
tr[data-state=ready] .state{color:#1a7f37}tr[data-state=draining] .state{color:#9a6700}
tr[data-state=starting] .state,tr[data-state=warming] .state{color:#0969da}
#fetch-error{color:#cf222e}.muted{color:#5b6573}
"""

_SCRIPT = """
"use strict";
const $ = (id) => document.getElementById(id);
const show = (value) => value === null || value === undefined ? "–" : String(value);
const text = (id, value) => { $(id).textContent = show(value); };
const yesNo = (value) => value ? "yes" : "no";
function cell(row, value, cls) {
  const td = document.createElement("td");
  td.textContent = show(value);
  if (cls) td.className = cls;
  row.appendChild(td);
}
function renderPods(pods) {
  const body = $("pods");
  body.replaceChildren();
  for (const pod of pods) {
    const row = document.createElement("tr");
    row.dataset.pod = String(pod.id);
    row.dataset.state = String(pod.state);
    cell(row, pod.id, "id"); cell(row, pod.state, "state");
    cell(row, `${pod.inflight ?? 0}/${pod.limit ?? 0}`, "num inflight");
    cell(row, pod.checkpoint, "checkpoint"); cell(row, pod.out, "out");
    cell(row, pod.completed, "num completed"); cell(row, pod.errors, "num errors");
    body.appendChild(row);
  }
  $("no-pods").hidden = pods.length > 0;
}
function renderTenants(tenants) {
  const body = $("tenants");
  body.replaceChildren();
  for (const t of tenants) {
    const row = document.createElement("tr");
    row.dataset.tenant = String(t.name);
    cell(row, t.name === "" ? "(anonymous)" : t.name, "tenant"); cell(row, t.weight, "num");
    cell(row, t.queued, "num queued"); cell(row, t.running, "num running");
    cell(row, (t.gpu_seconds ?? 0).toFixed(1), "num gpu-seconds");
    body.appendChild(row);
  }
  $("no-tenants").hidden = tenants.length > 0;
}
function renderEvents(events) {
  const list = $("scale-events");
  list.replaceChildren();
  for (const ev of events.slice(-10).reverse()) {
    const item = document.createElement("li");
    item.textContent = `${ev.at}: ${ev.from} → ${ev.to} (${ev.reason})`;
    list.appendChild(item);
  }
}
function renderJobs(jobs) {
  const body = $("jobs");
  body.replaceChildren();
  const recent = jobs && Array.isArray(jobs.recent) ? jobs.recent : [];
  for (const job of recent) {
    const row = document.createElement("tr");
    cell(row, job.id, "id"); cell(row, job.tenant); cell(row, job.status, "state");
    cell(row, (job.wait_s ?? 0).toFixed(1), "num wait"); cell(row, job.pod);
    body.appendChild(row);
  }
  $("no-jobs").hidden = recent.length > 0;
  const counts = jobs && jobs.counts ? jobs.counts : {};
  text("jobs-counts", Object.entries(counts).map(([k, v]) => `${k} ${v}`).join(", "));
  text("jobs-store", jobs ? `${(jobs.store_bytes / 1048576).toFixed(1)} MiB` : "");
}
function render(s) {
  const queue = s.queue || {}, auto = s.autoscaler || {}, disc = s.discovery || {};
  const pods = Array.isArray(s.pods) ? s.pods : [];
  const count = (state) => pods.filter((p) => p.state === state).length;
  text("queue-depth", queue.depth ?? 0); text("queue-max", queue.max);
  text("queue-oldest-wait", (queue.oldest_wait_s ?? 0).toFixed(1));
  text("desired-pods", auto.desired); text("ready-pods", auto.ready ?? count("ready"));
  text("starting-pods", auto.starting ?? count("starting"));
  text("leader", yesNo(auto.leader)); text("scaler", auto.scaler);
  text("discovery-connected", yesNo(disc.connected)); text("discovery-source", disc.source);
  text("discovery-error", disc.last_error || "");
  text("version", s.version); text("uptime", Math.round(s.uptime_s ?? 0));
  const ui = s.ui;
  $("ui-cards").hidden = !ui;
  if (ui) {
    const held = Object.values(ui.sessions || {}).reduce((a, b) => a + b, 0);
    text("ui-sessions", held); text("ui-per-pod", ui.sessions_per_pod);
    text("ui-lobby-depth", ui.lobby_depth ?? 0);
    text("ui-lobby-wait", (ui.lobby_oldest_wait_s ?? 0).toFixed(1));
  }
  renderPods(pods);
  renderTenants(Array.isArray(s.tenants) ? s.tenants : []);
  text("queue-policy", queue.policy);
  renderEvents(Array.isArray(auto.events) ? auto.events : []);
  renderJobs(s.jobs);
  text("updated", new Date().toISOString());
}
async function poll() {
  try {
    const resp = await fetch(location.pathname + location.search,
      {headers: {Accept: "application/json"}, cache: "no-store"});
    if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
    render(await resp.json());
    text("fetch-error", "");
  } catch (err) {
    text("fetch-error", `refresh failed: ${err.message}`);
  }
  setTimeout(poll, POLL_MS);
}
render(JSON.parse($("initial-status").textContent));
setTimeout(poll, 0);
"""

_BODY = """<body>
<h1>sdproxy <span class="muted">v<span id="version"></span>, up <span id="uptime"></span> s,
 scaler <span id="scaler"></span></span></h1>
<div class="cards">
 <div class="card"><small>queue depth</small><b id="queue-depth"></b>
  <small>of <span id="queue-max"></span></small></div>
 <div class="card"><small>oldest wait</small><b><span id="queue-oldest-wait"></span> s</b></div>
 <div class="card"><small>desired pods</small><b id="desired-pods"></b></div>
 <div class="card"><small>ready pods</small><b id="ready-pods"></b></div>
 <div class="card"><small>starting pods</small><b id="starting-pods"></b></div>
 <div class="card"><small>leader</small><b id="leader"></b></div>
 <div class="card"><small>discovery (<span id="discovery-source"></span>) connected</small>
  <b id="discovery-connected"></b><small id="discovery-error"></small></div>
</div>
<div class="cards" id="ui-cards" hidden>
 <div class="card"><small>browser UI sessions</small><b id="ui-sessions"></b>
  <small>at most <span id="ui-per-pod"></span> per pod</small></div>
 <div class="card"><small>UI lobby</small><b id="ui-lobby-depth"></b>
  <small>longest wait <span id="ui-lobby-wait"></span> s</small></div>
</div>
<h2>Pods</h2>
<table><thead><tr><th>pod</th><th>state</th><th>in flight / limit</th><th>checkpoint</th>
<th>out</th><th>completed</th><th>errors</th></tr></thead><tbody id="pods"></tbody></table>
<p id="no-pods" class="muted" hidden>No pods.</p>
<h2>Tenants <span class="muted">(policy <span id="queue-policy"></span>)</span></h2>
<table><thead><tr><th>tenant</th><th>weight</th><th>queued</th><th>running</th>
<th>GPU-seconds</th></tr></thead><tbody id="tenants"></tbody></table>
<p id="no-tenants" class="muted" hidden>No tenant has sent a job yet.</p>
<h2>Recent jobs</h2>
<p class="muted"><span id="jobs-counts"></span>; store <span id="jobs-store"></span>
 (ids shortened: a whole id is the job's capability)</p>
<table><thead><tr><th>job</th><th>tenant</th><th>status</th><th>wait s</th><th>pod</th>
</tr></thead><tbody id="jobs"></tbody></table>
<p id="no-jobs" class="muted" hidden>No jobs.</p>
<h2>Recent scale events</h2>
<ul id="scale-events"></ul>
<p class="muted">Updated <span id="updated"></span> <span id="fetch-error"></span></p>
<noscript>This page needs JavaScript; GET this URL with Accept: application/json.</noscript>
"""


def _csp_hash(source: str) -> str:
    digest = hashlib.sha256(source.encode()).digest()
    return "'sha256-" + base64.b64encode(digest).decode() + "'"


_SCRIPT_FULL = f"const POLL_MS = {POLL_INTERVAL_MS};{_SCRIPT}"
CSP = (
    "default-src 'none'; "
    f"script-src {_csp_hash(_SCRIPT_FULL)}; style-src {_csp_hash(_STYLE)}; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def _script_safe_json(snapshot: Mapping[str, Any]) -> str:
    """JSON that cannot end its <script> element or open a comment inside it."""
    text = json.dumps(snapshot, default=str)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render_page(snapshot: Mapping[str, Any]) -> str:
    """The self-contained HTML status page, showing ``snapshot`` until its first refresh."""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>sdproxy status</title><style>{_STYLE}</style></head>\n{_BODY}"
        '<script type="application/json" id="initial-status">'
        f"{_script_safe_json(snapshot)}</script>\n<script>{_SCRIPT_FULL}</script>\n"
        "</body></html>\n"
    )


def _quality(accept: str, media_type: str) -> float:
    """The q-value ``accept`` gives ``media_type``; the most specific range wins."""
    main = media_type.split("/")[0]
    best: tuple[int, float] = (-1, 0.0)  # (specificity, q)
    for item in accept.split(","):
        media, *params = (part.strip() for part in item.split(";"))
        specificity = {media_type: 2, f"{main}/*": 1, "*/*": 0}.get(media.lower())
        if specificity is None or specificity < best[0]:
            continue
        q = 1.0
        for param in params:
            key, _, val = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(val)
                except ValueError:
                    q = 0.0
        best = (specificity, q) if specificity > best[0] else (specificity, max(q, best[1]))
    return best[1]


def prefers_html(accept: str) -> bool:
    """True when ``text/html`` is ranked strictly above ``application/json``."""
    html = _quality(accept, "text/html")
    return html > 0 and html > _quality(accept, "application/json")


def status_response(request: web.Request, snapshot: Mapping[str, Any]) -> web.Response:
    """Answer ``/-/status``: the HTML page for browsers, the snapshot as JSON otherwise."""
    headers = {"Vary": "Accept", "Cache-Control": "no-store"}
    if prefers_html(request.headers.get("Accept", "")):
        headers["Content-Security-Policy"] = CSP
        return web.Response(text=render_page(snapshot), content_type="text/html", headers=headers)
    return web.json_response(
        snapshot, headers=headers, dumps=lambda obj: json.dumps(obj, default=str)
    )
