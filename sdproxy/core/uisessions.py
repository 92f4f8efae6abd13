"""Core: browser UI sessions — who holds which pod, who waits in the lobby, who idled out.

``sdproxy serve --ui`` puts sd-webui's Gradio UI behind the proxy. Gradio's queue needs
every request and websocket of one browser to reach one server, and a person at the UI
holds a GPU for minutes between clicks, so a browser gets a **session** bound to one pod
(the ``sdproxy_ui`` cookie names it) rather than a slot per request:

- capacity: at most ``ui_sessions_per_pod`` sessions per pod (default 1: one person per
  GPU); a pod holding sessions takes no API jobs while they last (``held_pods``: the
  admission core keeps such pods out of its free list), so UI and API never share a GPU;
- lobby: when every pod is full a browser waits in line, first come first served;
  ``admit`` binds waiters in order whenever a pod has room (one freed, one became
  ready); a waiter that stopped polling for ``lobby_stale_s`` has left;
- release: a session with no request and no open websocket for ``ui_idle_s`` ends
  (``expire``), as does one whose pod went away (``pods_gone``) or whose user left
  (``leave``); an ended session is remembered (bounded) so its browser is told so;
- replicas: a browser's requests may reach any replica (the cookie names the pod).
  ``adopt`` takes on a session another replica holds; ``observe_peers`` merges what the
  others saw (last use, ends), and ``Candidate.elsewhere`` counts their sessions against
  a pod's capacity.

Time is an argument; nothing here does I/O. Which pods may take a session is the
caller's word (``Candidate``: usable pods and their API load).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from sdproxy.core.pods import PodId

#: ended sessions remembered (their browsers see "your session ended", not a new one)
ENDED_KEPT = 4096


@dataclass(frozen=True, kw_only=True)
class UiConfig:
    """The browser-UI knobs; a field with ``help`` is the ``sdproxy serve`` option of the
    same name (``--ui-sessions-per-pod``)."""

    ui: bool = field(
        default=False,
        metadata={
            "help": "serve sd-webui's browser UI: sticky sessions per pod, a lobby, idle release",
            "switch": True,
        },
    )
    ui_sessions_per_pod: int = field(
        default=1, metadata={"help": "browser UI sessions one pod holds at once", "min": 1}
    )
    ui_idle_s: float = field(
        default=900.0,
        metadata={"help": "a UI session with no request and no websocket this long ends", "gt": 0},
    )
    ui_api_prefix: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "path prefix of an extension's API, not UI traffic (repeatable; "
            "/sdapi/ always is)",
            "metavar": "PREFIX",
        },
    )
    #: a lobby page polls every second; one silent this long was closed
    lobby_stale_s: float = field(default=15.0, metadata={"derived": "a constant"})


class EndReason(StrEnum):
    IDLE = "idle"
    LEFT = "left"
    POD_GONE = "pod_gone"


@dataclass(kw_only=True)
class UiSession:
    sid: str
    pod_id: PodId
    opened_at: float
    last_seen: float
    #: open websockets and HTTP exchanges in flight (a session in use never idles out)
    active: int = 0


@dataclass(kw_only=True)
class Waiter:
    sid: str
    joined_at: float
    last_seen: float


@dataclass(frozen=True, kw_only=True)
class Ended:
    sid: str
    pod_id: PodId
    reason: EndReason


@dataclass(frozen=True, kw_only=True)
class Admitted:
    session: UiSession
    waited_s: float


@dataclass(frozen=True, kw_only=True)
class Candidate:
    """A pod that may take a session now, how much API work it runs (0 preferred) and
    how many sessions other replicas hold on it (they count against its capacity)."""

    pod_id: PodId
    api_load: int = 0
    elsewhere: int = 0


class UiSessions:
    def __init__(self, config: UiConfig) -> None:
        self.config = config
        self.sessions: dict[str, UiSession] = {}
        self.lobby: OrderedDict[str, Waiter] = OrderedDict()
        #: sid -> (why, when): an ended session's browser is told so
        self.ended: OrderedDict[str, tuple[EndReason, float]] = OrderedDict()

    # ---- queries ----------------------------------------------------------------------

    def find(self, sid: str) -> UiSession | None:
        return self.sessions.get(sid)

    def per_pod(self) -> dict[PodId, int]:
        counts: dict[PodId, int] = {}
        for session in self.sessions.values():
            counts[session.pod_id] = counts.get(session.pod_id, 0) + 1
        return counts

    def held_pods(self) -> frozenset[PodId]:
        return frozenset(s.pod_id for s in self.sessions.values())

    def position(self, sid: str) -> int | None:
        """1-based place in the lobby (None: not waiting)."""
        for index, waiting in enumerate(self.lobby):
            if waiting == sid:
                return index + 1
        return None

    def eta_s(self, sid: str, now: float) -> float:
        """At most how long until a place frees for this waiter: the sessions' idle
        deadlines in order (an active one counts a full ``ui_idle_s`` from now)."""
        position = self.position(sid) or 1
        idle = self.config.ui_idle_s
        ends = sorted(
            now + idle if s.active else max(now, s.last_seen + idle) for s in self.sessions.values()
        )
        if position <= len(ends):
            return ends[position - 1] - now
        return idle

    def ended_reason(self, sid: str) -> EndReason | None:
        ended = self.ended.get(sid)
        return ended[0] if ended is not None else None

    def ended_since(self, since: float) -> dict[str, EndReason]:
        """Sessions that ended at ``since`` or later (for the other replicas)."""
        return {sid: why for sid, (why, at) in self.ended.items() if at >= since}

    def next_wake(self, now: float) -> float | None:
        """When the next idle session or stale waiter would end."""
        times = [
            s.last_seen + self.config.ui_idle_s for s in self.sessions.values() if not s.active
        ]
        times += [w.last_seen + self.config.lobby_stale_s for w in self.lobby.values()]
        return min(times, default=None)

    # ---- events -----------------------------------------------------------------------

    def touch(self, sid: str, now: float) -> None:
        session = self.sessions.get(sid)
        if session is not None:
            session.last_seen = now
        waiter = self.lobby.get(sid)
        if waiter is not None:
            waiter.last_seen = now

    def opened(self, sid: str, now: float) -> None:
        """An HTTP exchange or websocket of the session began."""
        session = self.sessions.get(sid)
        if session is not None:
            session.active += 1
            session.last_seen = now

    def closed(self, sid: str, now: float) -> None:
        session = self.sessions.get(sid)
        if session is not None:
            session.active = max(0, session.active - 1)
            session.last_seen = now

    def join(self, sid: str, now: float) -> None:
        """A browser with no session asks for one: it stands in line (once)."""
        self.ended.pop(sid, None)
        if sid not in self.sessions and sid not in self.lobby:
            self.lobby[sid] = Waiter(sid=sid, joined_at=now, last_seen=now)

    def admit(self, candidates: Sequence[Candidate], now: float) -> list[Admitted]:
        """Bind lobby waiters, first in line first, while a candidate pod has room: the
        one with the fewest sessions, then the least API work, then the first listed."""
        admitted: list[Admitted] = []
        counts = self.per_pod()
        for c in candidates:
            counts[c.pod_id] = counts.get(c.pod_id, 0) + c.elsewhere
        while self.lobby:
            room = [c for c in candidates if counts.get(c.pod_id, 0) < self.capacity]
            if not room:
                break
            best = min(room, key=lambda c: (counts.get(c.pod_id, 0), c.api_load))
            sid, waiter = self.lobby.popitem(last=False)
            session = UiSession(sid=sid, pod_id=best.pod_id, opened_at=now, last_seen=now)
            self.sessions[sid] = session
            counts[best.pod_id] = counts.get(best.pod_id, 0) + 1
            admitted.append(Admitted(session=session, waited_s=now - waiter.joined_at))
        return admitted

    def adopt(
        self,
        sid: str,
        pod_id: PodId,
        candidates: Iterable[Candidate],
        now: float,
        *,
        held_elsewhere: bool = False,
        peers_known: bool = False,
    ) -> bool:
        """A session this replica does not know whose cookie names ``pod_id``. Another
        replica holds it there (``held_elsewhere``): it is the same session, take it on.
        Else, with other replicas in sight (``peers_known``) nobody holds it — it ended
        or was never opened: no. Alone (a restart): take it over if that pod still has
        room and nobody waits ahead of it."""
        if sid in self.sessions or sid in self.ended:
            return sid in self.sessions
        pod = next((c for c in candidates if c.pod_id == pod_id), None)
        if pod is None:
            return False
        if not held_elsewhere:
            if peers_known or self.lobby:
                return False
            if self.per_pod().get(pod_id, 0) + pod.elsewhere >= self.capacity:
                return False
        self.sessions[sid] = UiSession(sid=sid, pod_id=pod_id, opened_at=now, last_seen=now)
        return True

    def observe_peers(
        self, *, seen: Mapping[str, float], ended: Mapping[str, EndReason], now: float
    ) -> list[Ended]:
        """What the other replicas say of sessions this one holds too: the last time they
        saw each in use (``seen``: it idles out everywhere at once) and which they ended
        (left, idle, pod gone: it ends here too)."""
        for sid, at in seen.items():
            session = self.sessions.get(sid)
            if session is not None:
                session.last_seen = max(session.last_seen, at)
        gone = [self.sessions[sid] for sid in ended if sid in self.sessions]
        return [self._end(s, ended[s.sid], now) for s in gone]

    def leave(self, sid: str, now: float) -> Ended | None:
        """The user left (``DELETE /-/ui/session``): the session or lobby place ends."""
        self.lobby.pop(sid, None)
        session = self.sessions.get(sid)
        if session is None:
            return None
        return self._end(session, EndReason.LEFT, now)

    def expire(self, now: float) -> list[Ended]:
        """End idle sessions; drop waiters that stopped polling."""
        for sid, waiter in list(self.lobby.items()):
            if now - waiter.last_seen >= self.config.lobby_stale_s:
                del self.lobby[sid]
        idle = [
            s
            for s in self.sessions.values()
            if not s.active and now - s.last_seen >= self.config.ui_idle_s
        ]
        return [self._end(s, EndReason.IDLE, now) for s in idle]

    def pods_gone(self, alive: Iterable[PodId], now: float) -> list[Ended]:
        """End the sessions of pods no longer ready (deleted, drained, crashed)."""
        keep = set(alive)
        gone = [s for s in self.sessions.values() if s.pod_id not in keep]
        return [self._end(s, EndReason.POD_GONE, now) for s in gone]

    @property
    def capacity(self) -> int:
        return self.config.ui_sessions_per_pod

    def _end(self, session: UiSession, reason: EndReason, now: float) -> Ended:
        del self.sessions[session.sid]
        self.ended[session.sid] = (reason, now)
        while len(self.ended) > ENDED_KEPT:
            self.ended.popitem(last=False)
        return Ended(sid=session.sid, pod_id=session.pod_id, reason=reason)
