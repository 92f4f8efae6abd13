"""Runtime: the browser UI behind the proxy (``serve --ui``) — sessions, lobby, pages.

Every request that is not the sd-webui API (``/sdapi/``, ``--ui-api-prefix``) nor the
proxy's own ``/-/`` is UI traffic. ``UiFront`` decides where it goes, on top of
``sdproxy.core.uisessions`` (the pure bookkeeping): a browser's session is named by the
``sdproxy_ui`` cookie (``<token>.<pod>``: HttpOnly, SameSite=Lax, Secure over TLS or
``X-Forwarded-Proto: https``); the proxy forwards the request to the session's pod
(``Proxy._ui``), websockets frame by frame (``sdproxy.runtime.websocket``).

- A page load (a navigation) without a session joins the lobby; if a pod has room it is
  bound at once, else the browser gets the lobby page, which polls ``GET /-/ui/lobby``
  each second (place, ETA) and reloads once it is in. Other UI calls without a session
  answer ``409 ui_no_session``: only a page a person opened takes a GPU.
- A session that ended (idle ``--ui-idle-s``, its pod gone, ``DELETE /-/ui/session``)
  gets the "session ended" page on its next page load (``410 ui_session_ended`` for
  other calls); its button leaves for good and reloads, which joins afresh.
- The pods holding sessions are handed to the admission core (``hold_for_ui``): they
  take no API jobs while the sessions last.
- Another replica's session (the cookie names a pod this replica does not hold a session
  on) is adopted if that pod is ready and has room — the cookie carries the pod.

Time passes in ``run``: it sleeps until the next idle end or stale lobby waiter (the
core's ``next_wake``), at most ``RECHECK_S`` while sessions live (a pod's health changes
without a transition), or until poked (a pod changed state, a request ended).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import html
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from sdproxy import errors
from sdproxy.core.pods import PodId, PodState
from sdproxy.core.routing import RouteClass
from sdproxy.core.slots import Pod
from sdproxy.core.uisessions import Candidate, Ended, EndReason, UiConfig, UiSessions
from sdproxy.runtime.gate import Gate
from sdproxy.runtime.jobs import new_token
from sdproxy.runtime.logs import log_event
from sdproxy.runtime.metrics import Metrics

log = logging.getLogger("sdproxy.ui")

COOKIE = "sdproxy_ui"
LOBBY_PATH = "/-/ui/lobby"
SESSION_PATH = "/-/ui/session"
API_PREFIXES = ("/sdapi/",)
#: Gradio 3's queue: the websocket a generation is submitted on (gradio/routes.py)
QUEUE_JOIN = "/queue/join"
RECHECK_S = 1.0
#: a session ended here is announced to the peers for this long (they poll each 0.5 s)
ENDED_SHARED_S = 30.0


@dataclass(frozen=True, kw_only=True)
class Target:
    """Where a UI request goes: the session's pod, and the cookie to set (a new one)."""

    sid: str
    pod_id: PodId
    url: str
    cookie: str | None


def classify(method: str, path: str) -> RouteClass:
    """The class of a UI request: a Gradio queue submission (``/queue/join``, where
    txt2img/img2img/extras run) is the session's heavy work; everything else — progress
    polls, ``/internal/ping``, ``/queue/status``, ``/config``, ``/info``, ``/file=…``,
    assets, ``/run/predict`` — is light. Neither queues: the session's pod is the UI's."""
    return RouteClass.HEAVY if path == QUEUE_JOIN else RouteClass.LIGHT


def cookie_value(sid: str, pod_id: PodId | None) -> str:
    pod = base64.urlsafe_b64encode(pod_id.encode()).rstrip(b"=").decode() if pod_id else ""
    return f"{sid}.{pod}"


