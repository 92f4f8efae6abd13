"""Bench: start, probe and always stop the systems under test, each on its own loopback port.

The systems, all in front of the same simulated pods (``sdproxy sim``):

- ``direct``: the client talks to the pod itself (overhead baseline; no process).
- ``round-robin``: nginx, upstream round-robin with no limit -- what a plain Kubernetes
  Service does. Bodies are streamed both ways (``proxy_request_buffering off``,
  ``proxy_buffering off``): a Service is an L4 balancer and buffers nothing.
- ``haproxy``: ``maxconn 1`` per server and its backend queue -- the strongest classic
  peer. ``balance leastconn``: with ``maxconn 1`` a freed server takes the head of the
  backend queue whatever the algorithm (HAProxy's ``process_srv_queue``); leastconn only
  decides between idle servers, where it picks the least loaded, which is right for
  long jobs. Light routes (progress, sd-models) go to a second backend with no
  ``maxconn``, the best a classic config can do for them. ``nbthread 1`` and nginx
  ``worker_processes 1`` compare one core with one core: sdproxy is one event loop.
- ``sdproxy``: ``sdproxy serve`` with ``--max-inflight 1``.
- ``gated``: ``sdproxy serve`` in front of one ``sdproxy gate`` per pod (the pod-side
  sidecar that makes the limit exact with several front replicas); the replica is used
  only once its ``/-/status`` shows every pod ``"mode": "gated"``.
- ``Fleet``: several front processes (sdproxy replicas, HAProxy processes) in front of
  the same pods, with the requests spread over them round-robin as a Service would.

Every process is started in its own session with a parent-death signal, waited on until
it answers HTTP, and stopped (SIGTERM, then SIGKILL) by the ``contextlib.ExitStack`` that
started it, on errors and Ctrl-C too.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import aiohttp
import psutil

INSTALL = {"haproxy": "apt-get install haproxy", "nginx": "apt-get install nginx"}
HEAVY_PATHS = ("/sdapi/v1/txt2img", "/sdapi/v1/img2img")
LIGHT_PATHS = ("/sdapi/v1/progress", "/sdapi/v1/sd-models")


class TargetUnavailable(Exception):
    """A system cannot be benchmarked here (missing binary, failed start)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def find_binary(name: str) -> str:
    """Path of a system binary (also /usr/sbin, often off a user's PATH) or a clear error."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin:/sbin")
    if path is None:
        raise TargetUnavailable(f"{name} not found; install it with: {INSTALL.get(name, name)}")
    return path


def raise_fd_limit() -> int:
    """Raise this process's open-file limit to its hard limit (children inherit it)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return int(hard)


