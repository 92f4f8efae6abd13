"""Runtime: the job store — asynchronous jobs' records (SQLite) and their files.

Layout of ``--jobs-dir``::

    jobs.sqlite (+ -wal, -shm)   one row per job (``JobRecord``), stdlib sqlite3 in WAL mode
    bodies/<id>                  the request body of a job that has not finished
    results/<id>                 what the pod answered (or the error the proxy answered)
    lock                         flock'ed by the one process using the directory

Durability: a job is answered ``202`` only after its body file is written and its row
committed. WAL with ``synchronous=NORMAL`` makes a commit durable against the PROCESS dying
(``kill -9``: the WAL is in the OS's page cache and replayed at the next open); a power
loss may lose the last commits (SQLite "WAL mode": https://sqlite.org/wal.html), which we
accept for a cache of GPU work. Rows are small and queries use indexes, so store calls run
on the event loop's thread (tens of microseconds each); file I/O runs in the executor.

``JobStore`` is the Protocol the job API uses: a store shared by replicas (records in a
database, results in an object store) would implement it; ``SqliteJobStore`` is the
embedded one. Timestamps are wall-clock seconds (``time.time()``): they must mean the same
after a restart, which no monotonic clock does.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from enum import StrEnum
from pathlib import Path
from typing import IO, Any, Protocol

from sdproxy.errors import ConfigError

log = logging.getLogger("sdproxy.jobstore")


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self not in (JobStatus.QUEUED, JobStatus.RUNNING)


#: the state of a job's callback (None: it has none)
CALLBACK_PENDING = "pending"
CALLBACK_DONE = "delivered"
CALLBACK_GAVE_UP = "failed"
CALLBACK_REFUSED = "refused"


@dataclass(frozen=True, kw_only=True, slots=True)
class JobRecord:
    """One asynchronous job as stored. ``headers`` are the ones sent to the pod (the
    client's minus hop-by-hop ones); ``result_headers`` the pod's answer's."""

    id: str
    owner: str
    route: str
    method: str
    path_qs: str
    headers: tuple[tuple[str, str], ...]
    status: JobStatus
    created_at: float
    tenant: str | None = None
    idempotency_key: str | None = None
    error: str | None = None
    pod: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    body_bytes: int = 0
    result_status: int | None = None
    result_headers: tuple[tuple[str, str], ...] = ()
    result_bytes: int = 0
    expired: bool = False
    callback_url: str | None = None
    callback_state: str | None = None
    seq: int = 0


_COLUMNS = tuple(f.name for f in fields(JobRecord) if f.name != "seq")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    owner TEXT NOT NULL,
    route TEXT NOT NULL,
    method TEXT NOT NULL,
    path_qs TEXT NOT NULL,
    headers TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    tenant TEXT,
    idempotency_key TEXT,
    error TEXT,
    pod TEXT,
    started_at REAL,
    finished_at REAL,
    body_bytes INTEGER NOT NULL DEFAULT 0,
    result_status INTEGER,
    result_headers TEXT NOT NULL DEFAULT '[]',
    result_bytes INTEGER NOT NULL DEFAULT 0,
    expired INTEGER NOT NULL DEFAULT 0,
    callback_url TEXT,
    callback_state TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_idempotency ON jobs(owner, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_owner ON jobs(owner, seq);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status, seq);
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs(expired, finished_at);
"""


@dataclass(frozen=True, kw_only=True, slots=True)
class Page:
    jobs: tuple[JobRecord, ...]
    #: the cursor of the next (older) page; None: this was the last
    cursor: str | None


class JobStore(Protocol):
    """What the job API needs of a store (the seam for a store shared by replicas)."""

    def insert(self, record: JobRecord) -> JobRecord:
        """Add a job; if the owner already has one under its idempotency key, that one
        is returned instead (and nothing is added)."""
        ...

    def get(self, job_id: str) -> JobRecord | None: ...

    def find_idempotent(self, owners: Sequence[str], key: str) -> JobRecord | None: ...

    def update(self, job_id: str, **changes: Any) -> JobRecord | None: ...

    def delete(self, job_id: str) -> None: ...

    def page(
        self,
        *,
        owners: Sequence[str],
        status: JobStatus | None,
        tenant: str | None,
        limit: int,
        cursor: str | None,
    ) -> Page: ...

    def unfinished(self) -> list[JobRecord]:
        """Queued and running jobs, oldest first (a restart takes them up again)."""
        ...

    def pending_callbacks(self) -> list[JobRecord]: ...

    def finished_unexpired(self) -> list[JobRecord]: ...

    def expirable(self, *, finished_before: float) -> list[JobRecord]: ...

    def oldest_results(self, limit: int) -> list[JobRecord]: ...

    def forgettable(self, *, finished_before: float) -> list[str]: ...

    def counts(self) -> dict[JobStatus, int]: ...

    def recent(self, limit: int) -> list[JobRecord]: ...

    @property
    def bytes(self) -> int:
        """Bytes of the store's files (bodies and results)."""
        ...

    def body_path(self, job_id: str) -> Path: ...

    def result_path(self, job_id: str) -> Path: ...

    def close(self) -> None: ...


def default_dir(env: dict[str, str] | os._Environ[str], listen: str) -> Path:
    """``$XDG_STATE_HOME/sdproxy/jobs/HOST-PORT`` (``~/.local/state`` without it): one
    directory per listen address, so two proxies on one machine never share one."""
    state = env.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "sdproxy" / "jobs" / listen.replace(":", "-").replace("/", "_")


class StoreInUse(ConfigError):
    """Another process holds the directory's lock."""


class SqliteJobStore:
    """The embedded store: one SQLite file and two directories under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        try:
            for sub in ("bodies", "results"):
                (root / sub).mkdir(parents=True, exist_ok=True)
            self._lock = _lock(root / "lock")
        except BlockingIOError as exc:
            raise StoreInUse(
                f"cannot use --jobs-dir {root}: another sdproxy process uses it; "
                "give each replica its own --jobs-dir"
            ) from exc
        except OSError as exc:
            raise ConfigError(f"cannot use --jobs-dir {root}: {exc}") from exc
        try:
            self._db = sqlite3.connect(
                root / "jobs.sqlite", isolation_level=None, check_same_thread=False
            )
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(f"cannot use --jobs-dir {root}: {exc}") from exc
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        row = self._db.execute(
            "SELECT COALESCE(SUM(body_bytes + result_bytes), 0) FROM jobs"
        ).fetchone()
        self._bytes = int(row[0])
        self._remove_orphans()

    @property
    def bytes(self) -> int:
        return self._bytes

    def body_path(self, job_id: str) -> Path:
        return self.root / "bodies" / job_id

    def result_path(self, job_id: str) -> Path:
        return self.root / "results" / job_id

    def insert(self, record: JobRecord) -> JobRecord:
        values = _to_row(record)
        marks = ", ".join("?" for _ in _COLUMNS)
        try:
            cur = self._db.execute(
                f"INSERT INTO jobs ({', '.join(_COLUMNS)}) VALUES ({marks})",
                [values[c] for c in _COLUMNS],
            )
        except sqlite3.IntegrityError:
            key = record.idempotency_key
            found = self.find_idempotent([record.owner], key) if key else None
            if found is None:
                raise
            return found
        self._bytes += record.body_bytes + record.result_bytes
        return replace(record, seq=int(cur.lastrowid or 0))

    def find_idempotent(self, owners: Sequence[str], key: str) -> JobRecord | None:
        marks = ", ".join("?" for _ in owners)
        row = self._db.execute(
            f"SELECT * FROM jobs WHERE owner IN ({marks}) AND idempotency_key = ? "
            "ORDER BY seq DESC",
            (*owners, key),
        ).fetchone()
        return _from_row(row) if row is not None else None

    def get(self, job_id: str) -> JobRecord | None:
        row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _from_row(row) if row is not None else None

    def update(self, job_id: str, **changes: Any) -> JobRecord | None:
        sized = "body_bytes" in changes or "result_bytes" in changes
        before = self.get(job_id) if sized else None
        if sized and before is None:
            return None
        values = _to_row(replace(_PROBE, **changes))
        names = [c for c in changes if c in values]
        row = self._db.execute(
            f"UPDATE jobs SET {', '.join(f'{c} = ?' for c in names)} WHERE id = ? RETURNING *",
            [*(values[c] for c in names), job_id],
        ).fetchone()
        if row is None:
            return None
        after = _from_row(row)
        if before is not None:
            self._bytes += (after.body_bytes + after.result_bytes) - (
                before.body_bytes + before.result_bytes
            )
        return after

    def delete(self, job_id: str) -> None:
        record = self.get(job_id)
        if record is None:
            return
        self._db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        self._bytes -= record.body_bytes + record.result_bytes
        for path in (self.body_path(job_id), self.result_path(job_id)):
            path.unlink(missing_ok=True)

    def page(
        self,
        *,
        owners: Sequence[str],
        status: JobStatus | None,
        tenant: str | None,
        limit: int,
        cursor: str | None,
    ) -> Page:
        where = [f"owner IN ({', '.join('?' for _ in owners)})"]
        args: list[Any] = list(owners)
        if status is not None:
            where.append("status = ?")
            args.append(status.value)
        if tenant is not None:
            where.append("tenant = ?")
            args.append(tenant)
        if cursor is not None:
            where.append("seq < ?")
            args.append(cursor)
        rows = self._db.execute(
            f"SELECT * FROM jobs WHERE {' AND '.join(where)} ORDER BY seq DESC LIMIT ?",
            [*args, limit + 1],
        ).fetchall()
        jobs = tuple(_from_row(r) for r in rows[:limit])
        more = len(rows) > limit and jobs
        return Page(jobs=jobs, cursor=str(jobs[-1].seq) if more else None)

    def unfinished(self) -> list[JobRecord]:
        return self._select("status IN ('queued', 'running') ORDER BY seq")

    def finished_unexpired(self) -> list[JobRecord]:
        return self._select("expired = 0 AND finished_at IS NOT NULL ORDER BY seq")

    def pending_callbacks(self) -> list[JobRecord]:
        return self._select(
            "callback_state = ? AND status NOT IN ('queued', 'running') ORDER BY seq",
            CALLBACK_PENDING,
        )

    def expirable(self, *, finished_before: float) -> list[JobRecord]:
        return self._select(
            "expired = 0 AND finished_at IS NOT NULL AND finished_at < ? ORDER BY finished_at",
            finished_before,
        )

    def oldest_results(self, limit: int) -> list[JobRecord]:
        return self._select(
            "expired = 0 AND finished_at IS NOT NULL ORDER BY finished_at LIMIT ?", limit
        )

    def forgettable(self, *, finished_before: float) -> list[str]:
        rows = self._db.execute(
            "SELECT id FROM jobs WHERE expired = 1 AND finished_at < ?", (finished_before,)
        ).fetchall()
        return [str(r[0]) for r in rows]

    def counts(self) -> dict[JobStatus, int]:
        rows = self._db.execute(
            "SELECT status, COUNT(*) FROM jobs WHERE expired = 0 GROUP BY status"
        ).fetchall()
        found = {JobStatus(r[0]): int(r[1]) for r in rows}
        return {s: found.get(s, 0) for s in JobStatus}

    def recent(self, limit: int) -> list[JobRecord]:
        return self._select("1 ORDER BY seq DESC LIMIT ?", limit)

    def _select(self, condition: str, *args: Any) -> list[JobRecord]:
        rows = self._db.execute(f"SELECT * FROM jobs WHERE {condition}", args).fetchall()
        return [_from_row(r) for r in rows]

    def _remove_orphans(self) -> None:
        """Files without a row: the process died between writing a body and its commit."""
        known = {str(r[0]) for r in self._db.execute("SELECT id FROM jobs").fetchall()}
        for sub in ("bodies", "results"):
            for path in (self.root / sub).iterdir():
                if path.name not in known:
                    path.unlink(missing_ok=True)

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._db.close()
        self._lock.close()


#: a record to render changed columns with (``update``)
_PROBE = JobRecord(
    id="",
    owner="",
    route="",
    method="",
    path_qs="",
    headers=(),
    status=JobStatus.QUEUED,
    created_at=0.0,
)


def _lock(path: Path) -> IO[str]:
    """Hold ``path`` for as long as this process uses the directory: two proxies taking
    up the same queued jobs after a restart would run them twice."""
    handle = path.open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise
    return handle


def _to_row(record: JobRecord) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for name in _COLUMNS:
        value = getattr(record, name)
        if name in ("headers", "result_headers"):
            value = json.dumps([list(h) for h in value])
        elif name == "status":
            value = JobStatus(value).value
        elif name == "expired":
            value = int(value)
        row[name] = value
    return row


def _from_row(row: sqlite3.Row) -> JobRecord:
    values = dict(row)
    for name in ("headers", "result_headers"):
        values[name] = tuple((str(k), str(v)) for k, v in json.loads(values[name]))
    values["status"] = JobStatus(values["status"])
    values["expired"] = bool(values["expired"])
    return JobRecord(**values)