def parse_cookie(value: str | None) -> tuple[str | None, PodId | None]:
    """(token, pod named) from a cookie; garbage reads as no cookie."""
    if not value:
        return None, None
    sid, _, pod = value.partition(".")
    if not sid or len(sid) > 64 or not sid.replace("-", "").replace("_", "").isalnum():
        return None, None
    if not pod:
        return sid, None
    try:
        padded = pod + "=" * (-len(pod) % 4)
        name = base64.b64decode(padded, altchars=b"-_", validate=True).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return sid, None
    return sid, PodId(name) if name and name.isprintable() and len(name) <= 256 else None


def secure(request: web.Request) -> bool:
    forwarded = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
    return request.secure or forwarded == "https"


def ui_cookie_header(request: web.Request, value: str) -> str:
    """The Set-Cookie of a session (the value is URL-safe base64 and a dot: no quoting)."""
    tail = "; Secure" if secure(request) else ""
    return f"{COOKIE}={value}; HttpOnly; Path=/; SameSite=Lax{tail}"


def set_ui_cookie(response: web.StreamResponse, request: web.Request, value: str) -> None:
    if not response.prepared:
        response.headers.add("Set-Cookie", ui_cookie_header(request, value))


def navigation(request: web.Request) -> bool:
    """A page load a person made (not a script's call): only these open sessions."""
    if request.method != "GET":
        return False
    mode = request.headers.get("Sec-Fetch-Mode")
    if mode is not None:
        return mode == "navigate"
    return "text/html" in request.headers.get("Accept", "")


def _down(pod: Pod) -> bool:
    """A ready pod that is down — failed health checks in a row, or its gate says its
    sd-webui does not answer — ends its sessions; a brief ejection (a blip) does not."""
    return pod.checked_out or (pod.gated and not pod.gate_healthy)


def session_key(sid: str) -> str:
    """How replicas name a session to each other: a hash, never the cookie's token."""
    return hashlib.sha256(sid.encode()).hexdigest()[:24]


@dataclass(kw_only=True)
class PeerView:
    """What the live peers say: their sessions (key -> pod, last in use), the sessions
    they ended lately, their lobbies' length."""

    live: bool
    sessions: dict[str, tuple[PodId, float]] = field(default_factory=dict)
    ended: dict[str, EndReason] = field(default_factory=dict)
    lobby: int = 0