def _fd_hard_limit() -> int:
    import resource

    return int(resource.getrlimit(resource.RLIMIT_NOFILE)[1])


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Proc:
    """One child process, its log file and an RSS reading that includes its children."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def rss_bytes(self) -> int:
        try:
            proc = psutil.Process(self.popen.pid)
            procs = [proc, *proc.children(recursive=True)]
        except psutil.Error:
            return 0
        total = 0
        for one in procs:
            with contextlib.suppress(psutil.Error):
                total += one.memory_info().rss
        return total

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout_s: float = 5.0) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.popen.kill()
                self.popen.wait(timeout_s)


def spawn(stack: contextlib.ExitStack, *, name: str, argv: Sequence[str], workdir: Path) -> Proc:
    """Start ``argv`` with stdout+stderr to ``workdir/name.log``; stopped by ``stack``."""
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"{name}.log"
    log: IO[bytes] = log_path.open("wb")
    stack.callback(log.close)
    popen = subprocess.Popen(
        list(argv),
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=_die_with_parent,
    )
    proc = Proc(name=name, popen=popen, log_path=log_path)
    stack.callback(proc.stop)
    return proc


@dataclass
class Target:
    """A system under test: where to send requests, and how to read its queue."""

    name: str
    url: str
    proc: Proc | None = None
    status_url: str | None = None  # sdproxy: GET /-/status
    haproxy_socket: Path | None = None  # haproxy: stats socket
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def urls(self) -> list[str]:
        """Where the load generator sends requests (round-robin over several)."""
        return [self.url]

    async def queue_depth(self, session: aiohttp.ClientSession) -> int | None:
        """Requests waiting in this system's queue now (None if it has none or can't say)."""
        try:
            if self.status_url is not None:
                async with session.get(self.status_url) as resp:
                    data = await resp.json()
                return int(data["queue"]["depth"])
            if self.haproxy_socket is not None:
                return await _haproxy_qcur(self.haproxy_socket)
        except (aiohttp.ClientError, OSError, KeyError, ValueError, TypeError):
            return None
        return None


@dataclass
class Fleet(Target):
    """Several front processes in front of the same pods: requests are spread over
    ``members`` round-robin; the queue depth is the sum of theirs."""

    members: list[Target] = field(default_factory=list)

    @property
    def urls(self) -> list[str]:
        return [m.url for m in self.members]

    async def queue_depth(self, session: aiohttp.ClientSession) -> int | None:
        depths = await asyncio.gather(*(m.queue_depth(session) for m in self.members))
        if any(d is None for d in depths):
            return None
        return sum(d for d in depths if d is not None)


async def _haproxy_qcur(path: Path) -> int | None:
    reader, writer = await asyncio.open_unix_connection(str(path))
    try:
        writer.write(b"show stat\n")
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 2.0)
    finally:
        writer.close()
    lines = raw.decode(errors="replace").splitlines()
    if not lines:
        return None
    header = lines[0].lstrip("# ").split(",")
    for line in lines[1:]:
        row = dict(zip(header, line.split(","), strict=False))
        if row.get("pxname") == "heavy" and row.get("svname") == "BACKEND":
            return int(row.get("qcur") or 0)
    return None


# --------------------------------------------------------------------------- readiness


def wait_http(url: str, *, proc: Proc | None, timeout_s: float = 20.0) -> None:
    """Block until ``url`` answers any HTTP status; fail early if ``proc`` died."""
    import http.client
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.popen.poll() is not None:
            raise TargetUnavailable(
                f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log_tail()}"
            )
        conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=2)
        try:
            conn.request("GET", parts.path or "/")
            conn.getresponse().read()
            return
        except OSError as exc:
            last = str(exc)
        finally:
            conn.close()
        time.sleep(0.1)
    tail = proc.log_tail() if proc is not None else ""
    raise TargetUnavailable(f"{url} did not answer in {timeout_s:.0f}s ({last})\n{tail}")


# --------------------------------------------------------------------------- simulator


def sim_argv() -> list[str]:
    """``sdproxy sim`` from this interpreter; ``BENCH_SIM_CMD`` overrides (development)."""
    override = os.environ.get("BENCH_SIM_CMD")
    if override:
        return shlex.split(override)
    return [sys.executable, "-m", "sdproxy", "sim"]


@dataclass
class Sim:
    proc: Proc
    urls: list[str]
    step_ms: float


def start_sim(
    stack: contextlib.ExitStack,
    *,
    pods: int,
    step_ms: float,
    workdir: Path,
    threads: int | None = None,
    timeout_s: float = 30.0,
    extra: Sequence[str] = (),
) -> Sim:
    """Start ``pods`` simulated pods on free ports; read their URLs from stdout
    (``extra``: more ``sdproxy sim`` flags, e.g. ``--checkpoints``, ``--ui``)."""
    argv = [*sim_argv(), "--pods", str(pods), "--port", "0", "--host", "127.0.0.1"]
    argv += ["--step-ms", str(step_ms), *extra]
    if threads is not None:
        argv += ["--threads", str(threads)]
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "sim.log"
    popen = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=log_path.open("wb"),
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=_die_with_parent,
    )
    proc = Proc(name="sim", popen=popen, log_path=log_path)
    stack.callback(proc.stop)
    urls = _read_sim_urls(proc, pods=pods, timeout_s=timeout_s)
    for url in urls:
        wait_http(url + "/sim/stats", proc=proc)
    return Sim(proc=proc, urls=urls, step_ms=step_ms)


def _read_sim_urls(proc: Proc, *, pods: int, timeout_s: float) -> list[str]:
    urls: list[str] = []
    stdout = proc.popen.stdout
    assert stdout is not None

    def reader() -> None:
        for raw in stdout:
            line = raw.decode(errors="replace").strip()
            if "listening on" in line:
                urls.append(line.rsplit(" ", 1)[-1].rstrip("/"))
            if len(urls) >= pods:
                break
        # keep draining so the child never blocks on a full pipe
        for _ in stdout:
            pass

    thread = threading.Thread(target=reader, name="sim-stdout", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while len(urls) < pods and time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            break
        time.sleep(0.05)
    if len(urls) < pods:
        raise TargetUnavailable(
            f"sim printed {len(urls)}/{pods} pod URLs (argv: {_argv(proc.popen.args)}):\n"
            f"{proc.log_tail()}"
        )
    return urls[:pods]


# --------------------------------------------------------------------------- proxies


def _hostport(url: str) -> str:
    return url.split("://", 1)[-1].rstrip("/")


#: response header carrying HAProxy's own queue time (%Tw, ms) when asked for
HAPROXY_QUEUE_HEADER = "X-Haproxy-Queue-Ms"


def haproxy_config(
    *,
    port: int,
    backends: Sequence[str],
    sock: Path,
    maxconn: int,
    queue_timeout_s: float,
    queue_header: bool = False,
) -> str:
    servers = "\n".join(
        f"    server p{i} {_hostport(url)}{' maxconn 1' if maxconn else ''}"
        for i, url in enumerate(backends)
    )
    light = "\n".join(f"    server p{i} {_hostport(url)}" for i, url in enumerate(backends))
    # HAProxy needs about 2 fds per connection and refuses to start when maxconn does
    # not fit the open-file limit (20000 here, and only root with CAP_SYS_RESOURCE may
    # raise it), so maxconn is what the limit allows, at most 12000.
    global_maxconn = max(256, min(12000, (_fd_hard_limit() - 256) // 2))
    # %Tw: the time this request waited in HAProxy's queues, ms (log-format variable)
    tw = f'    http-response set-header {HAPROXY_QUEUE_HEADER} "%Tw"\n' if queue_header else ""
    return f"""# generated by bench/targets.py