class UiFront:
    def __init__(
        self,
        *,
        config: UiConfig,
        gate: Gate,
        metrics: Metrics,
        clock: Callable[[], float],
        api_prefixes: Sequence[str] = (),
    ) -> None:
        self.config = config
        self.gate = gate
        self.metrics = metrics
        self.clock = clock
        self.sessions = UiSessions(config)
        #: the API's paths: /sdapi/, --ui-api-prefix and the prefixes of --route rules
        #: (a rule names an extension's API route)
        self.prefixes = (*API_PREFIXES, *config.ui_api_prefix, *api_prefixes)
        self._poke = asyncio.Event()
        #: set by the composition root: the UI part of every live peer's document
        self.peer_documents: Callable[[], list[dict[str, Any]]] = list

    def is_ui(self, path: str) -> bool:
        return not path.startswith(self.prefixes)

    # ---- where a request goes ---------------------------------------------------------

    def resolve(self, request: web.Request) -> Target | web.StreamResponse:
        """The session's pod for ``request``, or the page/error that answers instead."""
        now = self.clock()
        self.sync(now)
        sid, named = parse_cookie(request.cookies.get(COOKIE))
        if sid is not None:
            target = self._existing(sid, named, now)
            if target is not None:
                return target
            reason = self.sessions.ended_reason(sid)
            if reason is None:  # ended at another replica?
                reason = self.peer_view(now).ended.get(session_key(sid))
            if reason is not None:
                return self._ended(request, reason)
        if not navigation(request):
            raise errors.UiNoSession(
                f"{request.method} {request.path} needs a UI session: load the page first"
            )
        sid = sid or new_token()
        self.sessions.join(sid, now)
        self.sync(now)
        session = self.sessions.find(sid)
        if session is not None:
            pod = self.gate.admission.pods[session.pod_id]
            return Target(
                sid=sid, pod_id=pod.pod_id, url=pod.url, cookie=cookie_value(sid, pod.pod_id)
            )
        response = self._lobby_page(sid, now)
        set_ui_cookie(response, request, cookie_value(sid, None))
        return response

    def _existing(self, sid: str, named: PodId | None, now: float) -> Target | None:
        session = self.sessions.find(sid)
        cookie = None
        if session is None and named is not None:
            view = self.peer_view(now)
            elsewhere = view.sessions.get(session_key(sid))
            if elsewhere is not None:
                named = elsewhere[0]  # the replica holding it knows its pod
            held = elsewhere is not None
            candidates = self.candidates(now, view)
            peers_known = view.live
            if not self.sessions.adopt(
                sid, named, candidates, now, held_elsewhere=held, peers_known=peers_known
            ):
                return None
            self._update_holds()
            session = self.sessions.find(sid)
            cookie = cookie_value(sid, named)
            log_event("ui_session", session=sid[:8], pod=named, event="adopted")
        if session is None:
            return None
        pod = self.gate.admission.pods.get(session.pod_id)
        if pod is None:
            return None
        self.sessions.touch(sid, now)
        return Target(sid=sid, pod_id=pod.pod_id, url=pod.url, cookie=cookie)

    @contextlib.contextmanager
    def in_use(self, sid: str) -> Iterator[None]:
        """An exchange or websocket of the session runs: it does not idle out meanwhile."""
        self.sessions.opened(sid, self.clock())
        try:
            yield
        finally:
            self.sessions.closed(sid, self.clock())
            self._poke.set()

    # ---- the lobby and the session endpoints ------------------------------------------

    async def lobby(self, request: web.Request) -> web.Response:
        """``GET /-/ui/lobby``: the lobby page's poll — its place, or that it is in."""
        now = self.clock()
        sid, _ = parse_cookie(request.cookies.get(COOKIE))
        if sid is None:
            raise errors.UiNoSession("no UI cookie: load the page first")
        self.sessions.touch(sid, now)
        self.sync(now)
        session = self.sessions.find(sid)
        if session is not None:
            response = web.json_response({"ready": True, "pod": session.pod_id})
            set_ui_cookie(response, request, cookie_value(sid, session.pod_id))
            return response
        reason = self.sessions.ended_reason(sid)
        if reason is not None:
            return web.json_response({"ready": False, "ended": reason.value})
        self.sessions.join(sid, now)  # stood in line again (a throttled tab went stale)
        self.sync(now)
        return web.json_response(self._place(sid, now))

    async def leave(self, request: web.Request) -> web.Response:
        """``DELETE /-/ui/session``: end the session (or lobby place) at once."""
        sid, _ = parse_cookie(request.cookies.get(COOKIE))
        # the ended record stays (the other replicas learn of it; a stale tab is told
        # so); the browser's cookie goes, so its next page load joins afresh
        ended = self.sessions.leave(sid, self.clock()) if sid is not None else None
        if ended is not None:
            self._ended_sessions([ended])
        self.sync(self.clock())
        response = web.json_response(
            {"ended": ended is not None, "pod": ended.pod_id if ended else None}
        )
        response.del_cookie(COOKIE, path="/")
        return response

    def _place(self, sid: str, now: float) -> dict[str, object]:
        return {
            "ready": False,
            "position": self.sessions.position(sid),
            "depth": len(self.sessions.lobby),
            "eta_s": round(self.sessions.eta_s(sid, now), 1),
        }

    # ---- time and pods ----------------------------------------------------------------

    def candidates(self, now: float, view: PeerView | None = None) -> list[Candidate]:
        """Usable pods, their API work and the sessions other replicas hold on them."""
        adm = self.gate.admission
        view = view if view is not None else self.peer_view(now)
        own = {session_key(sid) for sid in self.sessions.sessions}
        elsewhere: dict[str, int] = {}
        for key, (pod, _seen) in view.sessions.items():
            if key not in own:
                elsewhere[pod] = elsewhere.get(pod, 0) + 1
        return [
            Candidate(
                pod_id=p.pod_id,
                api_load=len(p.running) + p.foreign,
                elsewhere=elsewhere.get(p.pod_id, 0),
            )
            for p in adm.pods.values()
            if adm.health.usable(p, now)
        ]

    def sync(self, now: float) -> None:
        """End what is over (pods gone, idle, stale waiters, ended by a peer), admit the
        lobby, hold pods."""
        alive = [
            p.pod_id
            for p in self.gate.admission.pods.values()
            if p.state is PodState.READY and p.listed and not _down(p)
        ]
        view = self.peer_view(now)
        keys = {session_key(sid): sid for sid in self.sessions.sessions}
        ended = self.sessions.observe_peers(
            seen={keys[k]: at for k, (_pod, at) in view.sessions.items() if k in keys},
            ended={keys[k]: why for k, why in view.ended.items() if k in keys},
            now=now,
        )
        ended += self.sessions.pods_gone(alive, now) + self.sessions.expire(now)
        self._ended_sessions(ended)
        for admitted in self.sessions.admit(self.candidates(now, view), now):
            self.metrics.observe_ui_lobby_wait(admitted.waited_s)
            log_event(
                "ui_session",
                session=admitted.session.sid[:8],
                pod=admitted.session.pod_id,
                event="opened",
                waited_s=round(admitted.waited_s, 2),
            )
        self._update_holds()

    # ---- other replicas ---------------------------------------------------------------

    def peer_document(self, now: float) -> dict[str, Any]:
        """What this replica tells its peers (in ``GET /-/peer``): its sessions by a hash
        of their token (the token itself is the browser's secret), when each was last in
        use, those it ended in the last ``ENDED_SHARED_S``, its lobby's length."""
        sessions = {
            session_key(s.sid): {
                "pod": s.pod_id,
                "idle_s": 0.0 if s.active else round(max(0.0, now - s.last_seen), 3),
            }
            for s in self.sessions.sessions.values()
        }
        ended = self.sessions.ended_since(now - ENDED_SHARED_S)
        return {
            "sessions": sessions,
            "ended": {session_key(sid): why.value for sid, why in ended.items()},
            "lobby": len(self.sessions.lobby),
        }

    def peer_view(self, now: float) -> PeerView:
        view = PeerView(live=False)
        for doc in self.peer_documents():
            view.live = True
            with contextlib.suppress(TypeError, ValueError, AttributeError, KeyError):
                for key, info in dict(doc.get("sessions") or {}).items():
                    seen = now - float(info["idle_s"])
                    old = view.sessions.get(str(key))
                    if old is None or seen > old[1]:
                        view.sessions[str(key)] = (PodId(str(info["pod"])), seen)
                for key, why in dict(doc.get("ended") or {}).items():
                    view.ended[str(key)] = EndReason(why)
                view.lobby += int(doc.get("lobby") or 0)
        return view

    def _ended_sessions(self, ended: list[Ended]) -> None:
        for end in ended:
            log_event("ui_session", session=end.sid[:8], pod=end.pod_id, event=end.reason.value)

    def _update_holds(self) -> None:
        held = self.sessions.held_pods()
        pods = self.gate.admission.pods.values()
        if any(p.ui_held != (p.pod_id in held) for p in pods):
            self.gate.hold_for_ui(held)

    def poke(self) -> None:
        """Something changed (a pod's state): re-check sessions and the lobby now."""
        self._poke.set()

    async def run(self) -> None:
        """Expire sessions and admit the lobby when due (or when poked)."""
        while True:
            now = self.clock()
            self.sync(now)
            wake = self.sessions.next_wake(now)
            if self.sessions.sessions or self.sessions.lobby:
                # a pod's health (checks, its gate's word) changes without a state
                # transition to poke us: look again each RECHECK_S while sessions live
                wake = min(wake if wake is not None else now + RECHECK_S, now + RECHECK_S)
            timeout = None if wake is None else max(0.05, wake - now)
            self._poke.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poke.wait(), timeout)

    # ---- pages ------------------------------------------------------------------------

    def _lobby_page(self, sid: str, now: float) -> web.Response:
        place = self._place(sid, now)
        # JSON inside <script>: only "<" could end it early
        page = LOBBY_PAGE.replace("{{place}}", json.dumps(place).replace("<", "\\u003c"))
        return web.Response(
            text=page,
            content_type="text/html",
            headers={"Cache-Control": "no-store", "X-Sdproxy-Ui": "lobby"},
        )

    def _ended(self, request: web.Request, reason: EndReason) -> web.StreamResponse:
        text = ENDED_TEXT[reason]
        if not navigation(request):
            raise errors.UiSessionEnded(f"your UI session ended: {text}")
        page = ENDED_PAGE.replace("{{reason}}", html.escape(text))
        return web.Response(
            text=page,
            status=410,
            content_type="text/html",
            headers={"Cache-Control": "no-store", "X-Sdproxy-Ui": "ended"},
        )