global
    maxconn {global_maxconn}
    nbthread 1
    stats socket {sock} mode 600 level admin

defaults
    mode http
    maxconn {global_maxconn}
    timeout connect 5s
    timeout client 30m
    timeout server 30m
    # how long a request may wait in the backend queue before 503
    timeout queue {int(queue_timeout_s)}s
    # a queued request whose client left is dropped, not sent to a pod
    option abortonclose
    option http-keep-alive

frontend fe
    bind 127.0.0.1:{port}
    acl light path_beg {" ".join(LIGHT_PATHS)}
    use_backend light if light
    default_backend heavy

backend heavy
    # with maxconn 1 a freed server takes the head of this backend's queue (FIFO);
    # leastconn only chooses among idle servers
    balance leastconn
{tw}{servers}

backend light
    # progress and sd-models: no limit, so they don't wait behind generations
    balance roundrobin
{light}
"""


def start_haproxy(
    stack: contextlib.ExitStack,
    *,
    backends: Sequence[str],
    workdir: Path,
    maxconn_per_server: int = 1,
    queue_timeout_s: float = 600.0,
    queue_header: bool = False,
    name: str = "haproxy",
) -> Target:
    binary = find_binary("haproxy")
    port = free_port()
    sock = workdir / "haproxy.sock"
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = workdir / "haproxy.cfg"
    cfg.write_text(
        haproxy_config(
            port=port,
            backends=backends,
            sock=sock,
            maxconn=maxconn_per_server,
            queue_timeout_s=queue_timeout_s,
            queue_header=queue_header,
        )
    )
    proc = spawn(stack, name=name, argv=[binary, "-db", "-f", str(cfg)], workdir=workdir)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + LIGHT_PATHS[1], proc=proc)
    return Target(name=name, url=url, proc=proc, haproxy_socket=sock)


def nginx_config(*, port: int, backends: Sequence[str], workdir: Path) -> str:
    servers = "\n".join(f"        server {_hostport(url)};" for url in backends)
    tmp = workdir / "tmp"
    user = "user root;\n" if os.geteuid() == 0 else ""
    return f"""# generated by bench/targets.py
{user}worker_processes 1;
pid {workdir}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    client_max_body_size 0;
    upstream pods {{
        # round-robin, no per-pod limit: what a Kubernetes Service does
{servers}
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://pods;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            # stream request bodies to the pod as they arrive (no temp file)
            proxy_request_buffering off;
            # stream responses back as they arrive
            proxy_buffering off;
            # 64k reads and writes instead of the 4-8k default: fair to nginx on 10 MiB
            proxy_buffer_size 64k;
            proxy_buffers 4 64k;
            proxy_busy_buffers_size 128k;
            client_body_buffer_size 64k;
            proxy_read_timeout 1800s;
            proxy_send_timeout 1800s;
            proxy_next_upstream off;
        }}
    }}
}}
"""


def start_nginx(stack: contextlib.ExitStack, *, backends: Sequence[str], workdir: Path) -> Target:
    binary = find_binary("nginx")
    port = free_port()
    (workdir / "tmp").mkdir(parents=True, exist_ok=True)
    cfg = workdir / "nginx.conf"
    cfg.write_text(nginx_config(port=port, backends=backends, workdir=workdir))
    argv = [binary, "-p", str(workdir), "-e", "stderr", "-c", str(cfg)]
    proc = spawn(stack, name="nginx", argv=[*argv, "-g", "daemon off;"], workdir=workdir)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + LIGHT_PATHS[1], proc=proc)
    return Target(name="round-robin", url=url, proc=proc)


def start_sdproxy(
    stack: contextlib.ExitStack,
    *,
    backends: Sequence[str],
    workdir: Path,
    max_inflight: int = 1,
    max_queue: int = 20000,
    queue_timeout_s: float = 600.0,
    name: str = "sdproxy",
    extra: Sequence[str] = (),
) -> Target:
    """``sdproxy serve`` in front of ``backends`` (``extra``: more flags, e.g.
    ``--policy fifo``)."""
    port, mport = free_port(), free_port()
    argv = [sys.executable, "-m", "sdproxy", "serve", "--listen", f"127.0.0.1:{port}"]
    for url in backends:
        argv += ["--backend", url]
    argv += ["--max-inflight", str(max_inflight), "--max-queue", str(max_queue)]
    argv += ["--queue-timeout-s", str(queue_timeout_s), "--drain-timeout-s", "2"]
    argv += ["--metrics-listen", f"127.0.0.1:{mport}"]
    argv += ["--access-log", "false", "--log-level", "warning", "--identity", name]
    # its own job store, never the user's state directory
    argv += ["--jobs-dir", str(workdir / f"{name}-jobs"), *extra]
    proc = spawn(stack, name=name, argv=argv, workdir=workdir)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/-/healthz", proc=proc)
    wait_http(url + LIGHT_PATHS[1], proc=proc)
    return Target(name=name, url=url, proc=proc, status_url=url + "/-/status")


def start_gates(
    stack: contextlib.ExitStack, *, pods: Sequence[str], workdir: Path, max_inflight: int = 1
) -> list[str]:
    """One ``sdproxy gate`` per pod (its sidecar); the gates' URLs, in the pods' order."""
    started: list[tuple[str, Proc]] = []
    for i, pod in enumerate(pods):  # start them all, then wait: they import in parallel
        port = free_port()
        argv = [sys.executable, "-m", "sdproxy", "gate", "--listen", f"127.0.0.1:{port}"]
        argv += ["--upstream", pod, "--max-inflight", str(max_inflight)]
        argv += ["--access-log", "false", "--log-level", "warning"]
        proc = spawn(stack, name=f"gate{i}", argv=argv, workdir=workdir)
        started.append((f"http://127.0.0.1:{port}", proc))
    for url, proc in started:
        wait_http(url + "/-/readyz", proc=proc)
    return [url for url, _ in started]


def wait_gated(target: Target, *, pods: int, timeout_s: float = 30.0) -> None:
    """Block until the replica's ``/-/status`` shows ``pods`` pods, each ``gated``."""
    import json
    import urllib.request

    assert target.status_url is not None
    deadline = time.monotonic() + timeout_s
    modes: list[str] = []
    while time.monotonic() < deadline:
        if target.proc is not None and target.proc.popen.poll() is not None:
            raise TargetUnavailable(f"{target.name} exited:\n{target.proc.log_tail()}")
        try:
            with urllib.request.urlopen(target.status_url, timeout=2) as resp:
                modes = [p["mode"] for p in json.load(resp)["pods"]]
        except (OSError, ValueError, KeyError, TypeError):
            modes = []
        if len(modes) == pods and all(m == "gated" for m in modes):
            return
        time.sleep(0.1)
    raise TargetUnavailable(f"{target.name}: pods not all gated after {timeout_s:.0f}s: {modes}")