ENDED_TEXT = {
    EndReason.IDLE: "it was idle too long, so its GPU went back to the pool",
    EndReason.LEFT: "you left it",
    EndReason.POD_GONE: "the GPU server it used went away",
}

_STYLE = """<style>
body{font-family:system-ui,sans-serif;background:#111827;color:#e5e7eb;display:flex;
align-items:center;justify-content:center;min-height:100vh;margin:0}
main{max-width:32rem;padding:2rem;border:1px solid #374151;border-radius:12px;background:#1f2937}
h1{font-size:1.4rem;margin-top:0}.big{font-size:2.5rem;font-weight:700}
button{font-size:1rem;padding:.5rem 1rem;border-radius:8px;border:0;background:#f97316;color:#fff}
.muted{color:#9ca3af}
</style>"""

LOBBY_PAGE = (
    """<!doctype html><html><head><meta charset="utf-8"><title>Waiting for a GPU</title>"""
    + _STYLE
    + """</head><body><main>
<h1>Every GPU is in use</h1>
<p>You are number <span id="position" class="big">?</span> in line
(<span id="depth">?</span> waiting).</p>
<p>A GPU should be free within <span id="eta">?</span>. This page moves you in by itself
as soon as one is free; keep it open.</p>
<p class="muted" id="state">Checking…</p>
<script type="application/json" id="place">{{place}}</script>
<script>
(function () {
  function fmt(s) {
    return s >= 90 ? Math.round(s / 60) + " min" : Math.max(1, Math.round(s)) + " s";
  }
  function show(p) {
    if (p.ready) { document.getElementById("state").textContent = "Your GPU is ready…";
                   location.reload(); return false; }
    if (p.ended) { location.reload(); return false; }
    document.getElementById("position").textContent = p.position;
    document.getElementById("depth").textContent = p.depth;
    document.getElementById("eta").textContent = fmt(p.eta_s);
    document.getElementById("state").textContent = "Updated " + new Date().toLocaleTimeString();
    return true;
  }
  function poll() {
    fetch("/-/ui/lobby", {credentials: "same-origin", cache: "no-store"})
      .then(function (r) { return r.json(); })
      .then(function (p) { if (show(p)) setTimeout(poll, 1000); })
      .catch(function () { setTimeout(poll, 2000); });
  }
  show(JSON.parse(document.getElementById("place").textContent));
  setTimeout(poll, 1000);
})();
</script></main></body></html>"""
)

ENDED_PAGE = (
    """<!doctype html><html><head><meta charset="utf-8"><title>Session ended</title>"""
    + _STYLE
    + """</head><body><main>
<h1>Your session ended</h1>
<p id="reason">{{reason}}.</p>
<p><button id="rejoin">Rejoin</button></p>
<script>
document.getElementById("rejoin").addEventListener("click", function () {
  fetch("/-/ui/session", {method: "DELETE", credentials: "same-origin"})
    .finally(function () { location.reload(); });
});
</script></main></body></html>"""
)