def direct(backends: Sequence[str]) -> Target:
    return Target(name="direct", url=backends[0])


def start_system(
    stack: contextlib.ExitStack, name: str, *, backends: Sequence[str], work_dir: Path
) -> Target:
    """Start one named system in front of ``backends``."""
    workdir = work_dir / name
    if name == "direct":
        return direct(backends)
    if name == "round-robin":
        return start_nginx(stack, backends=backends, workdir=workdir)
    if name == "nginx":
        target = start_nginx(stack, backends=backends, workdir=workdir)
        target.name = "nginx"
        return target
    if name == "haproxy":
        return start_haproxy(stack, backends=backends, workdir=workdir)
    if name == "sdproxy":
        return start_sdproxy(stack, backends=backends, workdir=workdir)
    if name == "gated":
        gates = start_gates(stack, pods=backends, workdir=workdir)
        target = start_sdproxy(stack, backends=gates, workdir=workdir, name="gated")
        wait_gated(target, pods=len(gates))
        target.extra["gates"] = gates
        return target
    raise ValueError(f"unknown system {name!r}")


def versions() -> dict[str, str]:
    """Versions of the peer binaries, or how to install them."""
    out: dict[str, str] = {}
    for name, flag in (("haproxy", "-v"), ("nginx", "-v"), ("wrk", "-v")):
        try:
            binary = find_binary(name) if name != "wrk" else (shutil.which("wrk") or "")
            if not binary:
                raise TargetUnavailable("wrk not found; install it with: apt-get install wrk")
            res = subprocess.run(
                [binary, flag], capture_output=True, text=True, timeout=5, check=False
            )
            text = (res.stdout + res.stderr).strip().splitlines()
            out[name] = text[0] if text else "?"
        except (TargetUnavailable, OSError, subprocess.TimeoutExpired) as exc:
            out[name] = f"missing ({exc})"
    return out


def _argv(args: object) -> str:
    """A Popen's args for an error message (a list here; str or bytes are allowed too)."""
    if isinstance(args, str | bytes):
        return str(args)
    if isinstance(args, list | tuple):
        return shlex.join(str(a) for a in args)
    return repr(args)
